"""Run one case in its own forked process under a timeout and an address-space cap, and classify
how it ended.

The campaign's parent process imports torch and every backend once and then forks one child per
case: a fresh interpreter per case would cost seconds of imports each, a fork costs milliseconds,
and each case still has its own process (its own crash, its own memory limit, its own signals).
The parent never opens a dataset itself and keeps torch to one thread, so forking is safe.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import resource
import select
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Outcome(enum.StrEnum):
    """How a case ended (see the package docstring for each meaning)."""

    OK = "ok"
    TYPED = "typed"
    UNTYPED = "untyped"
    CRASH = "crash"
    HANG = "hang"
    SILENT_WRONG = "silent-wrong"
    UNDETECTED = "undetected"
    LOST = "lost"
    LEFTOVER = "leftover"
    CANARY = "canary"


#: outcomes the campaign's goal allows; every other one is a finding
GOOD = frozenset({Outcome.OK, Outcome.TYPED, Outcome.UNDETECTED})


class Verdict(Exception):
    """Raised (or returned) by a case body to report a non-exception outcome such as data served
    wrong or a dataset lost; ``detail`` says exactly what."""

    def __init__(self, outcome: Outcome, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


@dataclass
class Case:
    """One scenario: ``body(workdir)`` runs in the child; it returns normally for ``ok``, raises
    :class:`Verdict` for a classified non-error outcome, or raises whatever the code under test
    raised (classified typed/untyped).

    ``expect`` documents what the case needs of the code under test; ``known`` names the issue
    item a currently failing case belongs to (set by :mod:`reliability.known`)."""

    family: str
    backend: str
    name: str
    mode: str
    body: Callable[[Path], None]
    timeout: float = 20.0
    mem_cap: int = 2 << 30

    @property
    def key(self) -> str:
        return f"{self.family}/{self.backend}/{self.name}/{self.mode}"


@dataclass
class Result:
    """The classified end of one case."""

    key: str
    family: str
    backend: str
    name: str
    mode: str
    outcome: Outcome
    exception: str = ""
    message: str = ""
    seconds: float = 0.0
    where: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["outcome"] = self.outcome.value
        return d


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _jasper_error(exc: BaseException) -> bool:
    from jasper.errors import JasperError

    return isinstance(exc, JasperError)


def _innermost_frame(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(tb):
        if "/reliability/" not in frame.filename:
            return f"{frame.filename.rsplit('/src/', 1)[-1]}:{frame.lineno} {frame.name}"
    return f"{tb[-1].filename}:{tb[-1].lineno}" if tb else ""


def _child(case: Case, workdir: Path, wfd: int) -> None:
    """The forked child: cap memory, run the body, report one JSON line, exit without cleanup."""
    status: dict[str, Any]
    try:
        os.setpgid(0, 0)  # the parent kills the whole group on timeout (grandchildren too)
        log = os.open(workdir / "case.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        limit = _vm_size() + case.mem_cap
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the campaign's own handler is not ours
        case.body(workdir)
        status = {"outcome": Outcome.OK.value}
    except Verdict as v:
        status = {"outcome": v.outcome.value, "message": v.detail[:2000]}
    except BaseException as exc:  # every exception is a classified outcome
        status = {
            "outcome": (Outcome.TYPED if _jasper_error(exc) else Outcome.UNTYPED).value,
            "exception": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "message": str(exc)[:2000],
            "where": _innermost_frame(exc),
        }
    try:
        os.write(wfd, (json.dumps(status) + "\n").encode())
    finally:
        os._exit(0)


@dataclass
class _Running:
    case: Case
    workdir: Path
    pid: int
    rfd: int
    t0: float
    #: the case's timeout stretched by the machine's load when it started (:func:`load_factor`)
    allowed: float = 0.0
    data: bytes = b""

    @property
    def deadline(self) -> float:
        return self.t0 + self.allowed


def load_factor() -> float:
    """How much slower than on an idle machine a case may run: the 1-minute load average per
    CPU, at least 1. A case on a machine busy with other work gets as much CPU in its stretched
    timeout as it would in its plain one idle, so "hang" means a case that stopped making
    progress, not one that waited for a CPU."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not every platform reports a load average
        return 1.0
    return max(1.0, load / (os.cpu_count() or 1))


