"""The 7-day clock in the database: a notification records its job pending with Rekognition's completion
time, re-sent copies keep the first time, an ingest or a failure ends pending and keeps it; the
reporting.pending_jobs view and the rekognition_worker_oldest_pending_job_age_seconds gauge read it."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY
from rich.console import Console
from test_service import FAST, drain, wsettings  # noqa: F401 - wsettings is a fixture
from test_service_support import Queues, detection, job_row, queue_counts, raw, send

from worker.config import Settings
from worker.db.engine import create_engine
from worker.db.store import Store
from worker.errors import NotFound
from worker.expiry import watch_pending_jobs
from worker.messages import JobRef, parse_message_body
from worker.normalize import JobMeta
from worker.report import run_report
from worker.runtime import open_runtime
from worker.service import SqsWorker, describe_queue

DAY_MS = 86_400_000


def _ms_ago(days: float) -> int:
    return int(time.time() * 1000 - days * DAY_MS)


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _ref(job_id: str, completed_ms: int | None) -> JobRef:
    body = {"JobId": job_id, "Status": "SUCCEEDED", "API": "StartFaceSearch", "JobTag": "tag-1",
            "Video": {"S3Bucket": "bucket", "S3ObjectName": "lobby.mp4"}}
    if completed_ms is not None:
        body["Timestamp"] = completed_ms
    return parse_message_body(orjson.dumps(body).decode())


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    engine = create_engine(settings)
    try:
        yield Store(engine)
    finally:
        await engine.dispose()


async def test_resent_notification_keeps_the_first_completion_time_and_the_view_shows_the_clock(
        store: Store, db: asyncpg.Connection) -> None:
    async with asyncio.timeout(20):
        first, later = _ms_ago(3), _ms_ago(1)
        await store.note_pending(_ref("clock-1", first))
        await store.note_pending(_ref("clock-1", later))  # a re-sent copy, stamped later
        row = await db.fetchrow("SELECT ingest_state::text AS state, completed_at, api::text AS api, job_tag, "
                                "video_bucket, video_name, attempts FROM jobs WHERE job_id = 'clock-1'")
        assert dict(row) == {"state": "pending", "completed_at": _at(first), "api": "FACE_SEARCH",
                             "job_tag": "tag-1", "video_bucket": "bucket", "video_name": "lobby.mp4", "attempts": 0}

        view = await db.fetchrow("SELECT * FROM reporting.pending_jobs WHERE job_id = 'clock-1'")
        assert view["completed_at"] == _at(first) and view["expires_at"] == _at(first) + timedelta(days=7)
        assert view["age_s"] == pytest.approx(3 * 86400, abs=60)
        assert view["video_uri"] == "s3://bucket/lobby.mp4"
        # Pending jobs are not finished jobs: job_summary (and every view built on ingested jobs) leaves them out.
        assert await db.fetchval("SELECT count(*) FROM reporting.job_summary WHERE job_id = 'clock-1'") == 0


async def test_pending_jobs_soonest_expiry_first_and_the_gauge_reads_the_oldest(
        store: Store, db: asyncpg.Connection) -> None:
    async with asyncio.timeout(20):
        assert await store.oldest_pending_age_s() == 0.0
        await store.note_pending(_ref("young", _ms_ago(1)))
        await store.note_pending(_ref("old", _ms_ago(5)))
        await store.note_pending(_ref("unknown-time", None))
        assert [r["job_id"] for r in await db.fetch("SELECT job_id FROM reporting.pending_jobs")] == [
            "old", "young", "unknown-time"]
        assert await store.oldest_pending_age_s() == pytest.approx(5 * 86400, abs=60)

        stopping = asyncio.Event()
        watcher = asyncio.create_task(watch_pending_jobs(store.oldest_pending_age_s, 0.05, stopping))
        try:
            deadline = time.monotonic() + 5
            while (REGISTRY.get_sample_value("rekognition_worker_oldest_pending_job_age_seconds") or 0) < 4 * 86400:
                assert time.monotonic() < deadline, "the gauge never read the oldest pending job"
                await asyncio.sleep(0.02)
            assert REGISTRY.get_sample_value("rekognition_worker_oldest_pending_job_age_seconds") == pytest.approx(
                5 * 86400, abs=60)
            # The oldest job fails: the clock moves on to the next one.
            await store.record_failure(_ref("old", None), code="JobFailed", reason="test")
            deadline = time.monotonic() + 5
            while (REGISTRY.get_sample_value("rekognition_worker_oldest_pending_job_age_seconds") or 0) > 2 * 86400:
                assert time.monotonic() < deadline, "the gauge kept a job that is no longer pending"
                await asyncio.sleep(0.02)
        finally:
            stopping.set()
            await asyncio.wait_for(watcher, 5)
        failed = await db.fetchrow("SELECT ingest_state::text AS state, completed_at FROM jobs WHERE job_id = 'old'")
        assert failed["state"] == "failed" and failed["completed_at"] is not None


async def test_ingest_ends_pending_keeps_the_completion_time_and_a_later_notification_leaves_it_ingested(
        settings: Settings, rekognition_endpoint: Any, db: asyncpg.Connection) -> None:
    fx = detection(rekognition_endpoint, faces=30)
    completed = _ms_ago(2)
    note = raw(fx, timestamp_ms=completed)
    async with asyncio.timeout(30), open_runtime(settings) as rt:
        ref = parse_message_body(note)
        await rt.store.note_pending(ref)
        assert await db.fetchval("SELECT count(*) FROM reporting.pending_jobs WHERE job_id = $1", fx.job_id) == 1
        assert (await rt.ingestor.ingest(ref)).outcome == "ingested"
        # A late copy of the notification: the job stays ingested, with its first completion time.
        await rt.store.note_pending(parse_message_body(raw(fx, timestamp_ms=_ms_ago(0))))
    row = await db.fetchrow("SELECT ingest_state::text AS state, completed_at FROM jobs WHERE job_id = $1", fx.job_id)
    assert dict(row) == {"state": "ingested", "completed_at": _at(completed)}
    assert await db.fetchval("SELECT count(*) FROM reporting.pending_jobs WHERE job_id = $1", fx.job_id) == 0
    assert await db.fetchval("SELECT ingest_state::text FROM reporting.job_summary WHERE job_id = $1",
                             fx.job_id) == "ingested"


async def test_failure_without_notification_keeps_an_earlier_completion_time(store: Store,
                                                                             db: asyncpg.Connection) -> None:
    async with asyncio.timeout(20):
        completed = _ms_ago(4)
        await store.note_pending(_ref("fails-later", completed))
        meta = JobMeta(job_status="FAILED", status_message="bad video", job_tag=None, video_bucket=None,
                       video_name=None, video_version=None, codec=None, duration_ms=None, video_format=None,
                       frame_rate=None, frame_height=None, frame_width=None, color_range=None, next_token=None,
                       response_job_id=None)
        await store.record_failure(JobRef.create("fails-later", "FACE_SEARCH"), code="JobFailed", reason="bad video",
                                   meta=meta, rekognition_failed=True)
        row = await db.fetchrow("SELECT ingest_state::text AS state, completed_at FROM jobs "
                                "WHERE job_id = 'fails-later'")
        assert dict(row) == {"state": "failed", "completed_at": _at(completed)}


async def test_service_records_the_clock_and_a_database_outage_loses_no_message(
        wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str) -> None:  # noqa: F811
    fx = detection(emu, faces=30)
    completed = _ms_ago(2)
    await send(sqs, queues.url, raw(fx, timestamp_ms=completed))
    # Nothing listens on port 1: every statement, the pending record first, fails to connect.
    down = wsettings.with_(database_url="postgresql://postgres@127.0.0.1:1/nowhere")
    async with asyncio.timeout(40):
        async with open_runtime(down) as rt:
            worker = SqsWorker(down, rt, sqs, await describe_queue(sqs, queues.url), retry_policy=FAST)
            task = asyncio.create_task(worker.run())
            while worker.counters.by_outcome.get("transient", 0) < 1:
                await asyncio.sleep(0.05)
            worker.request_stop()
            assert await asyncio.wait_for(task, 20) == 0
        assert sum(await queue_counts(sqs, queues.url)) == 1  # handed back, not lost
        assert sum(await queue_counts(sqs, queues.dlq_url)) == 0
        assert await job_row(db_url, fx.job_id) is None
        done = await drain(wsettings, sqs, timeout_s=30)
    assert done.counters.by_outcome == {"ingested": 1}
    row = await job_row(db_url, fx.job_id)
    assert row is not None and row["ingest_state"] == "ingested" and row["completed_at"] == _at(completed)


async def test_report_of_a_pending_job_says_it_is_pending(store: Store, settings: Settings) -> None:
    async with asyncio.timeout(20):
        await store.note_pending(_ref("not-yet", _ms_ago(1)))
        with pytest.raises(NotFound, match="pending"):  # exit 3: not ingested (yet)
            await run_report(settings, "not-yet", fmt="json", chart=None, console=Console(file=io.StringIO()))
