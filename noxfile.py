"""Development sessions for the jasper monorepo.

`nox` (no arguments) runs the default sessions: every package's tests in its own virtualenv,
the cross-package tests, lint, type checks and the documentation site (`nox -s docs`, strict).
`nox -s demo` runs the main job, `nox -s build` builds and checks every package, `nox -s benchmark`
the benchmark suite (`nox -s benchmark -- --full` for the large grid).

Every install goes through constraints.txt, which pins torch to the CPU build (2.13.0): an
unpinned torch would pull a multi-GB CUDA build into every session.
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
BACKENDS = [p for p in PACKAGES if p != "jasper-core"]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*/pyproject.toml"))

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = True


def _install(session: nox.Session, *targets: str) -> None:
    session.install(*CONSTRAINTS, *targets)


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
        _install(session, "hatchling>=1.21", _pkg("jasper-core"), *(_pkg(b) for b in BACKENDS))
        session.run("pytest", "tests", *session.posargs)
        return
    targets = [_pkg("jasper-core")]
    if package == "jasper-core":
        targets.append(_pkg("jasper-pt", None))
    else:
        targets.append(_pkg(package))
    _install(session, *targets)
    session.run("pytest", str(ROOT / "packages" / package / "tests"), *session.posargs)


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
    session.run("python", str(ROOT / "benchmarks" / "run.py"), *session.posargs)
