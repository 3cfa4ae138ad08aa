"""Development sessions for the jasper monorepo.

`nox` (no arguments) runs the default sessions: every package's tests in its own virtualenv,
the cross-package tests, lint, type checks and the documentation site (`nox -s docs`, strict).
`nox -s demo` runs the main job, `nox -s build` builds and checks every package, `nox -s benchmark`
the benchmark suite (`nox -s benchmark -- --full` for the large grid), `nox -s reliability` the
reliability campaign (its quick mode runs in the "cross" tests).

Every install goes through constraints.txt, which pins torch to the CPU build (2.13.0): an
unpinned torch would pull a multi-GB CUDA build into every session.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nox
from nox.command import CommandFailed

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
BACKENDS = [p for p in PACKAGES if p != "jasper-core"]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*/pyproject.toml"))

#: Packages whose tests also write with the reference backend, jasper-pt: memmap-sqlite's show
#: that a backend without row writes names the ones with them; chroma's builder writes its
#: output datasets with it; zarr's tests compare local and S3 copies with a pt reference.
REFERENCE_WRITER_USERS = ("jasper-chroma", "jasper-memmap-sqlite", "jasper-zarr")

#: Test sessions run their modules on one pytest-xdist worker per CPU, a module's tests on one
#: worker (``loadfile``): module-scoped fixtures (a campaign run, a server, a benchmark smoke run)
#: then run once, and many tests wait on child processes, servers or the disk rather than a CPU
#: (jasper-core's tests: 328 s serial, 184 s on 2 workers, on a 2-core machine).
PARALLEL_PYTEST = "pytest-xdist>=3.5"
PARALLEL = ("-n", "auto", "--dist", "loadfile")

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = True


def _install(session: nox.Session, *targets: str) -> None:
    # --no-compile: pip byte-compiles every module it installs, torch's thousands included
    # (torch: 27 s to install with it, 9 s without); Python compiles what a session imports, once
    session.install("--no-compile", *CONSTRAINTS, *targets)


def _pkg(name: str, extra: str | None = "test") -> str:
    path = str(ROOT / "packages" / name)
    return f"{path}[{extra}]" if extra else path


@nox.session
@nox.parametrize("package", [*PACKAGES, "cross"])
def tests(session: nox.Session, package: str) -> None:
    """One package's tests in a virtualenv holding only jasper-core and that package.

    A shared environment would hide undeclared dependencies. jasper-core's own tests need a
    storage backend to write datasets with: they get the reference backend, jasper-pt.
    "cross" runs tests/ (plugins, the example package, the benchmark smoke test) with every
    package installed.
    """
    if package == "cross":
        # hatchling: the third-party plugin test builds the example's wheel without isolation
        # atheris: the fuzz smoke run of tests/test_fuzz_smoke.py
        _install(session, PARALLEL_PYTEST, "hatchling>=1.21", "atheris>=2.3",
                 _pkg("jasper-core"), *(_pkg(b) for b in BACKENDS))
        session.run("pytest", *PARALLEL, "tests", *session.posargs)
        return
    targets = [_pkg("jasper-core")]
    if package == "jasper-core":
        targets.append(_pkg("jasper-pt", None))
    else:
        targets.append(_pkg(package))
        if package in REFERENCE_WRITER_USERS:
            targets.append(_pkg("jasper-pt", None))
    _install(session, PARALLEL_PYTEST, *targets)
    session.run("pytest", *PARALLEL, str(ROOT / "packages" / package / "tests"), *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole repository."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over jasper-core (typed public API)."""
    _install(session, "mypy>=1.10", _pkg("jasper-core"))
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site, into site/, in strict mode: a broken link, anchor or API reference,
    or a missing included file fails the session.

    jasper-core is installed because the data-model and curriculum tables are generated from
    jasper.schema, jasper.curriculum and jasper.dataset (docs/hooks.py); the API reference itself
    is read from the sources of every package without importing them.
    """
    _install(session, "-r", str(ROOT / "docs" / "requirements.txt"), _pkg("jasper-core", None))
    session.run("mkdocs", "build", "--strict", "--clean", "--config-file", str(ROOT / "mkdocs.yml"),
                *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


#: a plugin that declares a jasper-core range this repository's core is outside of
_OUT_OF_RANGE_PLUGIN = {
    "pyproject.toml": """\