def _start(case: Case, workdir: Path) -> _Running:
    workdir.mkdir(parents=True, exist_ok=True)
    rfd, wfd = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        os.close(rfd)
        _child(case, workdir, wfd)
    os.close(wfd)
    with contextlib.suppress(OSError):  # the child already did (or already exited)
        os.setpgid(pid, pid)
    return _Running(case, workdir, pid, rfd, t0, allowed=case.timeout * load_factor())


def _finish(run: _Running, timed_out: bool) -> Result:
    os.close(run.rfd)
    if timed_out:
        _kill_group(run.pid)
    _, status = os.waitpid(run.pid, 0)
    _kill_group(run.pid)  # grandchildren a case body left behind
    case, workdir = run.case, run.workdir
    res = Result(case.key, case.family, case.backend, case.name, case.mode, Outcome.OK,
                 seconds=round(time.monotonic() - run.t0, 3))
    if timed_out:
        res.outcome = Outcome.HANG
        res.message = (f"no result within {run.allowed:.0f} s ({case.timeout:.0f} s stretched "
                       f"by the load); last log: {_log_tail(workdir)}")
        return res
    line = run.data.decode(errors="replace").strip().splitlines()
    if not line:
        res.outcome = Outcome.CRASH
        if os.WIFSIGNALED(status):
            res.exception = f"signal {signal.Signals(os.WTERMSIG(status)).name}"
        else:
            res.exception = f"exit {os.WEXITSTATUS(status)}"
        res.message = _log_tail(workdir)
        return res
    info = json.loads(line[-1])
    res.outcome = Outcome(info["outcome"])
    res.exception = info.get("exception", "")
    res.message = info.get("message", "")
    res.where = info.get("where", "")
    return res


def run_cases(cases: list[tuple[Case, Path]], jobs: int = 1,
              on_result: Callable[[int, Result], None] | None = None) -> list[Result]:
    """Run every (case, workdir), at most ``jobs`` at a time, each in its own forked process
    under its own timeout; results in the order of ``cases``."""
    results: list[Result | None] = [None] * len(cases)
    pending = list(enumerate(cases))
    running: dict[int, tuple[int, _Running]] = {}  # rfd -> (index, run)
    while pending or running:
        while pending and len(running) < max(1, jobs):
            i, (case, workdir) = pending.pop(0)
            run = _start(case, workdir)
            running[run.rfd] = (i, run)
        now = time.monotonic()
        wait = min(r.deadline for _, r in running.values()) - now
        ready, _, _ = select.select(list(running), [], [], max(0.0, wait))
        done: list[tuple[int, _Running, bool]] = []
        for fd in ready:
            i, run = running[fd]
            chunk = os.read(fd, 65536)
            if chunk:
                run.data += chunk
            else:
                done.append((i, run, False))
        now = time.monotonic()
        for i, run in list(running.values()):
            if now >= run.deadline and all(d[1] is not run for d in done):
                done.append((i, run, True))
        for i, run, timed_out in done:
            del running[run.rfd]
            res = _finish(run, timed_out)
            results[i] = res
            if on_result is not None:
                on_result(i, res)
    return [r for r in results if r is not None]


def run_case(case: Case, workdir: Path) -> Result:
    """Fork, run ``case`` in ``workdir`` (created fresh), wait at most ``case.timeout`` seconds."""
    return run_cases([(case, workdir)])[0]


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _log_tail(workdir: Path, n: int = 600) -> str:
    try:
        text = (workdir / "case.log").read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text[-n:].strip().splitlines()[-6:])
