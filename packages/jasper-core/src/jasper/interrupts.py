"""Ctrl-C during a write: held while library code runs, raised at jasper's own checkpoints.

A ``KeyboardInterrupt`` is raised wherever Python next runs bytecode after the signal. During a
write that is often inside a C extension that cannot take it, and some of them discard it:

- h5py runs Python in Cython callbacks and destructors, where Python prints "Exception
  ignored ... KeyboardInterrupt" and carries on;
- a C extension module being imported on first use (a write imports numpy.random, h5py, the
  backend's modules): numpy.random's Cython module initialisation calls
  ``collections.abc``'s ``register`` and ignores what it raises, so an interrupt landing there
  vanishes without a word.

Either way the interrupted write ran to the end and exited 0. :func:`deferred_interrupts` (used
by every write path: ``write_synthetic``, ``convert``, ``write_store`` and its atomic directory)
therefore only records a SIGINT while it is installed; the ``KeyboardInterrupt`` is raised by
:func:`checkpoint` (between the chunks core passes to a backend writer, before a commit, on
leaving the write), always in jasper's plain Python code, so the write stops there and the
atomic commit discards the partial directory. A second Ctrl-C while one is pending raises at
once (for a library call that runs long without reaching a checkpoint); the first stays
pending, so even if that one is swallowed too, the next checkpoint raises.

Gates nest: an inner write path shares the outer one's gate. Outside the main thread signals
cannot be handled and no gate is installed; a SIGINT handler of the user's own (or of a test
runner, or a notebook) is left alone.
"""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")


class InterruptGate:
    """Records SIGINTs that arrive while it is installed; :meth:`check` raises for them."""

    def __init__(self) -> None:
        self.pending = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.pending:  # pressed again: the user means now (the first stays pending)
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed since the gate was installed."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


#: the gate installed by the outermost :func:`deferred_interrupts` of the main thread
_ACTIVE: list[InterruptGate] = []


def checkpoint() -> None:
    """Raise a Ctrl-C held by the active gate (no-op when none is installed, or elsewhere than
    in the main thread). Call it where stopping is safe: between chunks, before a commit."""
    if _ACTIVE and threading.current_thread() is threading.main_thread():
        _ACTIVE[-1].check()


@contextmanager
def deferred_interrupts() -> Iterator[InterruptGate]:
    """Hold SIGINT for the block (main thread only) and raise it at :func:`checkpoint` /
    :meth:`InterruptGate.check`; on leaving, a pending interrupt is raised. Inside another
    ``deferred_interrupts`` block, the outer gate is shared."""
    if threading.current_thread() is not threading.main_thread():
        yield InterruptGate()  # signals go to the main thread; this gate never fires
        return
    previous: Any = signal.getsignal(signal.SIGINT)
    if _ACTIVE and previous == _ACTIVE[-1]._handler:  # nested: share the outer gate
        gate = _ACTIVE[-1]
        yield gate
        gate.check()
        return
    if previous is not signal.default_int_handler:
        # the user (or a test runner) installed their own handler: leave it alone
        yield InterruptGate()
        return
    gate = InterruptGate()
    signal.signal(signal.SIGINT, gate._handler)
    _ACTIVE.append(gate)
    try:
        yield gate
    finally:
        _ACTIVE.remove(gate)
        signal.signal(signal.SIGINT, previous)
    gate.check()


def holds_interrupts(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` under :func:`deferred_interrupts` (the decorator of jasper's write paths)."""
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with deferred_interrupts():
            return fn(*args, **kwargs)
    return wrapper


__all__ = ["InterruptGate", "checkpoint", "deferred_interrupts", "holds_interrupts"]
