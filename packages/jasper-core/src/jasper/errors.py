"""The typed errors jasper raises.

Every error derives from :class:`JasperError`. Errors that stand where the original system raised
``ValueError`` (integrity failures, a missing dataset directory or config file, a missing split, no
dataset files found, an unknown storage format or steering variant) also derive from
``ValueError`` so that existing ``except ValueError`` code keeps working, and their messages keep
the original's key phrases ("Dataset directory not found", "Config file not found", "Split file
not found"). Messages name the path,
the array, the row and the rule where they apply, and say what to do.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def _shown(path: str | Path) -> str:
    """How a message names ``path``: a URL (``s3://...``) as given, a local path as a Path."""
    text = str(path)
    return text if "://" in text else str(Path(path))


class JasperError(Exception):
    """Base class of every error jasper raises on purpose."""


class DatasetNotFoundError(JasperError, FileNotFoundError, ValueError):
    """A dataset directory, or a file a dataset needs, does not exist (a ``ValueError`` as in
    the original system, and a ``FileNotFoundError``)."""

    def __init__(self, path: str | Path, what: str = "dataset directory", hint: str = "") -> None:
        self.path = Path(path)
        msg = f"{what[:1].upper()}{what[1:]} not found: {_shown(path)}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


class FormatError(JasperError, ValueError):
    """A file exists but is not what jasper expects (not HDF5, truncated, wrong layout...)."""

    def __init__(self, path: str | Path, problem: str, array: str | None = None) -> None:
        self.path = Path(path)
        self.array = array
        where = _shown(path) + (f" (array {array!r})" if array else "")
        super().__init__(f"{where}: {problem}")


class UnsafeFileError(FormatError):
    """A file would need unsafe deserialisation (arbitrary code) to load; jasper refuses it."""


class IntegrityError(JasperError, ValueError):
    """A structural rule of the data model is broken (index out of range, wrong row count...).

    ``array``, ``row`` and ``rule`` say exactly what failed, ``path`` where (when known).
    """

    def __init__(
        self,
        message: str,
        *,
        array: str | None = None,
        row: int | None = None,
        rule: str | None = None,
        path: str | Path | None = None,
    ) -> None:
        self.array = array
        self.row = row
        self.rule = rule
        # str(): a reader at a URL names itself by a Location, which is not os.PathLike
        self.path = Path(str(path)) if path is not None else None
        prefix = f"{_shown(path)}: " if path is not None else ""
        super().__init__(prefix + message)


class DataQualityError(IntegrityError):
    """A value rule (negative equal to the positive, relevance outside [0, 1]...) under strict mode."""


class ChecksumError(IntegrityError):
    """An array's bytes no longer match the checksum recorded in the manifest."""


class ShapeError(IntegrityError):
    """An array's shape or dtype differs from what the data model or the manifest says."""


class ManifestError(JasperError, ValueError):
    """``config.json`` is missing a required key, is not JSON, or contradicts the arrays."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        super().__init__(f"{_shown(path)}: {problem}")


class SchemaVersionError(ManifestError):
    """The manifest was written by a newer jasper whose schema this version cannot read."""


class SplitNotFoundError(JasperError, ValueError):
    """The requested split is not one of the dataset's splits."""

    def __init__(self, split: str, available: Iterable[str], path: str | Path | None = None) -> None:
        self.split = split
        self.available = sorted(available)
        where = f" in {path}" if path is not None else ""
        super().__init__(
            f"Split file not found: split {split!r}{where}; available splits: "
            f"{', '.join(self.available)}"
        )


class UnknownVariantError(JasperError, ValueError):
    """A steering variant name or id that jasper does not know."""


class BackendError(JasperError):
    """Base class of errors about storage backends and plugins."""


class BackendNotFoundError(BackendError, ValueError):
    """The named backend is not installed (or not known at all).

    The message lists the installed backends and, for a known backend that is missing, the
    package to install.
    """

    def __init__(self, name: str, installed: Iterable[str], install_hint: str | None = None) -> None:
        self.name = name
        self.installed = sorted(installed)
        listed = ", ".join(self.installed) or "none"
        msg = f"unknown storage backend {name!r}; installed backends: {listed}"
        if install_hint:
            msg = f"storage backend {name!r} is not installed: {install_hint}; installed backends: {listed}"
        super().__init__(msg)


class BackendConflictError(BackendError):
    """Two plugins claim the same backend name."""


class PluginLoadError(BackendError):
    """A plugin failed to import or register (raised only when plugin errors are made fatal)."""


class CapabilityError(BackendError):
    """An operation needs a capability (mapping, writing, row reads...) the backend lacks."""


class NoBackendCanOpenError(BackendError, FileNotFoundError, ValueError):
    """Auto-detection found no installed backend that recognises the directory (no dataset
    files found: a ``ValueError`` in the original system)."""


class WriteOptionError(BackendError, TypeError):
    """A write/convert option the target backend does not accept, or a bad value for one."""


class DatasetExistsError(JasperError, FileExistsError):
    """The write target exists and ``overwrite`` was not given."""


class OverwriteRefusedError(DatasetExistsError):
    """``overwrite`` was given but the target is not something jasper may replace: not a jasper
    dataset (no manifest), a symlink, or a directory that holds (or lies inside) the source."""


class ConcurrentWriteError(DatasetExistsError):
    """Another writer committed to the same target while this write was running; this write
    was not committed and the other writer's dataset is intact."""


class StorageError(JasperError, OSError):
    """The operating system refused a write or read (disk full, permission denied...).

    ``path`` is the file concerned; the message says what to do.
    """

    def __init__(self, path: str | Path, problem: str, errno_: int | None = None) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}")
        if errno_ is not None:
            self.errno = errno_
