"""jasper-zarr: zarr v3 datasets for jasper, on local disk and on S3-compatible object storage.

This module is the plugin registered under the ``jasper.backends`` entry point. It imports
nothing heavy: the backend class is registered by path, and zarr / obstore are imported only
when a dataset is opened or written.
"""

from __future__ import annotations

from jasper.hookspecs import RegisterBackend, hookimpl

__version__ = "0.1.0"


@hookimpl
def jasper_register_backends(register: RegisterBackend) -> None:
    register(
        "zarr",
        "jasper_zarr.backend:ZarrBackend",
        description="zarr v3 sharded arrays (none / zstd / blosc-lz4) on local disk or s3://",
        url="https://pypi.org/project/jasper-zarr/",
    )