[build-system]
requires = ["hatchling>=1.21"]
build-backend = "hatchling.build"

[project]
name = "jasper-range-probe"
version = "0.0.1"
dependencies = ["jasper-core>=99"]

[project.entry-points."jasper.backends"]
probe = "jasper_range_probe"

[tool.hatch.build.targets.wheel]
packages = ["jasper_range_probe"]
""",
    "jasper_range_probe/__init__.py": """\
raise RuntimeError("jasper imported a plugin whose jasper-core range excludes it")
""",
}

_RANGE_PROBE = """\
import sys, warnings
import jasper
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    names = jasper.list_backends()
assert "probe" not in names, names
assert "jasper_range_probe" not in sys.modules, "the plugin was imported"
messages = [str(w.message) for w in caught]
assert any("jasper-core>=99" in m and "skipped" in m for m in messages), messages
print("out-of-range plugin skipped before import:", messages[0])
"""


def _venv_python(session: nox.Session, path: Path) -> str:
    session.run("python", "-m", "venv", "--clear", str(path))
    return str(path / "bin" / "python")


@nox.session
def build(session: nox.Session) -> None:
    """Wheels and sdists of every package, checked, and each backend proven from its wheel.

    1. ``python -m build`` makes a wheel and an sdist of every package (and the example
       backend); ``twine check --strict`` checks their metadata; they are copied to dist/.
    2. Each backend's wheel is installed into a fresh virtualenv holding only jasper-core's wheel
       and the backend's declared dependencies (plus its ``test`` extra), and its conformance
       tests run there against the installed code, not the source tree.
    3. A plugin whose declared jasper-core range excludes this core is installed beside jasper-pt:
       the registry must skip it with a warning, before importing it.
    """
    session.install("build>=1.2", "twine>=5", "hatchling>=1.21")
    tmp = Path(session.create_tmp()).resolve()  # absolute: the checks run from inside it
    wheels = tmp / "dist"
    if wheels.exists():
        shutil.rmtree(wheels)  # nox's own temporary directory: this session wrote it
    dirs = [ROOT / "packages" / p for p in PACKAGES] + [p.parent for p in EXAMPLES]
    for pkg in dirs:
        session.run("python", "-m", "build", "--no-isolation", "--outdir", str(wheels), str(pkg))
    built = sorted(wheels.iterdir())
    session.run("twine", "check", "--strict", *map(str, built))
    for pkg in dirs:
        stem = pkg.name.replace("-", "_")
        if not (list(wheels.glob(f"{stem}-*.whl")) and list(wheels.glob(f"{stem}-*.tar.gz"))):
            session.error(f"{pkg.name}: expected a wheel and an sdist in {wheels}")
    out = ROOT / "dist"
    out.mkdir(exist_ok=True)
    for f in built:  # overwrite only what this session built; never clear dist/
        shutil.copy2(f, out / f.name)

    (core_wheel,) = wheels.glob("jasper_core-*.whl")
    backends = [d for d in dirs if d.name != "jasper-core"]
    for pkg in backends:
        stem = pkg.name.replace("-", "_")
        (wheel,) = wheels.glob(f"{stem}-*.whl")
        python = _venv_python(session, tmp / f"venv-{pkg.name}")
        session.run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    *CONSTRAINTS, f"{core_wheel}[test]", f"{wheel}[test]", external=True)
        # the backend must come from the venv's site-packages, and no other backend be there
        with session.chdir(tmp):
            session.run(python, "-c", _FROM_WHEEL.format(module=stem, dist=pkg.name),
                        external=True)
        conformance = sorted((pkg / "tests").glob("test_*conformance*.py"))
        if not conformance:
            session.error(f"{pkg.name}: no conformance test module (tests/test_*conformance*.py)")
        with session.chdir(tmp):  # away from the source tree: only the wheel can be imported
            session.run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *map(str, conformance), external=True, env={"JASPER_PROGRESS": "0"})
        if pkg.name == "jasper-pt":
            probe = tmp / "range-probe"
            for rel, text in _OUT_OF_RANGE_PLUGIN.items():
                (probe / rel).parent.mkdir(parents=True, exist_ok=True)
                (probe / rel).write_text(text)
            session.run("python", "-m", "build", "--no-isolation", "--wheel", "--outdir",
                        str(probe / "dist"), str(probe))
            (probe_wheel,) = (probe / "dist").glob("*.whl")
            session.run(python, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--disable-pip-version-check", str(probe_wheel), external=True)
            with session.chdir(tmp):
                session.run(python, "-c", _RANGE_PROBE, external=True)


_FROM_WHEEL = """\
import sys, sysconfig
from importlib import metadata
from pathlib import Path
import {module}
site = Path(sysconfig.get_paths()["purelib"]).resolve()
where = Path({module}.__file__).resolve()
assert where.is_relative_to(site), f"{module} imported from {{where}}, not the wheel in {{site}}"
jaspers = sorted(d.metadata["Name"] for d in metadata.distributions()
                 if d.metadata["Name"].startswith("jasper"))
