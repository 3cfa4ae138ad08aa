"""jasper-pt: the PT storage backend for jasper (one ``.pt`` file per array).

This module is the plugin registered under the ``jasper.backends`` entry point. It imports
nothing heavy: the backend class is registered by path and imported on first use.
"""

from __future__ import annotations

from jasper.hookspecs import RegisterBackend, hookimpl

__version__ = "0.1.0"


@hookimpl
def jasper_register_backends(register: RegisterBackend) -> None:
    register(
        "pt",
        "jasper_pt.backend:PTBackend",
        description="one .pt file per array, memory-mapped; reads the original system's datasets",
        url="https://pypi.org/project/jasper-pt/",
    )
