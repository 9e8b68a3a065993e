"""Every job ends: a writer that fails, or a job cancelled, while result pages wait in the prefetch queue
returns promptly and leaves no open transaction and no advisory lock behind; a job another process is
writing costs no Rekognition call.

How a job is wedged: tests/wedges.py.
"""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from rich.console import Console

from tests.conftest import unique_job_id
from tests.helpers import dump_job, runtime
from tests.reliability import (
    WorkerProcess,
    clean_dump,
    create_database,
    drop_database,
    queue_counts,
    take_all,
    worker_env,
)
from tests.wedges import (
    PAGE_SIZE,
    PREFETCH,
    QUEUE_FULL_CALLS,
    Blocker,
    Blockers,
    add_job,
    assert_nothing_left_open,
    ends_within,
    pages_queued,
    terminate_worker_sessions,
)
from worker.backfill import run_backfill
from worker.config import Settings
from worker.local import synth
from worker.local.sqs import create_queue_with_dlq, notification, sns_envelope
from worker.messages import JobRef


@pytest.fixture
def small_pages(settings: Settings) -> Settings:
    return settings.with_(page_size=PAGE_SIZE, prefetch_pages=PREFETCH)


@pytest.fixture
async def blockers(db_url: str) -> AsyncIterator[Callable[[str], Awaitable[Blocker]]]:
    async with Blockers(db_url) as hold:
        yield hold


# --- 1. every job ends ---------------------------------------------------------------------------------


async def test_writer_failing_with_pages_queued_ends_the_job(
    emu: Any, small_pages: Settings, db: asyncpg.Connection, blockers: Callable[[str], Awaitable[Blocker]],
) -> None:
    ref = add_job(emu, "writerfails")
    blocker = await blockers(ref.job_id)
    async with runtime(small_pages) as rt:
        job = asyncio.create_task(rt.ingestor.ingest(ref))
        await pages_queued(emu, db)
        assert await terminate_worker_sessions(db) >= 1  # the database drops the connection mid-write
        outcome = (await ends_within(job, 10)).result()
        assert outcome.outcome == "transient", outcome
        await assert_nothing_left_open(db)
        await blocker.release()
        again = await rt.ingestor.ingest(ref)
    assert again.outcome == "ingested" and again.faces == 200


async def test_cancelling_a_job_with_pages_queued_finishes_promptly(
    emu: Any, small_pages: Settings, db: asyncpg.Connection, blockers: Callable[[str], Awaitable[Blocker]],
) -> None:
    ref = add_job(emu, "cancelled")
    await blockers(ref.job_id)
    async with runtime(small_pages) as rt:
        job = asyncio.create_task(rt.ingestor.ingest(ref))
        await pages_queued(emu, db)
        job.cancel()  # as the service does when the shutdown grace period is over
        assert (await ends_within(job, 10)).cancelled()
        await assert_nothing_left_open(db)
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE job_id = $1", ref.job_id) == 0


async def test_ingest_many_ends_when_a_writer_fails_with_pages_queued(
    emu: Any, small_pages: Settings, db: asyncpg.Connection, blockers: Callable[[str], Awaitable[Blocker]],
) -> None:
    refs = [add_job(emu, "many-a", seed=2), add_job(emu, "many-b", seed=3)]
    for ref in refs:
        await blockers(ref.job_id)
    async with runtime(small_pages) as rt:
        batch = asyncio.create_task(rt.ingestor.ingest_many(refs, concurrency=2))
        await pages_queued(emu, db, calls=2 * QUEUE_FULL_CALLS, writers=2)
        assert await terminate_worker_sessions(db) >= 2
        outcomes = (await ends_within(batch, 10)).result()
        assert [o.outcome for o in outcomes] == ["transient", "transient"], outcomes
        await assert_nothing_left_open(db)


async def test_cancelling_ingest_many_with_pages_queued_finishes_promptly(
    emu: Any, small_pages: Settings, db: asyncpg.Connection, blockers: Callable[[str], Awaitable[Blocker]],
) -> None:
    refs = [add_job(emu, "many-c", seed=4), add_job(emu, "many-d", seed=5)]
    for ref in refs:
        await blockers(ref.job_id)
    async with runtime(small_pages) as rt:
        batch = asyncio.create_task(rt.ingestor.ingest_many(refs, concurrency=2))
        await pages_queued(emu, db, calls=2 * QUEUE_FULL_CALLS, writers=2)
        batch.cancel()
        assert (await ends_within(batch, 10)).cancelled()
        await assert_nothing_left_open(db)


# --- 3. a busy job spends no quota --------------------------------------------------------------------


async def test_job_locked_by_another_process_is_busy_without_a_rekognition_call(
    emu: Any, settings: Settings, db: asyncpg.Connection, db_url: str,
) -> None:
    ref = add_job(emu, "locked", faces=30)
    other = await asyncpg.connect(db_url)  # another process, writing the job
    try:
        await other.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", ref.job_id)
        async with runtime(settings) as rt:
            async with asyncio.timeout(10):
                outcome = await rt.ingestor.ingest(ref)
            assert outcome.outcome == "busy", outcome
            assert emu.stats()["requests"] == 0, "a busy job must not spend Rekognition quota"
            await other.execute("SELECT pg_advisory_unlock_all()")
            async with asyncio.timeout(10):
                again = await rt.ingestor.ingest(ref)
    finally:
        await other.close()
    assert again.outcome == "ingested" and again.faces == 30


