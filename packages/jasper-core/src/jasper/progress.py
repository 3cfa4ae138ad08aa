"""Progress bars for long work (writes, conversion, synthesis, deep validation).

A bar shows when stderr is a terminal; ``progress=True``/``False`` forces it on or off and the
environment variable ``JASPER_PROGRESS=0`` turns every bar off.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jasper.envflags import switched_off


def progress_enabled(progress: bool | None) -> bool:
    if switched_off("JASPER_PROGRESS"):
        return False
    if progress is not None:
        return progress
    return sys.stderr.isatty()


@contextmanager
def byte_bar(total: int, desc: str, progress: bool | None) -> Iterator[Any]:
    """Yield an ``update(nbytes)`` callable backed by a tqdm bar, or a no-op."""
    if not progress_enabled(progress):
        yield lambda n: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              leave=False, file=sys.stderr) as bar:
        yield bar.update


@contextmanager
def count_bar(total: int, desc: str, progress: bool | None, unit: str = "it") -> Iterator[Any]:
    """Yield an ``update(n)`` callable for a counted task, or a no-op."""
    if not progress_enabled(progress):
        yield lambda n: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False,
              file=sys.stderr) as bar:
        yield bar.update
