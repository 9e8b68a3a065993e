"""Rekognition's 7-day clock: the age of the oldest pending job, read from the database.

Rekognition keeps a job's results for 7 days after the job completes (the notification's ``Timestamp``).
The worker records each notified job as pending with that time (re-sent copies keep the first), so the
database's clock covers every job any replica was notified of and that is neither ingested nor failed,
including jobs whose messages nobody is receiving (waiting out a backoff, or in the dead-letter queue).
Every replica reads the same value.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from worker import metrics
from worker.logs import get_logger

log = get_logger(__name__)


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
