"""The backend registry: discovery through entry points, lazy classes, install hints.

Plugins are modules published under the ``jasper.backends`` entry-point group; each implements
:func:`jasper.hookspecs.jasper_register_backends` and registers backends by *class path*, so
listing backends imports only the small plugin modules, never h5py, zarr or chromadb.

jasper loads plugins itself rather than with ``PluginManager.load_setuptools_entrypoints``
(which imports eagerly, lets the first of two same-named plugins win silently and dies on a broken
plugin; several pluggy hosts ended up writing their own loader for the same reasons):

- a plugin that fails to import or register is a :class:`JasperPluginWarning` naming its
  distribution and version; ``JASPER_PLUGIN_ERRORS=raise`` makes it a :class:`PluginLoadError`;
- a plugin whose distribution requires an incompatible jasper-core is skipped with a warning
  before it is imported;
- two plugins registering one backend name is a :class:`BackendConflictError` naming both;
- ``JASPER_BACKENDS=a,b`` keeps only those backends, ``JASPER_BACKENDS_DISABLE=c`` drops some.

The discovered list is cached; :func:`refresh_backends` rebuilds it.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from jasper import hookspecs
from jasper.errors import (
    BackendConflictError,
    BackendError,
    BackendNotFoundError,
    NoBackendCanOpenError,
    PluginLoadError,
)

if TYPE_CHECKING:  # the contract module imports torch; listing backends must not
    from jasper.backend import BackendEntrypoint

ENTRY_POINT_GROUP = "jasper.backends"
ENV_PLUGIN_ERRORS = "JASPER_PLUGIN_ERRORS"
ENV_ALLOW = "JASPER_BACKENDS"
ENV_DENY = "JASPER_BACKENDS_DISABLE"


class JasperPluginWarning(UserWarning):
    """A plugin could not be loaded; jasper carries on without it."""


@dataclass(frozen=True)
class KnownBackend:
    """A backend the jasper project publishes, for install hints when it is missing."""

    name: str
    package: str
    description: str


#: Backends published by the jasper project (fsspec-style known implementations). Only packages
#: that exist in the repository's ``packages/`` are listed, so every install hint works.
KNOWN_BACKENDS: dict[str, KnownBackend] = {
    b.name: b
    for b in (
        KnownBackend("pt", "jasper-pt", "one .pt file per array; reads the original system's datasets"),
        KnownBackend("hdf5", "jasper-hdf5", "one compressed HDF5 file"),
        KnownBackend("memmap-sqlite", "jasper-memmap-sqlite", "memory-mapped .npy arrays + SQLite catalogue"),
        KnownBackend("zarr", "jasper-zarr", "sharded zarr v3 groups, local or on S3"),
        KnownBackend("chroma", "jasper-chroma", "tables as ChromaDB collections"),
    )
}


def install_hint(package: str, *, upgrade: bool = False, extra: str | None = None) -> str:
    """How to install (``upgrade``: update) ``package`` of the jasper project, as every error
    and listing says it. The packages are not on PyPI, so pip given a bare package name would
    find nothing (or someone else's package): the hint names the package's folder in a
    clone of the repository, with the CPU torch constraint, and the wheels ``nox -s build``
    makes. ``extra`` names an optional dependency set (``jasper-core[build]``)."""
    flag = "-U " if upgrade else ""
    spec = f"./packages/{package}" + (f"[{extra}]" if extra else "")
    spec = f"'{spec}'" if extra else spec
    return (f"pip install {flag}-c constraints.txt {spec} in a clone of the jasper repository "
            f"(or, after `nox -s build`, pip install {flag}--find-links dist {package})")


@dataclass
class BackendInfo:
    """A registered backend: metadata only until :meth:`load` imports its class."""

    name: str
    class_path: str
    description: str = ""
    url: str = ""
    distribution: str | None = None
    version: str | None = None
    _cls: type[BackendEntrypoint] | None = field(default=None, repr=False)

    def load(self) -> type[BackendEntrypoint]:
        """Import and return the backend class."""
        if self._cls is None:
            module_name, _, attr = self.class_path.partition(":")
            try:
                obj: Any = importlib.import_module(module_name)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            except Exception as exc:
                raise BackendError(
                    f"backend {self.name!r} ({self._origin()}) failed to import {self.class_path!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            from jasper.backend import BackendEntrypoint

            if not (isinstance(obj, type) and issubclass(obj, BackendEntrypoint)):
                raise BackendError(
                    f"backend {self.name!r} ({self._origin()}): {self.class_path!r} is not a "
                    "BackendEntrypoint subclass"
                )
            self._cls = obj
        return self._cls

    def _origin(self) -> str:
        if self.distribution:
            return f"{self.distribution} {self.version or ''}".strip()
        return "registered at run time"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "url": self.url,
            "class_path": self.class_path,
            "distribution": self.distribution,
            "version": self.version,
        }


class _Registry:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._discovered: dict[str, BackendInfo] | None = None
        self._runtime: dict[str, BackendInfo] = {}
        self._instances: dict[str, BackendEntrypoint] = {}

    # --- discovery ---------------------------------------------------------------------------
    def discovered(self) -> dict[str, BackendInfo]:
        with self._lock:
            if self._discovered is None:
                self._discovered = _discover()
            return self._discovered

    def all(self) -> dict[str, BackendInfo]:
        merged = dict(self.discovered())
        merged.update(self._runtime)
        return _apply_env_filters(merged)

    def refresh(self) -> None:
        with self._lock:
            self._discovered = None
            self._instances.clear()

    def register(self, info: BackendInfo, force: bool) -> None:
        with self._lock:
            existing = self.all().get(info.name)
            if existing is not None and not force:
                raise BackendConflictError(
                    f"backend name {info.name!r} is already registered by {existing._origin()} "
                    f"({existing.class_path}); pass force=True to replace it"
                )
            self._runtime[info.name] = info
            self._instances.pop(info.name, None)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._runtime.pop(name, None)
            self._instances.pop(name, None)

    def instance(self, name: str) -> BackendEntrypoint:
        with self._lock:
            if name not in self._instances:
                infos = self.all()
                if name not in infos:
                    known = KNOWN_BACKENDS.get(name)
                    hint = install_hint(known.package) if known else None
                    raise BackendNotFoundError(name, infos, hint)
                self._instances[name] = infos[name].load()()
            return self._instances[name]


_REGISTRY = _Registry()


def _core_version() -> str:
    from jasper import __version__

    return __version__


def _incompatible_core(dist: metadata.Distribution | None) -> str | None:
    """The requirement string if ``dist`` requires a jasper-core this one does not satisfy."""
    if dist is None:
        return None
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # packaging is a dependency, but never let a check break discovery
        return None
    for req_text in dist.requires or ():
        try:
            req = Requirement(req_text)
        except Exception:
            continue
        if req.name.replace("_", "-").lower() != "jasper-core" or req.marker is not None:
            continue
        if req.specifier and not req.specifier.contains(Version(_core_version()), prereleases=True):
            return req_text
    return None


def _plugin_failure(message: str, exc: BaseException | None = None) -> None:
    if os.environ.get(ENV_PLUGIN_ERRORS, "").lower() in {"raise", "error", "1", "true"}:
        raise PluginLoadError(message) from exc
    warnings.warn(message, JasperPluginWarning, stacklevel=4)


def _discover() -> dict[str, BackendInfo]:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    found: dict[str, BackendInfo] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else ep.value
        dist_version = dist.version if dist is not None else None
        origin = f"{dist_name} {dist_version or ''}".strip()
        bad_req = _incompatible_core(dist)
        if bad_req is not None:
            _plugin_failure(
                f"jasper plugin {ep.name!r} from {origin} requires {bad_req!r} but jasper-core "
                f"{_core_version()} is installed; skipped. Upgrade one of them."
            )
            continue
        try:
            plugin = ep.load()
            if pm.is_registered(plugin):
                continue
            pm.register(plugin, name=f"{dist_name}:{ep.name}")
        except Exception as exc:
            _plugin_failure(
                f"jasper plugin {ep.name!r} from {origin} failed to load: "
                f"{type(exc).__name__}: {exc}",
                exc,
            )
            continue
        _call_plugin(pm, plugin, dist_name, dist_version, found)
    return found


def _call_plugin(
    pm: pluggy.PluginManager,
    plugin: object,
    dist_name: str | None,
    dist_version: str | None,
    found: dict[str, BackendInfo],
) -> None:
    origin = f"{dist_name} {dist_version or ''}".strip() if dist_name else "a run-time plugin"

    def register(name: str, class_path: str, *, description: str = "", url: str = "") -> None:
        if name in found and found[name].distribution != dist_name:
            other = found[name]
            raise BackendConflictError(
                f"two plugins register the backend {name!r}: {other._origin()} "
                f"({other.class_path}) and {origin} ({class_path}); uninstall one of them or "
                f"hide one with {ENV_DENY}"
            )
        found[name] = BackendInfo(name, class_path, description, url, dist_name, dist_version)

    kwargs: dict[str, Callable[..., None]] = {"register": register}
    for impl in pm.hook.jasper_register_backends.get_hookimpls():
        if impl.plugin is not plugin:
            continue
        try:
            # Call with only the arguments the implementation declares, as pluggy does, so
            # hookspecs can grow without breaking older plugins.
            impl.function(*[kwargs[a] for a in impl.argnames])
        except BackendConflictError:
            raise
        except Exception as exc:
            _plugin_failure(
                f"jasper plugin {origin} failed in jasper_register_backends: "
                f"{type(exc).__name__}: {exc}",
                exc,
            )


def _env_list(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return None
    return {x.strip() for x in raw.split(",") if x.strip()}


def _apply_env_filters(infos: dict[str, BackendInfo]) -> dict[str, BackendInfo]:
    allow, deny = _env_list(ENV_ALLOW), _env_list(ENV_DENY)
    return {
        n: i
        for n, i in infos.items()
        if (allow is None or n in allow) and (deny is None or n not in deny)
    }


# --- public API -------------------------------------------------------------------------------
def list_backends() -> dict[str, BackendInfo]:
    """Installed backends by name (cached; metadata only, no backend library is imported)."""
    return dict(sorted(_REGISTRY.all().items()))


def installable_backends() -> dict[str, KnownBackend]:
    """Backends published by the jasper project that are not installed, with their package."""
    installed = _REGISTRY.all()
    return {n: k for n, k in KNOWN_BACKENDS.items() if n not in installed}


def get_backend(name: str) -> BackendEntrypoint:
    """The backend instance registered as ``name``.

    Raises :class:`BackendNotFoundError` listing installed backends and, for a known backend,
    the package to install.
    """
    return _REGISTRY.instance(name)


def register_backend(
    name: str,
    backend: type[BackendEntrypoint] | str,
    *,
    description: str = "",
    url: str = "",
    force: bool = False,
) -> None:
    """Register a backend at run time, by class or by ``"module:Class"`` path.

    A taken name is refused with :class:`BackendConflictError` unless ``force=True``.
    """
    if isinstance(backend, str):
        info = BackendInfo(name, backend, description, url)
    else:
        path = f"{backend.__module__}:{backend.__qualname__}"
        info = BackendInfo(name, path, description or backend.description, url or backend.url)
        info._cls = backend
    _REGISTRY.register(info, force)


def unregister_backend(name: str) -> None:
    """Remove a backend registered with :func:`register_backend` (no-op if absent)."""
    _REGISTRY.unregister(name)


def refresh_backends() -> None:
    """Forget the cached discovery (after installing a plugin in a running process)."""
    _REGISTRY.refresh()


def _guess(name: str, path: Path) -> int | None:
    """The backend's ``open_priority`` if it recognises ``path``, else None. A backend whose
    class fails to import, or whose guess raises, is a warning naming it (and its
    distribution), never a failure that hides the other backends."""
    try:
        backend = get_backend(name)
        if backend.guess_can_open(path):
            return int(getattr(backend, "open_priority", 0))
    except BackendError as exc:
        warnings.warn(str(exc), JasperPluginWarning, stacklevel=3)
    except Exception as exc:  # a guessing bug in one plugin must not hide the others
        origin = list_backends()[name]._origin() if name in list_backends() else "?"
        warnings.warn(f"backend {name!r} ({origin}) failed in guess_can_open: "
                      f"{type(exc).__name__}: {exc}", JasperPluginWarning, stacklevel=3)
    return None


def guess_backend(path: str | Path, preferred: str | None = None) -> str:
    """The name of the installed backend that can open the dataset directory ``path``.

    ``preferred`` (the writer recorded in the manifest) wins when it is installed and agrees.
    Otherwise every backend's ``guess_can_open`` is asked and, when several agree, the one with
    the highest ``open_priority`` wins.
    """
    p = Path(path)
    infos = list_backends()
    if preferred and preferred in infos and _guess(preferred, p) is not None:
        return preferred
    matches = [(prio, name) for name in infos if (prio := _guess(name, p)) is not None]
    if matches:
        return max(matches)[1]
    hint = ""
    if preferred and preferred not in infos:
        known = KNOWN_BACKENDS.get(preferred)
        hint = f" The dataset was written by backend {preferred!r}" + (
            f": {install_hint(known.package)}." if known else "."
        )
    listed = ", ".join(infos) or "none"
    raise NoBackendCanOpenError(
        f"No dataset files found: no installed backend recognises {p} (installed: {listed})."
        f"{hint} "
        f"Pass backend=NAME to force one; `jasper backends` lists what can be installed."
    )
