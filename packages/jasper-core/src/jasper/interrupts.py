"""Ctrl-C during library code that cannot take it.

A ``KeyboardInterrupt`` is raised wherever Python next runs bytecode after the signal: inside
h5py that can be a Cython callback or a destructor, where Python prints "Exception ignored ...
KeyboardInterrupt" and carries on, so an interrupted write would complete and exit 0.
:func:`deferred_interrupts` holds SIGINT while a library call runs and raises the
``KeyboardInterrupt`` at the writer's next :meth:`InterruptGate.check`, in plain Python code, so
the write stops there and core's atomic commit discards the partial directory.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class InterruptGate:
    """Records SIGINTs that arrive while it is installed; :meth:`check` raises for them."""

    def __init__(self) -> None:
        self.pending = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed since the gate was installed."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


@contextmanager
def deferred_interrupts() -> Iterator[InterruptGate]:
    """Install an :class:`InterruptGate` for SIGINT (main thread only; elsewhere signals cannot
    be handled and the gate never fires). On leaving, a pending interrupt is raised."""
    gate = InterruptGate()
    if threading.current_thread() is not threading.main_thread():
        yield gate
        return
    previous: Any = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        # the user (or a test runner) installed their own handler: leave it alone
        yield gate
        return
    signal.signal(signal.SIGINT, gate._handler)
    try:
        yield gate
    finally:
        signal.signal(signal.SIGINT, previous)
    gate.check()


__all__ = ["InterruptGate", "deferred_interrupts"]
