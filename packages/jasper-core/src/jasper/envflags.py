"""The one reading of jasper's on/off environment switches (``JASPER_PROGRESS=0``,
``JASPER_TUNE_MALLOC=0``, ``JASPER_BATCH_POOL=0``, ``JASPER_GC_FREEZE=0``)."""

from __future__ import annotations

import os

#: Values that switch a feature off (case-insensitive, surrounding spaces ignored).
OFF_VALUES = frozenset({"0", "false", "no", "off"})


def switched_off(name: str) -> bool:
    """Whether the environment variable ``name`` says to turn its feature off."""
    return os.environ.get(name, "").strip().lower() in OFF_VALUES


__all__ = ["OFF_VALUES", "switched_off"]
