"""No transaction lasts as long as a job: a paced job is written page by page, and reports see it only whole.

The issue's case is a 30-page job at 1 call/s (no transaction open more than 15 s, half the job); scaled down
here to 5 pages at 4 calls/s (about a second), with the same bound relative to the job: no transaction of the
worker stays open for more than half of it. Meanwhile reporting.job_summary shows the job only once its last
page was fetched, and a re-ingest replaces the earlier one at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from tests.conftest import unique_job_id
from tests.helpers import runtime, stale_keys
from worker.config import Settings
from worker.local import synth
from worker.messages import JobRef

PAGES, PAGE_SIZE, TPS = 5, 40, 4.0

# The longest-open transaction of any other session on this database (the worker's), in seconds.
_LONGEST_XACT = """
SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0)::float8 FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
"""


async def _watch(db: asyncpg.Connection, job_id: str, emu: Any, done: asyncio.Event) -> list[tuple[float, int, int]]:
    """(longest open transaction s, Get* calls served, job_summary rows of the job) every 20 ms until ``done``."""
    seen = []
    while not done.is_set():
        longest = await db.fetchval(_LONGEST_XACT)
        # Calls first, then the view: a row seen in the view was switched in after the calls counted.
        calls = emu.stats()["succeeded"]
        shown = await db.fetchval("SELECT count(*) FROM reporting.job_summary WHERE job_id = $1", job_id)
        seen.append((longest, calls, shown))
        await asyncio.sleep(0.02)
    return seen


@pytest.mark.parametrize("kind", ["detection", "search"])
async def test_a_paced_job_holds_no_long_transaction_and_shows_only_when_whole(
        kind: str, emu: Any, settings: Settings, db: asyncpg.Connection) -> None:
    job_id = unique_job_id(f"paced-{kind}")
    n = PAGES * PAGE_SIZE
    first = (synth.detection_job(job_id, faces=n, seed=1) if kind == "detection"
             else synth.search_job(job_id, persons_elements=n, seed=1))
    emu.add_job(first)
    paced = settings.with_(rekognition_tps=TPS, page_size=PAGE_SIZE)
    async with asyncio.timeout(60), runtime(paced) as rt:
        for attempt in ("first", "again"):
            emu.reset_stats()
            done = asyncio.Event()
            watcher = asyncio.create_task(_watch(db, job_id, emu, done))
            started = time.monotonic()
            try:
                outcome = await rt.ingestor.ingest(JobRef.create(job_id, first.api))
            finally:
                done.set()
                seen = await watcher
            job_s = time.monotonic() - started
            assert outcome.outcome == "ingested" and outcome.pages == PAGES, outcome
            # Paced: the job took at least (pages - 1) / rate; no transaction lasted half of that.
            assert job_s >= (PAGES - 1) / TPS * 0.9, job_s
            longest = max(s[0] for s in seen)
            assert longest < job_s / 2, (attempt, longest, job_s)
            assert len(seen) > 10
            if attempt == "first":
                # Invisible while pages were coming in, then visible only after the last one was served.
                assert any(shown == 0 and 0 < calls < PAGES for _, calls, shown in seen), seen
                assert all(calls >= PAGES for _, calls, shown in seen if shown), seen
            else:
                # A re-ingest: the earlier ingest stays shown throughout, replaced at once at the end.
                assert all(shown == 1 for _, _, shown in seen), seen
    summary = await db.fetchrow("SELECT faces, attempts FROM reporting.job_summary WHERE job_id = $1", job_id)
    assert summary["faces"] == n and summary["attempts"] == 2
    # The first ingest's rows went after the switch: only the current key's rows remain.
    assert await stale_keys(db, job_id) == []
    assert await db.fetchval("SELECT count(*) FROM faces") == n
