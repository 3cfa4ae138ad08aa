"""jasper-npz: an example storage backend for jasper (one ``.npz`` archive per dataset).

This module is the plugin: the ``jasper.backends`` entry point names it, and jasper imports it
when it lists backends. Keep it import-light: it registers the backend class by its path, so
``jasper backends`` never imports the module that does the work.
"""

from __future__ import annotations

from jasper.hookspecs import RegisterBackend, hookimpl

__version__ = "0.1.0"


@hookimpl
def jasper_register_backends(register: RegisterBackend) -> None:
    """Tell jasper which backends this package provides (called once per discovery)."""
    register(
        "npz",
        "jasper_npz.backend:NpzBackend",
        description="one uncompressed or deflated .npz archive per dataset (example plugin)",
    )
