"""jasper-chroma: JASPER datasets whose embedding tables live in ChromaDB collections.

This module is the plugin registered under the ``jasper.backends`` entry point. It imports
nothing heavy: the backend class is registered by path and chromadb is imported only when a
store is opened or written.
"""

from __future__ import annotations

from jasper.hookspecs import RegisterBackend, hookimpl

__version__ = "0.1.0"


@hookimpl
def jasper_register_backends(register: RegisterBackend) -> None:
    register(
        "chroma",
        "jasper_chroma.backend:ChromaBackend",
        description="embedding tables as ChromaDB collections (local directory or server), "
        "pair arrays as .npy beside them",
        url="https://pypi.org/project/jasper-chroma/",
    )
