"""Rekognition's 7-day clock: the oldest pending job in the database, and as this process sees it.

The database's clock (:func:`watch_pending_jobs`) covers every job whose notification any replica ever
received and that is neither ingested nor failed, including jobs whose messages nobody is receiving any
more (waiting out a backoff, or in the dead-letter queue). The in-process clock below is kept for what
only it knows: the notifications this replica holds right now.

Rekognition keeps a job's results for 7 days after the job completes (the notification's ``Timestamp``).
A requeued message carries the same body, so the clock survives re-sends, unlike the age of the SQS
message. This process knows the notifications it has received and not settled as done; Prometheus takes
the maximum over replicas. (A job whose message nobody has received for a while is not counted: the
queue's own age metric covers that.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from worker import metrics
from worker.logs import get_logger

log = get_logger(__name__)

RESULTS_RETENTION_S = 7 * 24 * 3600
# Distinct pending jobs remembered; past this the newest are forgotten first (the oldest matter).
MAX_TRACKED_JOBS = 10_000


class NotificationClock:
    """Completion times (ms) of the jobs whose notifications are pending in this process."""

    def __init__(self, *, wall_clock_s: Callable[[], float] = time.time) -> None:
        self._wall_clock_s = wall_clock_s
        self._completed_ms: dict[str, int] = {}

    def seen(self, job_id: str, completed_at_ms: int | None) -> None:
        """A notification for ``job_id`` was received; its first completion time is kept."""
        if completed_at_ms is None or job_id in self._completed_ms:
            return
        if len(self._completed_ms) >= MAX_TRACKED_JOBS:
            newest = max(self._completed_ms, key=self._completed_ms.__getitem__)
            if self._completed_ms[newest] <= completed_at_ms:
                return
            del self._completed_ms[newest]
        self._completed_ms[job_id] = completed_at_ms
        self.publish()

    def done(self, job_id: str) -> None:
        """The job is ingested, a duplicate or failed: its results no longer matter here."""
        if self._completed_ms.pop(job_id, None) is not None:
            self.publish()

    def oldest_age_s(self) -> float:
        if not self._completed_ms:
            return 0.0
        return max(0.0, self._wall_clock_s() - min(self._completed_ms.values()) / 1000)

    def publish(self) -> None:
        metrics.OLDEST_PENDING_NOTIFICATION_AGE.set(self.oldest_age_s())


async def watch_pending_jobs(oldest_age_s: Callable[[], Awaitable[float]], interval_s: float,
                             stopping: asyncio.Event) -> None:
    """Until ``stopping``: the oldest pending job's age (``Store.oldest_pending_age_s``) into its gauge,
    every ``interval_s``. A failed read keeps the last value, so an alert on it neither fires nor clears
    on a database outage (the readiness probe reports that)."""
    while not stopping.is_set():
        try:
            metrics.OLDEST_PENDING_JOB_AGE.set(await oldest_age_s())
        except Exception as exc:  # the database or the network: logged, tried again next round
            log.warning("oldest pending job unavailable", error=f"{type(exc).__name__}: {exc}"[:300])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await stopping.wait()
