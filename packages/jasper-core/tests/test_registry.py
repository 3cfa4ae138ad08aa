"""The backend registry, exercised through real entry points.

Each fake plugin is a real installed distribution: a ``*.dist-info`` directory with ``METADATA``
and ``entry_points.txt`` plus a plugin module, in a temporary directory put on ``sys.path``, so
discovery goes through ``importlib.metadata`` exactly as it does for a pip-installed package.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

import jasper
from jasper import registry
from jasper.backend import BackendEntrypoint, StoreReader
from jasper.errors import (
    BackendConflictError,
    BackendError,
    BackendNotFoundError,
    NoBackendCanOpenError,
    PluginLoadError,
)
from jasper.manifest import Manifest
from jasper.registry import ENV_ALLOW, ENV_DENY, ENV_PLUGIN_ERRORS, JasperPluginWarning

PLUGIN = textwrap.dedent(
    """
    import os
    from pathlib import Path
    from jasper.hookspecs import hookimpl

    CALLS = Path({calls!r})

    @hookimpl
    def jasper_register_backends(register):
        with open(CALLS, "a") as f:
            f.write("called\\n")
    {registrations}
    """
)

IMPL = textwrap.dedent(
    """
    from pathlib import Path
    from jasper.backend import BackendEntrypoint

    Path({canary!r}).write_text("imported")

    class Backend(BackendEntrypoint):
        name = {name!r}
        description = "a fake backend"

        def open(self, path, manifest):
            raise NotImplementedError
    """
)


@dataclass
class Plugin:
    """A fake installed distribution and what it left on disk."""

    dist: str
    version: str
    module: str
    impl_module: str
    calls: Path
    canary: Path

    @property
    def n_calls(self) -> int:
        return len(self.calls.read_text().splitlines()) if self.calls.exists() else 0


class FakeSite:
    """A directory on ``sys.path`` into which fake plugin distributions are installed."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def install(
        self,
        dist: str,
        backends: tuple[str, ...] = (),
        *,
        version: str = "1.0",
        requires: tuple[str, ...] = (),
        source: str | None = None,
        ep_name: str | None = None,
    ) -> Plugin:
        tag = uuid.uuid4().hex[:8]
        module = f"fakeplug_{tag}"
        impl = f"fakeplug_{tag}_impl"
        calls = self.root / f"{module}.calls"
        canary = self.root / f"{impl}.imported"
        regs = "".join(
            f"    register({name!r}, '{impl}:Backend', description='fake {name}')\n"
            for name in backends
        )
        text = source if source is not None else PLUGIN.format(calls=str(calls), registrations=regs)
        (self.root / f"{module}.py").write_text(text)
        (self.root / f"{impl}.py").write_text(
            IMPL.format(canary=str(canary), name=backends[0] if backends else "none"))
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        meta = ["Metadata-Version: 2.1", f"Name: {dist}", f"Version: {version}"]
        meta += [f"Requires-Dist: {r}" for r in requires]
        (info / "METADATA").write_text("\n".join(meta) + "\n")
        (info / "entry_points.txt").write_text(
            f"[jasper.backends]\n{ep_name or dist} = {module}\n")
        importlib.invalidate_caches()
        registry.refresh_backends()
        return Plugin(dist, version, module, impl, calls, canary)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSite]:
    root = tmp_path / "site"
    root.mkdir()
    for var in (ENV_ALLOW, ENV_DENY, ENV_PLUGIN_ERRORS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.syspath_prepend(str(root))
    registry.refresh_backends()
    try:
        yield FakeSite(root)
    finally:
        monkeypatch.undo()
        for name in [m for m in sys.modules if m.startswith("fakeplug_")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        registry.refresh_backends()


class _RuntimeBackend(BackendEntrypoint):
    name: ClassVar[str] = "runtime-fake"
    description: ClassVar[str] = "registered at run time"
    marker_files: ClassVar[tuple[str, ...]] = ("runtime.marker",)

    def open(self, path: Path, manifest: Manifest) -> StoreReader:
        raise NotImplementedError


class _Eager(_RuntimeBackend):
    name: ClassVar[str] = "eager-fake"
    open_priority: ClassVar[int] = 5


class _Broken(_RuntimeBackend):
    name: ClassVar[str] = "broken-guess"

    def guess_can_open(self, path: Any) -> bool:
        raise RuntimeError("guessing exploded")


# --- discovery -----------------------------------------------------------------------------
def test_plugin_is_listed_from_metadata_only_and_cached(site: FakeSite) -> None:
    p = site.install("fake-alpha", ("alpha",), version="2.3.4")
    listed = jasper.list_backends()
    assert "alpha" in listed
    info = listed["alpha"]
    assert (info.distribution, info.version) == ("fake-alpha", "2.3.4")
    assert info.class_path == f"{p.impl_module}:Backend" and info.description == "fake alpha"
    assert p.impl_module not in sys.modules and not p.canary.exists(), (
        "listing imported the backend class module")
    jasper.list_backends()
    assert p.n_calls == 1, "the discovered list must be cached"
    backend = jasper.get_backend("alpha")
    assert backend.name == "alpha" and p.canary.exists()
    assert jasper.get_backend("alpha") is backend
    jasper.refresh_backends()
    jasper.list_backends()
    assert p.n_calls == 2, "refresh_backends must rediscover"


def test_new_plugin_appears_after_refresh(site: FakeSite) -> None:
    before = set(jasper.list_backends())
    site.install("fake-late", ("late",))
    assert "late" not in before
    assert "late" in jasper.list_backends()


def test_plugin_failing_to_import_is_a_warning_naming_it(site: FakeSite) -> None:
    site.install("fake-broken", version="9.8.7", source="raise ImportError('no such lib: foo')\n")
    site.install("fake-good", ("good",))
    with pytest.warns(JasperPluginWarning, match=r"fake-broken 9\.8\.7.*ImportError.*foo"):
        listed = jasper.list_backends()
    assert "good" in listed, "one broken plugin must not hide the others"


def test_plugin_errors_raise_when_asked(site: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    site.install("fake-broken", version="0.0.1", source="raise ImportError('boom')\n")
    monkeypatch.setenv(ENV_PLUGIN_ERRORS, "raise")
    with pytest.raises(PluginLoadError, match=r"fake-broken 0\.0\.1"):
        jasper.list_backends()


def test_plugin_failing_in_its_hook_is_a_warning(site: FakeSite) -> None:
    source = textwrap.dedent(
        """
        from jasper.hookspecs import hookimpl

        @hookimpl
        def jasper_register_backends(register):
            raise ValueError("hook exploded")
        """
    )
    site.install("fake-hook", version="1.1", source=source)
    with pytest.warns(JasperPluginWarning, match=r"fake-hook 1\.1.*hook exploded"):
        jasper.list_backends()


def test_two_plugins_claiming_one_name_is_an_error_naming_both(site: FakeSite) -> None:
    site.install("fake-one", ("dupe",))
    site.install("fake-two", ("dupe",))
    with pytest.raises(BackendConflictError) as info:
        jasper.list_backends()
    msg = str(info.value)
    assert "fake-one" in msg and "fake-two" in msg and "'dupe'" in msg
    assert ENV_DENY in msg, "the message should say how to hide one"


def test_plugin_claiming_an_installed_backend_name_conflicts(site: FakeSite) -> None:
    if "pt" not in jasper.list_backends():
        pytest.skip("jasper-pt is not installed")
    site.install("fake-pt", ("pt",))
    with pytest.raises(BackendConflictError, match=r"jasper-pt.*fake-pt|fake-pt.*jasper-pt"):
        jasper.list_backends()


def test_allow_and_deny_lists(site: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    site.install("fake-a", ("aa",))
    site.install("fake-b", ("bb",))
    assert {"aa", "bb"} <= set(jasper.list_backends())
    monkeypatch.setenv(ENV_ALLOW, " aa , ")
    assert set(jasper.list_backends()) == {"aa"}
    with pytest.raises(BackendNotFoundError):
        jasper.get_backend("bb")
    monkeypatch.setenv(ENV_ALLOW, "aa,bb")
    monkeypatch.setenv(ENV_DENY, "aa")
    assert set(jasper.list_backends()) == {"bb"}
    monkeypatch.delenv(ENV_ALLOW)
    listed = set(jasper.list_backends())
    assert "bb" in listed and "aa" not in listed
    monkeypatch.setenv(ENV_DENY, "")
    assert {"aa", "bb"} <= set(jasper.list_backends())


def test_incompatible_core_requirement_is_skipped_before_import(
    site: FakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = "from pathlib import Path\nPath(__file__).with_suffix('.ran').write_text('x')\n"
    bad = site.install("fake-future", version="3.0", requires=("jasper-core>=99",), source=source)
    ok = site.install("fake-compatible", ("compat",), requires=("jasper-core>=0.1,<99", "numpy"))
    extra = site.install("fake-extra", ("extra",), requires=('jasper-core>=99; extra == "test"',))
    with pytest.warns(JasperPluginWarning, match=r"fake-future 3\.0.*jasper-core>=99"):
        listed = jasper.list_backends()
    assert not (site.root / f"{bad.module}.ran").exists(), "the plugin was imported anyway"
    assert bad.module not in sys.modules
    assert {"compat", "extra"} <= set(listed)
    assert ok.n_calls == 1 and extra.n_calls == 1
    monkeypatch.setenv(ENV_PLUGIN_ERRORS, "raise")
    jasper.refresh_backends()
    with pytest.raises(PluginLoadError, match="jasper-core>=99"):
        jasper.list_backends()


# --- run-time registration -----------------------------------------------------------------
def test_register_backend_refuses_taken_names_unless_forced(site: FakeSite) -> None:
    site.install("fake-taken", ("taken",))
    try:
        jasper.register_backend("runtime-fake", _RuntimeBackend)
        assert jasper.list_backends()["runtime-fake"].distribution is None
        assert isinstance(jasper.get_backend("runtime-fake"), _RuntimeBackend)
        with pytest.raises(BackendConflictError, match="registered at run time"):
            jasper.register_backend("runtime-fake", _Eager)
        with pytest.raises(BackendConflictError, match="fake-taken"):
            jasper.register_backend("taken", _RuntimeBackend)
        jasper.register_backend("runtime-fake", _Eager, force=True)
        assert isinstance(jasper.get_backend("runtime-fake"), _Eager)
        jasper.register_backend("taken", _RuntimeBackend, force=True)
        assert isinstance(jasper.get_backend("taken"), _RuntimeBackend)
    finally:
        registry.unregister_backend("runtime-fake")
        registry.unregister_backend("taken")
    assert "runtime-fake" not in jasper.list_backends()
    assert jasper.list_backends()["taken"].distribution == "fake-taken"


def test_register_backend_by_class_path_is_lazy() -> None:
    jasper.register_backend("by-path", f"{__name__}:_RuntimeBackend", description="lazy")
    jasper.register_backend("not-a-backend", "json:dumps")
    jasper.register_backend("no-module", "no_such_module_xyz:Thing")
    try:
        assert jasper.list_backends()["by-path"].description == "lazy"
        assert isinstance(jasper.get_backend("by-path"), _RuntimeBackend)
        with pytest.raises(BackendError, match="not a BackendEntrypoint subclass"):
            jasper.get_backend("not-a-backend")
        with pytest.raises(BackendError, match="no_such_module_xyz"):
            jasper.get_backend("no-module")
    finally:
        for name in ("by-path", "not-a-backend", "no-module"):
            registry.unregister_backend(name)


# --- lookup errors -------------------------------------------------------------------------
def test_missing_known_backend_says_what_to_install(site: FakeSite,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    site.install("fake-present", ("present",))
    monkeypatch.setenv(ENV_DENY, "hdf5")  # absent even where jasper-hdf5 is installed
    with pytest.raises(BackendNotFoundError) as info:
        jasper.get_backend("hdf5")
    msg = str(info.value)
    assert "pip install -c constraints.txt ./packages/jasper-hdf5 in a clone" in msg
    assert registry.install_hint("jasper-hdf5") in msg
    assert "present" in msg and "installed backends:" in msg
    assert info.value.installed == sorted(jasper.list_backends())
    assert "hdf5" in registry.installable_backends()
    with pytest.raises(BackendNotFoundError) as unknown:
        jasper.get_backend("no-such-format")
    assert "pip install" not in str(unknown.value) and "present" in str(unknown.value)
    assert isinstance(unknown.value, ValueError)


def test_guess_backend_by_priority_and_despite_a_failing_guess(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    d.mkdir()
    (d / "runtime.marker").write_text("")
    jasper.register_backend("runtime-fake", _RuntimeBackend)
    jasper.register_backend("eager-fake", _Eager)
    jasper.register_backend("broken-guess", _Broken)
    try:
        with pytest.warns(JasperPluginWarning, match="broken-guess.*guessing exploded"):
            assert jasper.guess_backend(d) == "eager-fake"
        # the writer recorded in the manifest wins when it agrees, without asking the others
        assert jasper.guess_backend(d, preferred="runtime-fake") == "runtime-fake"
        empty = tmp_path / "empty"
        empty.mkdir()
        with pytest.warns(JasperPluginWarning), pytest.raises(NoBackendCanOpenError) as info:
            jasper.guess_backend(empty, preferred="hdf5-missing")
        assert "runtime-fake" in str(info.value) and "hdf5-missing" in str(info.value)
    finally:
        for name in ("runtime-fake", "eager-fake", "broken-guess"):
            registry.unregister_backend(name)


def test_backend_info_to_dict(site: FakeSite) -> None:
    site.install("fake-dict", ("dicty",), version="0.4")
    d = jasper.list_backends()["dicty"].to_dict()
    assert d["name"] == "dicty" and d["distribution"] == "fake-dict" and d["version"] == "0.4"
    json.dumps(d)


# --- import cost ---------------------------------------------------------------------------
LISTING_PROBE = textwrap.dedent(
    """
    import json, sys
    from importlib import metadata
    import jasper
    infos = jasper.list_backends()
    eps = metadata.entry_points(group="jasper.backends")
    plugin_modules = {ep.value.split(":")[0] for ep in eps}
    print(json.dumps({
        "modules": sorted(sys.modules),
        "class_modules": {n: i.class_path.split(":")[0] for n, i in infos.items()},
        "plugin_modules": sorted(plugin_modules),
    }))
    """
)

HEAVY = ("h5py", "zarr", "numcodecs", "chromadb", "sqlite3", "_sqlite3", "pandas", "pyarrow")


def test_listing_in_a_fresh_process_imports_nothing_heavy() -> None:
    from jasper.testing.conformance import child_env

    proc = subprocess.run([sys.executable, "-c", LISTING_PROBE], capture_output=True, text=True,
                          env=child_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    modules = set(out["modules"])
    assert not modules & set(HEAVY), f"listing imported {sorted(modules & set(HEAVY))}"
    assert out["class_modules"], "no backend is installed to list"
    eager = {n: m for n, m in out["class_modules"].items()
             if m in modules and m not in out["plugin_modules"]}
    assert not eager, f"listing imported backend class modules: {eager}"


def test_guess_backend_survives_a_backend_whose_class_fails_to_import(
    site: FakeSite, tmp_path: Path
) -> None:
    plugin = site.install("jasper-broken-dist", ("broken-import",), version="0.3")
    (site.root / f"{plugin.impl_module}.py").write_text("raise ImportError('h5py is missing')\n")
    d = tmp_path / "ds"
    d.mkdir()
    (d / "runtime.marker").write_text("")
    jasper.register_backend("runtime-fake", _RuntimeBackend)
    try:
        with pytest.warns(JasperPluginWarning, match=r"jasper-broken-dist 0\.3.*h5py is missing"):
            assert jasper.guess_backend(d) == "runtime-fake"
    finally:
        registry.unregister_backend("runtime-fake")


# --- install hints point at something that installs -----------------------------------------
_REPO = Path(__file__).resolve().parents[3]


def _project(folder: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads((folder / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("package", ["jasper-core",
                                     *(k.package for k in registry.KNOWN_BACKENDS.values())])
def test_every_install_hint_names_a_package_folder_of_the_repository(package: str) -> None:
    """jasper's packages are not on PyPI: a hint must name the folder that pip installs."""
    hint = registry.install_hint(package)
    assert hint.startswith(f"pip install -c constraints.txt ./packages/{package} in a clone")
    assert f"--find-links dist {package})" in hint
    assert _project(_REPO / "packages" / package)["name"] == package
    assert (_REPO / "constraints.txt").is_file()
    upgrade = registry.install_hint(package, upgrade=True)
    assert upgrade.startswith(f"pip install -U -c constraints.txt ./packages/{package} ")


def test_an_extra_in_a_hint_exists() -> None:
    hint = registry.install_hint("jasper-core", extra="build")
    assert "'./packages/jasper-core[build]'" in hint
    assert "build" in _project(_REPO / "packages" / "jasper-core")["optional-dependencies"]


def test_no_message_of_core_tells_to_pip_install_a_package_by_its_bare_name() -> None:
    """``pip install jasper-hdf5`` finds nothing on PyPI: every hint goes through install_hint."""
    import re

    bare = re.compile(r"pip install (-U )?['\"]?jasper-")
    src = _REPO / "packages" / "jasper-core" / "src" / "jasper"
    found = [f"{p.name}:{i}" for p in sorted(src.rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if bare.search(line)]
    assert found == []
