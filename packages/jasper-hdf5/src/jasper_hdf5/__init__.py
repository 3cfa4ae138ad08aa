"""jasper-hdf5: the HDF5 storage backend for jasper (one ``dataset.h5`` per dataset).

This module is the plugin registered under the ``jasper.backends`` entry point. It imports
nothing heavy: the backend class is registered by path, and h5py is imported only when a file
is opened or written.
"""

from __future__ import annotations

from jasper.hookspecs import RegisterBackend, hookimpl

__version__ = "0.1.0"


@hookimpl
def jasper_register_backends(register: RegisterBackend) -> None:
    register(
        "hdf5",
        "jasper_hdf5.backend:HDF5Backend",
        description="one dataset.h5 (none / lzf / gzip); reads the original system's HDF5 files",
        url="https://pypi.org/project/jasper-hdf5/",
    )
