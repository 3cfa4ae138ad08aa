"""The plugin hook specifications: everything a jasper plugin can implement.

A backend package exposes a plugin module under the ``jasper.backends`` entry-point group and
implements hooks from this module with :data:`hookimpl`::

    # my_backend/_plugin.py  (keep it import-light: no h5py/zarr/... here)
    from jasper.hookspecs import hookimpl

    @hookimpl
    def jasper_register_backends(register):
        register("npz", "my_backend.backend:NpzBackend", description="one .npz per dataset")

pluggy lets an implementation accept fewer arguments than its spec, so new arguments can be
added to a hook without breaking existing plugins.
"""

from __future__ import annotations

from typing import Protocol

import pluggy

PROJECT = "jasper"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class RegisterBackend(Protocol):
    """The ``register`` callable handed to :func:`jasper_register_backends`."""

    def __call__(
        self,
        name: str,
        class_path: str,
        *,
        description: str = "",
        url: str = "",
    ) -> None:
        """Register backend ``name`` implemented by the class at ``"module:Class"``.

        The class is imported only when the backend is used, so listing backends never imports
        a backend's heavy dependencies.
        """


@hookspec
def jasper_register_backends(register: RegisterBackend) -> None:
    """Register the storage backends this plugin provides by calling ``register`` once each."""
