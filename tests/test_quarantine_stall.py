"""A quarantine is watched like an ingest and a stall is a failure like any other (issue 20 item 2).

The pages of a job failed as MalformedPage, UnstorableValue or PaginationLoop are fetched again for the
archive: each one reports progress to the watchdog, so a long quarantine is not cancelled as stalled. A job
that stalls on every attempt counts toward MAX_IDENTICAL_FAILURES and ends failed, instead of being handed
back forever. Real PostgreSQL and the emulator over HTTP, its latency pacing the pages.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from tests.conftest import unique_job_id
from tests.helpers import count_rows, runtime
from worker.config import Settings
from worker.local import synth
from worker.messages import JobRef

pytestmark = pytest.mark.usefixtures("rekognition_endpoint")


async def test_a_quarantine_longer_than_the_stall_timeout_reports_progress_and_keeps_every_page(
    emu: Any, settings: Settings, db: asyncpg.Connection,
) -> None:
    fx = synth.detection_job(unique_job_id("long-quarantine"), faces=400)  # 16 pages of 25
    emu.add_job(fx)
    emu.configure(latency_s=0.3)  # the quarantine's 12 pages take about 4 s, any one page far less than 2 s
    settings = settings.with_(page_size=25, max_pages_per_job=12, job_stall_timeout_s=2.0)
    started = time.monotonic()
    async with asyncio.timeout(60), runtime(settings) as rt:
        outcome = await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))
    assert time.monotonic() - started > 2 * settings.job_stall_timeout_s  # the archive outlasted the timeout
    assert outcome.outcome == "failed" and "MAX_PAGES_PER_JOB=12" in (outcome.reason or ""), outcome
    assert "stalled" not in (outcome.reason or "")
    job = await db.fetchrow("SELECT * FROM jobs WHERE job_id = $1", fx.job_id)
    assert job["ingest_state"] == "failed" and job["failure_code"] == "PaginationLoop"
    assert (await count_rows(db, fx.job_id))["raw_pages"] == 12
    assert await db.fetchval("SELECT count(*) FROM job_retries WHERE job_id = $1", fx.job_id) == 0


async def test_a_job_that_stalls_on_every_attempt_ends_failed_after_max_identical_failures(
    emu: Any, settings: Settings, db: asyncpg.Connection,
) -> None:
    fx = synth.detection_job(unique_job_id("always-stalls"), faces=30)
    emu.add_job(fx)
    emu.configure(latency_s=4.0)  # every Get* far longer than the stall timeout
    settings = settings.with_(job_stall_timeout_s=1.0, max_identical_failures=2)
    ref = JobRef.create(fx.job_id, fx.api)
    async with asyncio.timeout(60), runtime(settings) as rt:
        first = await rt.ingestor.ingest(ref)
        assert first.outcome == "transient" and (first.reason or "").startswith("stalled:"), first
        retry = await db.fetchrow("SELECT * FROM job_retries WHERE job_id = $1", fx.job_id)
        assert retry is not None and retry["streak"] == 1 and "JobStalled" in retry["fingerprint"]
        second = await rt.ingestor.ingest(ref)
    # The second stall ends the job; its quarantine stalled as well, so it is recorded without pages.
    assert second.outcome == "failed", second
    job = await db.fetchrow("SELECT * FROM jobs WHERE job_id = $1", fx.job_id)
    assert job["ingest_state"] == "failed" and job["failure_code"] == "RepeatedFailure", dict(job)
    assert "the same error on 2 attempts in a row" in job["failure_reason"]
    assert await db.fetchval("SELECT count(*) FROM job_retries WHERE job_id = $1", fx.job_id) == 0
    assert set((await count_rows(db, fx.job_id)).values()) <= {0, 1}  # the jobs row, nothing else