assert jaspers == sorted(["jasper-core", "{dist}"]), jaspers
print("{dist} from its wheel:", where)
"""


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: synthesise a dataset, write it with every backend, train, report."""
    _install(session, _pkg("jasper-core", None), *(_pkg(b, None) for b in BACKENDS))
    session.run("jasper", "demo", *session.posargs)


@nox.session
def benchmark(session: nox.Session) -> None:
    """The benchmark suite; results land in benchmarks/results/<timestamp>/."""
    _install(
        session,
        _pkg("jasper-core", None),
        *(_pkg(b, None) for b in BACKENDS),
        "-r", str(ROOT / "benchmarks" / "requirements.txt"),
    )
    env = {}
    mosaic = _mosaic_env(session)
    if mosaic is not None:
        env["JASPER_BENCH_MOSAIC_PYTHON"] = mosaic
    session.run("python", str(ROOT / "benchmarks" / "run.py"), *session.posargs, env=env)


#: Mosaic streaming's own environment, beside nox's: its pins (numpy < 2.2, torchvision,
#: transformers < 5) cannot share the benchmark's, so its peer runs there over a pipe
#: (benchmarks/mosaic_peer.py). Kept between runs while its requirements file is unchanged.
MOSAIC_ENV = ROOT / ".nox" / "_mosaic-streaming"
MOSAIC_REQUIREMENTS = ROOT / "benchmarks" / "requirements-mosaic.txt"


def _mosaic_env(session: nox.Session) -> str | None:
    """The Python of Mosaic's environment, built if missing or stale; None (the peer is then
    reported unavailable) when it cannot be built here."""
    python = MOSAIC_ENV / "bin" / "python"
    stamp = MOSAIC_ENV / ".requirements"
    want = MOSAIC_REQUIREMENTS.read_text()
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return str(python)
    shutil.rmtree(MOSAIC_ENV, ignore_errors=True)
    try:
        # run_install: building it is installation, so `nox -s benchmark --install-only`
        # builds it too (session.run is skipped there, and the stamp below would then fail)
        session.run_install("python", "-m", "venv", str(MOSAIC_ENV))
        session.run_install(str(python), "-m", "pip", "install", "--quiet", "--no-compile",
                            "-r", str(MOSAIC_REQUIREMENTS), external=True)
    except CommandFailed:
        session.warn("Mosaic streaming's environment could not be built; its peer is skipped")
        shutil.rmtree(MOSAIC_ENV, ignore_errors=True)
        return None
    stamp.write_text(want)
    return str(python)


@nox.session
def reliability(session: nox.Session) -> None:
    """The reliability campaign (not in the default run; its quick mode is part of "cross").

    Every case family (corrupt files, flipped regions, path trust, malicious pickles, kills,
    full disks, concurrent writers, readers during a commit) against every installed backend,
    each case in its own process with a timeout and a memory cap, then every reader's fuzz
    target for a longer run; regenerates the table in docs/reliability.md and fails unless the
    goal is met. Arguments pass through: `nox -s reliability -- --families kill --backends hdf5`.
    Runs as root for the disk-full family's tmpfs mounts (RLIMIT_FSIZE otherwise).
    """
    _install(session, _pkg("jasper-core", None), *(_pkg(b, None) for b in BACKENDS), "atheris>=2.3")
    session.run("python", "-m", "reliability", "--fuzz-seconds", "120", *session.posargs)
