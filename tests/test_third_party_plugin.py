"""The third-party path: a backend package outside this repository's packages plugs in.

The example package ``examples/jasper-npz`` is built into a wheel, installed with pip into a fresh
virtualenv that sees this environment's packages (jasper-core, torch...) but whose own
site-packages is new, so the outer environment is never modified. In that virtualenv jasper
must find the backend through its ``jasper.backends`` entry point, and the example's tests (the
conformance kit) must pass.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import venv
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "jasper-npz"

pytestmark = pytest.mark.slow


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, JASPER_PROGRESS="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                          **kwargs)  # type: ignore[call-overload]


def _installed(dist: str) -> str | None:
    try:
        return str(metadata.distribution(dist).locate_file(""))
    except metadata.PackageNotFoundError:
        return None


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding the example's wheel, layered over this environment."""
    tmp = tmp_path_factory.mktemp("third-party")
    wheels = tmp / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(EXAMPLE)]
    if importlib.util.find_spec("hatchling") is not None:
        build[4:4] = ["--no-build-isolation", "--no-index"]
    built = _run(build)
    assert built.returncode == 0, f"building the example wheel failed:\n{built.stderr[-3000:]}"
    (wheel,) = wheels.glob("jasper_npz-*.whl")

    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    site_packages = Path(purelib.stdout.strip())
    # Layer this environment's paths under the new site-packages (site.addsitedir also runs
    # their .pth files, so editable installs of jasper-core and the backends resolve).
    outer = [p for p in sys.path if p and Path(p).is_dir() and Path(p) != ROOT / "tests"]
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in outer)
    (site_packages / "_outer_environment.pth").write_text(lines)

    installed = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index",
                      "--no-warn-script-location", str(wheel)])
    assert installed.returncode == 0, f"pip install of the wheel failed:\n{installed.stderr}"
    return python


def test_example_is_found_through_its_entry_point(venv_python: Path) -> None:
    outer_before = _installed("jasper-npz")
    probe = textwrap.dedent(
        """
        import json, sys
        import jasper
        listed = jasper.list_backends()
        info = listed["npz"]
        heavy = [m for m in ("jasper_npz.backend", "zipfile") if m in sys.modules]
        backend = jasper.get_backend("npz")
        import jasper_npz
        print(json.dumps({"dist": info.distribution, "version": info.version,
                          "class_path": info.class_path, "module": jasper_npz.__file__,
                          "loaded_at_listing": heavy, "capabilities": repr(backend.capabilities),
                          "names": sorted(listed)}))
        """
    )
    out = _run([str(venv_python), "-c", probe])
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["dist"] == "jasper-npz" and found["version"] == "0.1.0"
    assert found["class_path"] == "jasper_npz.backend:NpzBackend"
    assert Path(found["module"]).is_relative_to(venv_python.parent.parent), (
        f"jasper_npz came from {found['module']}, not from the wheel installed in the venv")
    assert "jasper_npz.backend" not in found["loaded_at_listing"]
    assert "pt" in found["names"], "the venv must also see the outer environment's backends"
    assert _installed("jasper-npz") == outer_before, "the outer environment was modified"


def test_example_passes_the_conformance_kit(venv_python: Path, tmp_path: Path) -> None:
    tests = EXAMPLE / "tests"
    out = _run([str(venv_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                str(tests)], cwd=tmp_path)
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, f"the example's tests failed in the venv:\n{tail}"
    assert " passed" in out.stdout and "no tests ran" not in out.stdout, tail
    summary = out.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 30, f"expected the whole kit to run, got: {summary}"
