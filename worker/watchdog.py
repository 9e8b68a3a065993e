"""Per-job progress and the stall deadline: a job with no page fetched or written for
JOB_STALL_TIMEOUT_S is cancelled and handed back as transient; ``/livez`` fails while any job is
past the deadline, so a pod whose job cannot even be cancelled is restarted.

A job is watched by wrapping it in :meth:`Watchdog.watch`; anything it runs (including tasks it
starts, which copy its context) reports progress with :func:`progress`. :meth:`Watchdog.check` is
the whole decision, on an injected clock; the watchdog's own task only calls it periodically.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import TracebackType

from worker import metrics
from worker.errors import JobStalled
from worker.logs import get_logger

log = get_logger(__name__)

_current: ContextVar[JobWatch | None] = ContextVar("watched_job", default=None)


def progress() -> None:
    """The job this code runs for made progress (a page fetched or written); a no-op outside a watch."""
    watch = _current.get()
    if watch is not None:
        watch.last_progress_s = watch.dog.clock()


def watching() -> bool:
    """True inside a watched job (a nested watch would hide the outer one's progress)."""
    return _current.get() is not None


@dataclass(frozen=True, slots=True)
class Stall:
    """A job past its deadline: no progress for ``no_progress_s``."""

    job_id: str
    no_progress_s: float


class JobWatch:
    """One watched job (a sync context manager around the job's awaits, in the task that runs it).

    On exit, a cancellation the watchdog asked for becomes :class:`JobStalled`; any other cancellation
    (shutdown) stays a cancellation, as :func:`asyncio.timeout` tells its own from others'.
    """

    def __init__(self, dog: Watchdog, job_id: str) -> None:
        self.dog = dog
        self.job_id = job_id
        self.last_progress_s = dog.clock()
        self.cancel_requested = False
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._token: Token[JobWatch | None] | None = None

    def __enter__(self) -> JobWatch:
        self._task = asyncio.current_task()
        if self._task is None:
            raise RuntimeError("a job is watched from inside a task")
        self._cancelling = self._task.cancelling()
        self._token = _current.set(self)
        self.dog._watches.add(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.dog._watches.discard(self)
        if self._token is not None:
            _current.reset(self._token)
        # Our cancel() is balanced whatever happened (uncancel runs before the type test); only a
        # cancellation nobody else asked for too is ours to turn into JobStalled.
        if (self.cancel_requested and self._task is not None and self._task.uncancel() <= self._cancelling
                and exc_type is asyncio.CancelledError):
            raise JobStalled(self.stall_reason()) from exc

    def stall_reason(self) -> str:
        return (f"stalled: no page fetched or written for {self.dog.stall_timeout_s:g} s (JOB_STALL_TIMEOUT_S); "
                "the job was cancelled and handed back")

    def no_progress_s(self) -> float:
        return self.dog.clock() - self.last_progress_s

    def cancel(self) -> None:
        if not self.cancel_requested and self._task is not None:
            self.cancel_requested = True
            self._task.cancel(f"job {self.job_id} stalled")


class Watchdog:
    """Watches running jobs; cancels one that made no progress for ``stall_timeout_s``.

    ``async with watchdog:`` runs the periodic check; without it, :meth:`check` is called by hand
    (tests, with a fake clock).
    """

    def __init__(self, stall_timeout_s: float, *, clock: Callable[[], float] = time.monotonic,
                 check_interval_s: float | None = None) -> None:
        self.stall_timeout_s = stall_timeout_s
        self.clock = clock
        # A stall is noticed within a tenth of the timeout, but the check never spins nor dozes.
        self.check_interval_s = check_interval_s if check_interval_s is not None else \
            min(max(stall_timeout_s / 10, 0.05), 5.0)
        self._watches: set[JobWatch] = set()
        self._task: asyncio.Task[None] | None = None

    def watch(self, job_id: str) -> JobWatch:
        """``with watchdog.watch(job_id): await ...``: the job's progress is tracked and its deadline kept."""
        return JobWatch(self, job_id)

    def stalled(self) -> list[Stall]:
        """Jobs without progress for longer than the timeout, still running (cancelled or not), oldest first."""
        stalls = [Stall(w.job_id, round(w.no_progress_s(), 1)) for w in self._watches
                  if w.no_progress_s() > self.stall_timeout_s]
        return sorted(stalls, key=lambda s: -s.no_progress_s)

    def check(self) -> list[Stall]:
        """Cancel every job past its deadline not cancelled yet; returns those it cancelled now."""
        cancelled: list[Stall] = []
        for w in list(self._watches):
            age_s = w.no_progress_s()
            if age_s > self.stall_timeout_s and not w.cancel_requested:
                log.warning("job stalled: cancelling it", job_id=w.job_id, no_progress_s=round(age_s, 1),
                            stall_timeout_s=self.stall_timeout_s)
                w.cancel()
                cancelled.append(Stall(w.job_id, round(age_s, 1)))
        metrics.JOBS_STALLED.set(len(self.stalled()))
        return cancelled

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            self.check()

    async def __aenter__(self) -> Watchdog:
        self._task = asyncio.create_task(self._run(), name="watchdog")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
