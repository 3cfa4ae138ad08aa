"""Plugin entry points beyond backends: CLI commands and dataset builders.

Core never imports a backend package; a package adds to jasper through entry points, looked up
only when needed:

- ``jasper.commands``: ``name = "module:function"``; ``function(subparsers, common)`` adds
  sub-commands to the ``jasper`` CLI (``common`` is the parent parser with ``--debug`` and
  ``--no-progress``). Keep that module import-light: it is imported to build the parser.
- ``jasper.build_sources``: ``name = "module:function"``; a builder ``jasper build --from-NAME``
  calls as ``function(location, out, *, backend, overwrite, progress, config, options, kind)``.
"""

from __future__ import annotations

import argparse
import warnings
from importlib import metadata
from typing import Any

COMMANDS_GROUP = "jasper.commands"
BUILD_SOURCES_GROUP = "jasper.build_sources"


def plugin_function(group: str, name: str, install_hint: str) -> Any:
    """The object the entry point ``name`` of ``group`` names; a typed error with the install
    hint when no installed package provides it."""
    from jasper.errors import BackendNotFoundError

    for ep in metadata.entry_points(group=group):
        if ep.name == name:
            return ep.load()
    provided = [ep.name for ep in metadata.entry_points(group=group)]
    raise BackendNotFoundError(name, provided, install_hint)


def add_plugin_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Let every installed ``jasper.commands`` plugin add its sub-commands; a broken one is a
    warning, never a broken CLI."""
    for ep in metadata.entry_points(group=COMMANDS_GROUP):
        try:
            ep.load()(subparsers, common)
        except Exception as exc:
            from jasper.registry import JasperPluginWarning  # imports torch: only when needed

            warnings.warn(f"jasper CLI plugin {ep.name!r} ({ep.value}) failed to load: "
                          f"{type(exc).__name__}: {exc}", JasperPluginWarning, stacklevel=2)
