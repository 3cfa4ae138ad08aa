#!/usr/bin/env python
"""Make the repository's packages importable and discoverable where pip cannot build them.

``gpu.sh`` first tries ``pip install --no-deps --no-build-isolation -e packages/NAME``; that needs
the build backend (hatchling) already installed, and a GPU machine without network may lack it.
This fallback writes, for every package, a minimal ``NAME-VERSION.dist-info`` (``METADATA`` with
its name, version and requirements, and ``entry_points.txt``) into one directory, and prints a
``PYTHONPATH`` that holds that directory and every package's ``src``: ``importlib.metadata`` then
finds the ``jasper.backends`` entry points exactly as after an install. Nothing is downloaded and
nothing outside the given directory is written.

    export PYTHONPATH="$(python benchmarks/offline_install.py DIR)"
"""

from __future__ import annotations

import os
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_metadata(site: Path) -> list[Path]:
    """Write the dist-info directories into ``site`` for every package that is not installed
    (an installed one would register its backends twice); return their ``src`` folders."""
    site.mkdir(parents=True, exist_ok=True)
    srcs = []
    for pyproject in sorted(ROOT.glob("packages/*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        name, version = project["name"], project["version"]
        try:
            metadata.distribution(name)
            continue
        except metadata.PackageNotFoundError:
            pass
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(exist_ok=True)
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        lines += [f"Requires-Dist: {r}" for r in project.get("dependencies", [])]
        (info / "METADATA").write_text("\n".join(lines) + "\n")
        groups = project.get("entry-points", {})
        scripts = project.get("scripts", {})
        text = []
        if scripts:
            groups = {**groups, "console_scripts": scripts}
        for group, eps in groups.items():
            text.append(f"[{group}]")
            text += [f"{k} = {v}" for k, v in eps.items()]
        (info / "entry_points.txt").write_text("\n".join(text) + "\n")
        srcs.append(pyproject.parent / "src")
    return srcs


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    site = Path(argv[0]).absolute()
    srcs = write_metadata(site)
    parts = [str(site), *map(str, srcs)]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    print(os.pathsep.join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
