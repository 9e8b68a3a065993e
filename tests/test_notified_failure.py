"""A notification's Status FAILED or ERROR is a claim; only Rekognition's own JobStatus may fail a job.

Issue 20 item 1: a forged (or stray) `{"JobId": <ingested job>, "Status": "FAILED"}` used to delete the
job's rows and raw pages. Now Get* decides: FAILED records the failure, SUCCEEDED makes the message a
completion (ingested, or settled as a duplicate), no answer from Rekognition is transient and records
nothing. Real components throughout: moto's SQS, the emulator over HTTP, PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
from test_service_support import (
    Queues,
    detection,
    enveloped,
    job_row,
    plain,
    queue_counts,
    raw,
    search,
    send,
    snapshot,
)

from worker.config import Settings
from worker.runtime import open_runtime
from worker.service import RetryPolicy, SqsWorker, describe_queue

FAST = RetryPolicy(busy_base_s=1, busy_cap_s=1, transient_base_s=1, transient_cap_s=1)
DEADLINE_S = 60.0


def _settings(settings: Settings, queues: Queues) -> Settings:
    return settings.with_(queue_url=queues.url, poll_wait_s=1, visibility_timeout_s=2, heartbeat_interval_s=0.5,
                          not_ready_delay_s=1, not_ready_max_delay_s=2, shutdown_grace_s=5.0, health_port=0,
                          page_size=25)


async def _drain(settings: Settings, sqs: Any) -> SqsWorker:
    assert settings.queue_url is not None
    async with open_runtime(settings) as rt:
        worker = SqsWorker(settings, rt, sqs, await describe_queue(sqs, settings.queue_url), retry_policy=FAST)
        assert await asyncio.wait_for(worker.run(exit_when_idle=True), DEADLINE_S) == 0
    return worker


def _later_ms() -> int:
    """A notification Timestamp after any ingest so far: not recognisable as a duplicate by its time."""
    return int(time.time() * 1000) + 60_000


async def _forget(database_url: str, job_id: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DELETE FROM jobs WHERE job_id = $1", job_id)  # the trigger takes every row with it
        await conn.execute("INSERT INTO jobs (job_id, api, ingest_state) VALUES ($1, 'FACE_DETECTION', 'pending')",
                           job_id)
    finally:
        await conn.close()


def _intact(row: dict[str, Any] | None) -> bool:
    return (row is not None and row["ingest_state"] == "ingested" and row["ingest_id"] is not None
            and row["job_status"] == "SUCCEEDED" and row["failure_code"] is None)


async def test_forged_failed_and_error_notifications_for_ingested_jobs_wipe_nothing(
    settings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    wsettings = _settings(settings, queues)
    det, found = detection(emu, "forged-det", faces=60), search(emu, "forged-search", elements=40)
    await send(sqs, queues.url, plain(det), plain(found))
    assert (await _drain(wsettings, sqs)).counters.by_outcome == {"ingested": 2}
    before = {fx.job_id: await snapshot(db_url, fx.job_id) for fx in (det, found)}
    assert all(len(s["faces"]) > 0 and len(s["raw_pages"]) > 1 for s in before.values())

    emu.reset_stats()
    await send(sqs, queues.url,
               raw(det, status="FAILED", timestamp_ms=_later_ms()),  # newer than the ingest
               enveloped(found, status="ERROR", timestamp_ms=_later_ms()),
               raw(det, status="ERROR"),  # older than the ingest
               enveloped(found, status="FAILED"))
    worker = await _drain(wsettings, sqs)
    outcomes = worker.counters.by_outcome
    # An ingested job SUCCEEDED at Rekognition: every such claim is a duplicate, settled without a Get* call.
    # (Two copies of one job at once in this worker: the second may be busy, and comes back as a duplicate.)
    assert set(outcomes) <= {"duplicate", "busy"} and outcomes["duplicate"] == 4, outcomes
    assert emu.stats()["requests"] == 0
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)
    for fx in (det, found):
        assert await snapshot(db_url, fx.job_id) == before[fx.job_id], fx.job_id
        assert _intact(await job_row(db_url, fx.job_id)), await job_row(db_url, fx.job_id)


async def test_failed_notification_while_rekognition_cannot_be_reached_records_nothing(
    settings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    wsettings = _settings(settings, queues)
    done, fresh = detection(emu, "unreachable-done", faces=30), detection(emu, "unreachable-fresh", faces=30, seed=3)
    await send(sqs, queues.url, plain(done))
    assert (await _drain(wsettings, sqs)).counters.by_outcome == {"ingested": 1}
    before = await snapshot(db_url, done.job_id)

    emu.configure(fault_rate=1.0)  # every Get* answers 500
    await send(sqs, queues.url, raw(done, status="FAILED", timestamp_ms=_later_ms()),
               raw(fresh, status="FAILED", timestamp_ms=_later_ms()))
    async with open_runtime(wsettings) as rt:
        worker = SqsWorker(wsettings, rt, sqs, await describe_queue(sqs, queues.url), retry_policy=FAST)
        task = asyncio.create_task(worker.run())
        try:
            async with asyncio.timeout(DEADLINE_S):
                while worker.counters.by_outcome.get("transient", 0) < 2:  # handed back, and again
                    await asyncio.sleep(0.1)
        finally:
            worker.request_stop()
            assert await asyncio.wait_for(task, 30) == 0
    # The ingested job's copy is a duplicate at once; the other one's status cannot be read: transient.
    assert set(worker.counters.by_outcome) <= {"transient", "duplicate"}, worker.counters.by_outcome
    assert await snapshot(db_url, done.job_id) == before
    assert _intact(await job_row(db_url, done.job_id))
    fresh_row = await job_row(db_url, fresh.job_id)
    assert fresh_row is not None and fresh_row["ingest_state"] == "pending" and fresh_row["failure_code"] is None

    emu.configure(fault_rate=0.0)  # Rekognition answers again: both are completions
    worker = await _drain(wsettings, sqs)
    assert "failed" not in worker.counters.by_outcome, worker.counters.by_outcome
    assert await snapshot(db_url, done.job_id) == before
    assert _intact(await job_row(db_url, done.job_id)) and _intact(await job_row(db_url, fresh.job_id))
    assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)


async def test_a_stray_failed_copy_waiting_on_the_lock_of_a_reingest_wipes_nothing(
    settings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    """Another replica holds the job's lock (its first ingest is running) when a FAILED copy arrives: the
    copy must neither wait to wipe the job once the lock is free nor record anything; Rekognition says the
    job SUCCEEDED, so once the lock is free the copy is a completion like any other."""
    wsettings = _settings(settings, queues)
    fx = detection(emu, "stray-failed", faces=60)
    await send(sqs, queues.url, plain(fx))
    assert (await _drain(wsettings, sqs)).counters.by_outcome == {"ingested": 1}
    before = await snapshot(db_url, fx.job_id)
    await _forget(db_url, fx.job_id)  # as before its first ingest finished: pending, nothing stored

    other_replica = await asyncpg.connect(db_url)
    try:
        assert await other_replica.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", fx.job_id)
        await send(sqs, queues.url, raw(fx, status="FAILED", timestamp_ms=_later_ms()))
        async with open_runtime(wsettings) as rt:
            worker = SqsWorker(wsettings, rt, sqs, await describe_queue(sqs, queues.url), retry_policy=FAST)
            task = asyncio.create_task(worker.run(exit_when_idle=True))
            async with asyncio.timeout(DEADLINE_S):
                while worker.counters.by_outcome.get("busy", 0) < 1:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.5)  # the copy is back in the queue, and perhaps taken again, meanwhile
            row = await job_row(db_url, fx.job_id)
            assert row is not None and row["ingest_state"] == "pending" and row["failure_code"] is None
            assert await other_replica.fetchval("SELECT pg_advisory_unlock(hashtextextended($1, 0))", fx.job_id)
            assert await asyncio.wait_for(task, DEADLINE_S) == 0
    finally:
        await other_replica.close()
    assert "failed" not in worker.counters.by_outcome, worker.counters.by_outcome
    assert await snapshot(db_url, fx.job_id) == before
    assert _intact(await job_row(db_url, fx.job_id))
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)