async def test_lock_check_sees_exactly_the_jobs_own_lock(settings: Settings, db_url: str) -> None:
    """The 64-bit key splits into pg_locks' two 32-bit columns, negative keys (half of them) included."""
    rng = random.Random(13)
    holder = await asyncpg.connect(db_url)
    try:
        async with runtime(settings) as rt:
            job_ids = [unique_job_id("k") for _ in range(40)] + ["a", "Z" * 64, "0", "-_-"]
            negative = 0
            for job_id in job_ids:
                negative += await holder.fetchval("SELECT hashtextextended($1, 0) < 0", job_id)
                other = job_id[:-1] + rng.choice("xyz") if len(job_id) > 1 else job_id + "x"
                assert not await rt.store.locked_elsewhere(job_id)
                await holder.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", job_id)
                assert await rt.store.locked_elsewhere(job_id), job_id
                assert not await rt.store.locked_elsewhere(other), (job_id, other)
                await holder.execute("SELECT pg_advisory_unlock_all()")
            assert 0 < negative < len(job_ids)
    finally:
        await holder.close()


# --- 4. done when: the database drops the worker's connections mid-job ------------------------------------


@pytest.fixture
async def reference_db(pg_server_url: str, template_db: str) -> AsyncIterator[str]:
    url = await create_database(pg_server_url, template_db)
    yield url
    await drop_database(pg_server_url, url)


async def test_backfill_whose_connections_are_dropped_mid_job_ends_and_a_rerun_is_one_clean_ingest(
    emu: Any, small_pages: Settings, db: asyncpg.Connection, reference_db: str,
    blockers: Callable[[str], Awaitable[Blocker]],
) -> None:
    fx = synth.detection_job(unique_job_id("dropped"), faces=300, attributes="ALL", seed=7)
    emu.add_job(fx)
    ref = JobRef.create(fx.job_id, fx.api)
    blocker = await blockers(ref.job_id)
    console = Console(file=io.StringIO())
    run = asyncio.create_task(run_backfill(small_pages, [ref], console=console))
    await pages_queued(emu, db)
    assert await terminate_worker_sessions(db) >= 1
    await blocker.release()
    first = (await ends_within(run, 30)).result()  # the run ends by itself (its second round ingests the job)
    assert [o.outcome for o in first] == ["ingested"], first
    await assert_nothing_left_open(db)
    async with asyncio.timeout(30):
        rerun = await run_backfill(small_pages, [ref], console=console)
    assert [o.outcome for o in rerun] == ["ingested"], rerun
    expected = await clean_dump(small_pages, reference_db, ref)
    assert await dump_job(db, ref.job_id) == expected
    assert len(expected["faces"]) == 300


@pytest.mark.slow
async def test_sqs_worker_whose_connections_are_dropped_mid_job_ends_and_the_job_is_one_clean_ingest(
    emu: Any, small_pages: Settings, db_url: str, db: asyncpg.Connection, sqs: Any, moto_url: str,
    reference_db: str, blockers: Callable[[str], Awaitable[Blocker]],
) -> None:
    fx = synth.detection_job(unique_job_id("dropped-sqs"), faces=300, attributes="ALL", seed=8)
    emu.add_job(fx)
    ref = JobRef.create(fx.job_id, fx.api)
    queue_url, dlq_url = await create_queue_with_dlq(sqs, unique_job_id("ends"), visibility_timeout_s=3,
                                                     max_receive_count=5)
    await sqs.send_message(QueueUrl=queue_url, MessageBody=sns_envelope(notification(fx)))
    blocker = await blockers(ref.job_id)
    worker = WorkerProcess(["run", "--exit-when-idle"], worker_env(
        DATABASE_URL=db_url, QUEUE_URL=queue_url, AWS_ENDPOINT_URL_SQS=moto_url,
        AWS_ENDPOINT_URL_REKOGNITION=emu.url, PAGE_SIZE=str(PAGE_SIZE), PREFETCH_PAGES=str(PREFETCH)))
    try:
        await pages_queued(emu, db)
        assert await terminate_worker_sessions(db) >= 1
        await blocker.release()
        # The job ends by itself, its message comes back after the transient delay (10 s) and the
        # second delivery ingests it; then the queue is empty and the worker exits.
        rc = await asyncio.to_thread(worker.wait, 60)
    finally:
        worker.kill()
    assert rc == 0, worker.output()[-3000:]
    assert [e.get("outcome") for e in worker.events("job finished")] == ["transient", "ingested"]
    expected = await clean_dump(small_pages, reference_db, ref)
    assert await dump_job(db, ref.job_id) == expected
    assert await db.fetchval("SELECT attempts FROM jobs WHERE job_id = $1", ref.job_id) == 1
    await assert_nothing_left_open(db)
    assert await queue_counts(sqs, queue_url) == (0, 0, 0)
    assert await take_all(sqs, dlq_url) == []
