"""Core never imports a backend package: every module of ``jasper`` imports in a fresh
interpreter (with every backend installed) without loading any ``jasper_*`` module."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import importlib, json, pkgutil, sys
import jasper
names = sorted(m.name for m in pkgutil.walk_packages(jasper.__path__, 'jasper.')
               if m.name != 'jasper.__main__')  # running the CLI is not importing it
for name in names:
    importlib.import_module(name)
for public in jasper.__all__:
    getattr(jasper, public)
print(json.dumps({'modules': names,
                  'backend_modules': sorted(m for m in sys.modules if m.startswith('jasper_'))}))
"""


def test_importing_every_core_module_loads_no_backend() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # the walk found the modules that used to import a backend, so the check covers them
    assert {"jasper.cluster", "jasper.cli", "jasper.cluster_dataset"} <= set(result["modules"])
    assert result["backend_modules"] == [], result["backend_modules"]
