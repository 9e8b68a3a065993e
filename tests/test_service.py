"""The SQS worker (worker/service.py) against real components: moto's SQS server over HTTP (queue with a
dead-letter queue, 2 s visibility timeout, maxReceiveCount 2), the Rekognition emulator over HTTP and
PostgreSQL. Every outcome of a message is checked in the queue, the dead-letter queue and the database.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import aiohttp
import asyncpg
import pytest
import structlog
from prometheus_client import REGISTRY
from structlog.testing import capture_logs
from test_service_support import (
    POISON_BODIES,
    Queues,
    create_database,
    database_name,
    detection,
    drop_database,
    enveloped,
    job_row,
    plain,
    plain_backfill,
    queue_counts,
    raw,
    search,
    send,
    snapshot,
    stored_rows,
    take_all,
    unique_id,
)

from worker import logsafe
from worker.config import Settings
from worker.errors import ConfigError
from worker.health import HealthServer
from worker.local import synth
from worker.local.sqs import sns_envelope
from worker.runtime import open_runtime
from worker.service import (
    MAX_SEND_DELAY_S,
    MAX_VISIBILITY_S,
    Action,
    QueueInfo,
    RetryPolicy,
    SqsWorker,
    decide,
    describe_queue,
    retry_delay_s,
    run_service,
)

# Retry delays short enough for tests; production keeps the defaults (5 s busy, 10 s transient).
FAST = RetryPolicy(busy_base_s=1, busy_cap_s=2, transient_base_s=1, transient_cap_s=2)


# --- fixtures ------------------------------------------------------------------------------------




@pytest.fixture
def wsettings(settings: Settings, queues: Queues) -> Settings:
    # page_size 25: the small synthetic jobs still span several pages.
    return settings.with_(queue_url=queues.url, poll_wait_s=1, visibility_timeout_s=2, heartbeat_interval_s=0.5,
                          not_ready_delay_s=1, not_ready_max_delay_s=8, shutdown_grace_s=5.0, health_port=0,
                          page_size=25)


@pytest.fixture
async def reference_db(pg_server_url: str, template_db: str) -> AsyncIterator[str]:
    """A second fresh database, for what a plain backfill stores."""
    url = await create_database(pg_server_url, template_db)
    yield url
    await drop_database(pg_server_url, url)


@asynccontextmanager
async def running(settings: Settings, sqs: Any, *, exit_when_idle: bool = False,
                  policy: RetryPolicy = FAST) -> AsyncIterator[tuple[SqsWorker, asyncio.Task[int]]]:
    """A worker running in a task; on exit it is asked to stop (if still running) and must return 0."""
    assert settings.queue_url is not None
    async with open_runtime(settings) as rt:
        worker = SqsWorker(settings, rt, sqs, await describe_queue(sqs, settings.queue_url), retry_policy=policy)
        task = asyncio.create_task(worker.run(exit_when_idle=exit_when_idle))
        try:
            yield worker, task
        finally:
            worker.request_stop()
            assert await asyncio.wait_for(task, 30) == 0


async def drain(settings: Settings, sqs: Any, *, policy: RetryPolicy = FAST, timeout_s: float = 40) -> SqsWorker:
    """Run a worker with exit_when_idle until the queue is empty; it must return 0."""
    assert settings.queue_url is not None
    async with open_runtime(settings) as rt:
        worker = SqsWorker(settings, rt, sqs, await describe_queue(sqs, settings.queue_url), retry_policy=policy)
        assert await asyncio.wait_for(worker.run(exit_when_idle=True), timeout_s) == 0
    return worker


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], timeout_s: float = 15.0,
                     what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def events(logs: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [e for e in logs if str(e.get("event", "")).startswith(prefix)]


def logs_with_context() -> Any:
    """capture_logs, keeping the per-message context (message_id, job_id, api, receive_count)."""
    return capture_logs(processors=[structlog.contextvars.merge_contextvars])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the pure parts --------------------------------------------------------------------------------


def test_retry_delay_doubles_per_receive_and_is_capped() -> None:
    assert [retry_delay_s(n, base_s=10, cap_s=900) for n in range(0, 9)] == [10, 10, 20, 40, 80, 160, 320, 640, 900]
    assert retry_delay_s(10**9, base_s=10, cap_s=900) == 900  # no overflow on absurd counts
    assert retry_delay_s(40, base_s=60, cap_s=10**9) == MAX_VISIBILITY_S  # SQS's own ceiling
    assert retry_delay_s(3, base_s=0, cap_s=900) == 0


S = Settings(not_ready_delay_s=30, not_ready_max_delay_s=900)


@pytest.mark.parametrize(("outcome", "receive_count", "kw", "expected"), [
    # Stored (or recorded as failed): the message is done, even on its last delivery.
    ("ingested", 1, {}, Action("delete")),
    ("duplicate", 3, {"max_receive_count": 2}, Action("delete")),
    ("failed", 2, {"max_receive_count": 2}, Action("delete")),
    # Not ready: a delay that grows with each delivery, capped by NOT_READY_MAX_DELAY_S.
    ("not_ready", 1, {}, Action("retry", 30)),
    ("not_ready", 2, {"max_receive_count": 5}, Action("retry", 60)),
    ("not_ready", 3, {"earlier_receives": 5}, Action("retry", 900)),
    # ... and on the delivery the redrive policy would count as the last, a fresh copy instead of the DLQ.
    ("not_ready", 2, {"max_receive_count": 2}, Action("requeue", 60)),
    ("not_ready", 1, {"max_receive_count": 1, "earlier_receives": 2}, Action("requeue", 120)),
    ("busy", 1, {}, Action("retry", 5)),
    ("busy", 2, {"max_receive_count": 2}, Action("requeue", 10)),
    ("transient", 1, {}, Action("retry", 10)),
    ("transient", 3, {"max_receive_count": 5}, Action("retry", 40)),
    ("transient", 10, {"max_receive_count": 10}, Action("requeue", MAX_SEND_DELAY_S)),
    # An unexpected error is retried, but not requeued: if it keeps happening the DLQ gets it.
    ("error", 2, {"max_receive_count": 2}, Action("retry", 20)),
    ("something-new", 2, {"max_receive_count": 2}, Action("retry", 20)),
    # Unusable: visible at once so the redrive policy moves it; without a DLQ, kept with a long delay.
    ("invalid", 1, {"max_receive_count": 2}, Action("dead_letter")),
    ("invalid", 1, {"has_dead_letter_queue": False}, Action("keep", 60)),
    ("invalid", 3, {"has_dead_letter_queue": False}, Action("keep", 240)),
    # The policy is injectable.
    ("busy", 1, {"policy": RetryPolicy(busy_base_s=1)}, Action("retry", 1)),
    ("transient", 2, {"policy": RetryPolicy(transient_base_s=3, transient_cap_s=5)}, Action("retry", 5)),
])
def test_decide(outcome: str, receive_count: int, kw: dict[str, Any], expected: Action) -> None:
    assert decide(outcome, receive_count, S, **kw) == expected


def test_heartbeat_must_be_shorter_than_the_visibility_timeout() -> None:
    bad = Settings(visibility_timeout_s=20, heartbeat_interval_s=20.0)
    with pytest.raises(ConfigError, match="HEARTBEAT_INTERVAL_S"):
        SqsWorker(bad, cast(Any, None), None, QueueInfo("https://queue"))


async def test_health_server_liveness_and_readiness() -> None:
    now = [100.0]

    async def ok() -> tuple[bool, str]:
        return True, "ok"

    async def hangs() -> tuple[bool, str]:
        await asyncio.sleep(60)
        return True, "ok"

    async def raises() -> tuple[bool, str]:
        raise ConnectionRefusedError("connection refused")

    async def behind() -> tuple[bool, str]:
        return False, "schema at 0001, expected 0002"

    health = HealthServer(port=0, live_within_s=10.0, check_timeout_s=0.3, clock=lambda: now[0],
                          ready_checks={"database": ok, "queue": ok})
    port = await health.start("127.0.0.1")
    assert port and port == health.bound_port
    try:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{port}"
            async with http.get(f"{base}/livez") as r:
                assert r.status == 200 and (await r.json())["live"] is True
            now[0] += 11  # the poll loop has not beaten for longer than live_within_s
            async with http.get(f"{base}/livez") as r:
                assert r.status == 503
            health.beat()
            async with http.get(f"{base}/livez") as r:
                assert r.status == 200
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 200
                assert await r.json() == {"ready": True, "checks": {"database": "ok", "queue": "ok"}}
            health.ready_checks = {"database": hangs, "queue": raises, "schema": behind}
            t0 = time.monotonic()
            async with http.get(f"{base}/readyz") as r:
                body = await r.json()
                assert r.status == 503 and body["ready"] is False
            assert time.monotonic() - t0 < 2.0, "a hanging check must not hang the probe"
            assert body["checks"]["database"] == "no answer within 0.3 s"
            assert body["checks"]["queue"].startswith("ConnectionRefusedError")
            assert body["checks"]["schema"] == "schema at 0001, expected 0002"
            async with http.get(f"{base}/metrics") as r:
                assert r.status == 200 and "text/plain" in r.headers["Content-Type"]
    finally:
        await health.stop()


# --- outcomes --------------------------------------------------------------------------------------


async def test_ingests_every_message_format_and_deletes_after_commit(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str, reference_db: str,
) -> None:
    det, found, handmade = detection(emu, faces=90), search(emu), detection(emu, faces=30, seed=5)
    await send(sqs, queues.url,
               enveloped(det),  # SNS envelope, API as the operation name
               raw(found, api_style="upper"),  # raw message delivery, API as FACE_SEARCH
               plain(handmade))  # a hand-queued backfill: {"JobId", "API": "GetFaceDetection"}
    emu.configure(latency_s=0.15)  # slow enough to sample the queue while the jobs run
    violations: list[str] = []
    samples = 0

    async def watch_delete_after_commit(worker: SqsWorker) -> None:
        nonlocal samples
        while True:
            visible, in_flight, delayed = await queue_counts(sqs, queues.url)
            gone = 3 - (visible + in_flight + delayed)
            # Read the database after the queue: whatever was deleted must already be stored.
            conn = await asyncpg.connect(db_url)
            try:
                stored = await conn.fetchval("SELECT count(*) FROM jobs WHERE ingest_state = 'ingested'")
            finally:
                await conn.close()
            samples += 1
            if stored < gone:
                violations.append(f"{gone} messages deleted but {stored} jobs stored")
            await asyncio.sleep(0.05)

    async with running(wsettings, sqs, exit_when_idle=True) as (worker, task):
        watcher = asyncio.create_task(watch_delete_after_commit(worker))
        await asyncio.wait_for(asyncio.shield(task), 30)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    assert samples > 3 and not violations
    assert worker.counters.by_outcome == {"ingested": 3}
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)
    emu.configure(latency_s=0.0)
    await plain_backfill(wsettings, reference_db, [det, found, handmade])
    for fx in (det, found, handmade):
        mine, reference = await snapshot(db_url, fx.job_id), await snapshot(reference_db, fx.job_id)
        assert mine == reference
        assert len(mine["faces"]) == len(fx.results) and len(mine["raw_pages"]) > 1


async def test_failed_jobs_are_recorded_with_their_reason_and_deleted(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    notified = synth.failed_job(unique_id("failed-notified"), "GetFaceSearch", "Unsupported codec")
    by_get = synth.failed_job(unique_id("failed-by-get"), "GetFaceDetection", "The video is corrupt")
    emu.add_jobs([notified, by_get])
    # ERROR for a job Rekognition does not know: recorded with Rekognition's answer, not the notification's.
    unknown = synth.detection_job(unique_id("error-unknown"), faces=3)
    await send(sqs, queues.url,
               enveloped(notified),  # Status FAILED in the notification
               plain(by_get),  # no status: Get* answers JobStatus FAILED
               raw(unknown, status="ERROR"))
    with logs_with_context() as logs:
        worker = await drain(wsettings, sqs)
    assert worker.counters.by_outcome == {"failed": 3}
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)
    rows = {fx.job_id: await job_row(db_url, fx.job_id) for fx in (notified, by_get, unknown)}
    assert all(r is not None and r["ingest_state"] == "failed" for r in rows.values())
    assert rows[notified.job_id]["failure_reason"] == "Unsupported codec"  # type: ignore[index]
    assert rows[notified.job_id]["job_status"] == "FAILED"  # type: ignore[index]
    assert rows[notified.job_id]["video_bucket"] == notified.video["S3Object"]["Bucket"]  # type: ignore[index]
    assert rows[by_get.job_id]["failure_reason"] == "The video is corrupt"  # type: ignore[index]
    assert rows[unknown.job_id]["failure_code"] == "ResourceNotFoundException"  # type: ignore[index]
    assert rows[unknown.job_id]["job_status"] is None  # type: ignore[index]  # Rekognition never said FAILED
    summaries = [e for e in events(logs, "job finished") if e.get("outcome") == "failed"]
    assert {e["job_id"] for e in summaries} == set(rows)
    assert all(e["receive_count"] == 1 and "message_id" in e and "seconds" in e for e in summaries)


async def test_in_progress_job_comes_back_later_with_growing_delay_without_holding_a_slot(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    slow, quick = detection(emu, "slow"), detection(emu, "quick", faces=20)
    emu.complete_after(slow.job_id, 2)  # IN_PROGRESS on its first two deliveries
    await send(sqs, queues.url, enveloped(slow))
    await send(sqs, queues.url, enveloped(quick))
    with logs_with_context() as logs:
        worker = await drain(wsettings.with_(max_concurrent_jobs=1), sqs)
    assert worker.counters.by_outcome == {"not_ready": 2, "ingested": 2}
    assert worker.counters.peak_in_flight == 1
    slow_lines = [e for e in logs if e.get("job_id") == slow.job_id]
    returned = [e["visible_in_s"] for e in slow_lines if e["event"].startswith(("message returned", "last delivery"))]
    assert returned == [1, 2], "the delay grows with each delivery"
    # The second not-ready delivery was the last before the DLQ: a fresh copy went back instead.
    assert events(slow_lines, "last delivery before the dead-letter queue")
    finished = [e["job_id"] for e in events(logs, "job finished") if e.get("outcome") == "ingested"]
    assert finished == [quick.job_id, slow.job_id], "the waiting job must not hold the only slot"
    # The copy that finally ran knows the deliveries before it.
    last = [e for e in events(slow_lines, "job finished") if e["outcome"] == "ingested"]
    assert last[0]["receive_count"] == 1 and last[0]["earlier_receives"] == 2
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)
    assert (await job_row(db_url, slow.job_id) or {}).get("faces") == len(slow.results)


async def test_requeued_copy_keeps_the_attributes_and_carries_the_delivery_count(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any,
) -> None:
    job = detection(emu)
    emu.complete_after(job.job_id, 100)  # IN_PROGRESS for the whole test
    await sqs.send_message(QueueUrl=queues.url, MessageBody=enveloped(job), MessageAttributes={
        "origin": {"DataType": "String", "StringValue": "backfill-script"}})
    with logs_with_context() as logs:
        async with running(wsettings, sqs) as (worker, _):
            await wait_until(lambda: bool(events(logs, "last delivery before the dead-letter queue")), 10, "requeue")
    # The copy is delayed 2 s; should the stopping worker's last poll still see it, it hands it back as is.
    assert worker.counters.by_outcome in ({"not_ready": 2}, {"not_ready": 2, "released": 1})
    assert sum(await queue_counts(sqs, queues.url)) == 1, "the original is deleted, the copy is queued"
    copy = (await sqs.receive_message(QueueUrl=queues.url, WaitTimeSeconds=5, MessageAttributeNames=["All"],
                                      MessageSystemAttributeNames=["ApproximateReceiveCount"]))["Messages"][0]
    assert copy["Body"] == enveloped(job)
    assert copy["Attributes"]["ApproximateReceiveCount"] == str(1 + worker.counters.by_outcome.get("released", 0))
    assert copy["MessageAttributes"] == {
        "origin": {"DataType": "String", "StringValue": "backfill-script"},
        "IngestEarlierReceives": {"DataType": "Number", "StringValue": "2"},
    }
    # The next delivery of the copy counts as the third: its delay keeps growing (1, 2, then 4 s).
    assert decide("not_ready", 1, wsettings, max_receive_count=2, earlier_receives=2) == Action("retry", 4)


async def test_the_worker_survives_its_queue_disappearing(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    name = queues.url.rsplit("/", 1)[1]
    attributes = (await sqs.get_queue_attributes(QueueUrl=queues.url, AttributeNames=["All"]))["Attributes"]
    job = detection(emu, faces=20)
    with logs_with_context() as logs:
        async with running(wsettings, sqs) as (worker, _):
            await asyncio.sleep(0.2)
            await sqs.delete_queue(QueueUrl=queues.url)
            await wait_until(lambda: bool(events(logs, "receive failed")), 10, "a failed receive")
            url = (await sqs.create_queue(QueueName=name, Attributes={
                k: attributes[k] for k in ("VisibilityTimeout", "RedrivePolicy")}))["QueueUrl"]
            assert url == queues.url
            await send(sqs, url, enveloped(job))
            await wait_until(lambda: worker.counters.by_outcome.get("ingested") == 1, 15, "the job")
    assert "queue does not exist" in events(logs, "receive failed")[0]["error"]
    assert (await job_row(db_url, job.job_id) or {}).get("faces") == len(job.results)


async def test_database_unreachable_returns_messages_with_backoff_and_the_worker_recovers(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, pg_server_url: str, template_db: str,
) -> None:
    """The database disappears (dropped) and comes back: nothing is deleted meanwhile, nothing reaches
    the DLQ (the last delivery is requeued), and the same worker ingests once it is back."""
    scratch = await create_database(pg_server_url, template_db)
    try:
        good = detection(emu)
        failed = synth.failed_job(unique_id("failed"), "GetFaceDetection", "Unsupported codec")
        emu.add_job(failed)
        await drop_database(pg_server_url, scratch)
        await send(sqs, queues.url, enveloped(good), enveloped(failed))
        totals: list[int] = []
        dead_lettered: list[int] = []

        async def watch() -> None:
            while True:
                totals.append(sum(await queue_counts(sqs, queues.url)))
                dead_lettered.append(sum(await queue_counts(sqs, queues.dlq_url)))
                await asyncio.sleep(0.03)

        with logs_with_context() as logs:
            async with running(wsettings.with_(database_url=scratch), sqs, exit_when_idle=True,
                               policy=RetryPolicy(transient_base_s=1, transient_cap_s=1)) as (worker, task):
                watcher = asyncio.create_task(watch())
                # Two deliveries each: retried after 1 s, then requeued as fresh copies (the DLQ is not for them).
                await wait_until(lambda: len(events(logs, "last delivery before the dead-letter queue")) >= 2,
                                 15, "both messages requeued")
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
                await create_database(pg_server_url, template_db, database_name(scratch))
                await asyncio.wait_for(asyncio.shield(task), 30)
        assert len(totals) > 5 and min(totals) >= 2, "a message was deleted while the database was gone"
        assert max(dead_lettered) == 0
        assert worker.counters.by_outcome.get("transient", 0) >= 4
        assert worker.counters.by_outcome.get("ingested") == 1
        assert worker.counters.by_outcome.get("failed") == 1
        assert await queue_counts(sqs, queues.url) == (0, 0, 0)
        assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)
        assert (await job_row(scratch, good.job_id) or {}).get("faces") == len(good.results)
        assert (await job_row(scratch, failed.job_id) or {}).get("failure_reason") == "Unsupported codec"
        transient = [e for e in logs if e.get("why") == "transient"]
        assert transient and all(e["job_id"] in (good.job_id, failed.job_id) for e in transient)
        assert events(logs, "last delivery before the dead-letter queue")
    finally:
        await drop_database(pg_server_url, scratch)


async def test_database_refusing_connections_is_transient_for_every_message_kind(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any,
) -> None:
    good = detection(emu)
    failed = synth.failed_job(unique_id("failed"), "GetFaceSearch", "Unsupported codec")
    emu.add_job(failed)
    await send(sqs, queues.url, enveloped(good), enveloped(failed))
    refused = wsettings.with_(database_url=f"postgresql://postgres@127.0.0.1:{closed_port()}/nowhere")
    # A 5 s backoff: both stay hidden until the worker has stopped.
    async with running(refused, sqs, policy=RetryPolicy(transient_base_s=5)) as (worker, _):
        await wait_until(lambda: worker.counters.by_outcome.get("transient", 0) >= 2, 10, "2 transient")
    assert set(worker.counters.by_outcome) == {"transient"}
    assert sum(await queue_counts(sqs, queues.url)) == 2
    assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)


async def test_rekognition_faults_after_retries_return_the_message_and_the_worker_recovers(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    job = detection(emu)
    await send(sqs, queues.url, raw(job))
    emu.configure(fault_rate=1.0)
    async with running(wsettings, sqs, exit_when_idle=True) as (worker, task):
        await wait_until(lambda: worker.counters.by_outcome.get("transient", 0) >= 1, 10, "a transient outcome")
        assert sum(await queue_counts(sqs, queues.url)) == 1, "never deleted"
        emu.configure(fault_rate=0.0)
        await asyncio.wait_for(asyncio.shield(task), 20)
    assert worker.counters.by_outcome.get("ingested") == 1
    assert metric("rekognition_worker_rekognition_calls_total", operation="GetFaceDetection", outcome="fault") > 0
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)
    assert (await job_row(db_url, job.job_id) or {}).get("faces") == len(job.results)


async def test_unusable_messages_reach_the_dead_letter_queue_logged_and_counted(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    good = detection(emu, faces=20)
    await send(sqs, queues.url, *POISON_BODIES)
    await send(sqs, queues.url, enveloped(good))  # after the poison: still ingested
    invalid_before = metric("rekognition_worker_messages_total", outcome="invalid")
    with logs_with_context() as logs:
        worker = await drain(wsettings, sqs)
    # Received twice each (maxReceiveCount 2), then moved by the redrive policy: never deleted.
    assert sorted(m["Body"] for m in await take_all(sqs, queues.dlq_url)) == sorted(POISON_BODIES)
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert worker.counters.by_outcome == {"invalid": 2 * len(POISON_BODIES), "ingested": 1}
    assert metric("rekognition_worker_messages_total", outcome="invalid") - invalid_before == 2 * len(POISON_BODIES)
    assert (await job_row(db_url, good.job_id) or {}).get("ingest_state") == "ingested"
    unusable = events(logs, "unusable message")
    # Logs describe a body by size, hash and member names, never by its text (it may name a person).
    by_hash = {logsafe.short_hash(body): body for body in POISON_BODIES}
    reasons = {by_hash[e["body_sha256"]]: e["reason"] for e in unusable}
    assert set(reasons) == set(POISON_BODIES)
    assert "anna" not in json.dumps(logs, default=str)
    assert {e["body_bytes"] for e in unusable if by_hash[e["body_sha256"]] == POISON_BODIES[2]} == {
        len(POISON_BODIES[2])}
    assert {tuple(e.get("body_keys", ())) for e in unusable if by_hash[e["body_sha256"]] == POISON_BODIES[9]} == {
        ("Type", "Message")}
    assert all(e["log_level"] == "warning" and e.get("message_id") for e in unusable)
    assert "not valid JSON" in reasons["this is not a notification"]
    assert "must be a JSON object, got list" in reasons["[1, 2, 3]"]
    assert "invalid JobId 'has spaces and !'" in reasons[POISON_BODIES[2]]
    assert "unsupported API 'StartLabelDetection'" in reasons[POISON_BODIES[3]]
    assert "invalid JobId 'int'" in reasons[POISON_BODIES[4]]
    assert "unknown or unsupported API 'list'" in reasons[POISON_BODIES[5]]
    assert "no JobId" in reasons[POISON_BODIES[6]]
    assert "is not a job status" in reasons[POISON_BODIES[7]]
    assert "Message is not a string" in reasons[POISON_BODIES[8]]
    assert "SNS Message is not valid JSON" in reasons[POISON_BODIES[9]]


async def test_unusable_message_without_a_dead_letter_queue_is_kept_not_deleted(
    wsettings: Settings, sqs: Any,
) -> None:
    url = (await sqs.create_queue(QueueName=f"no-dlq-{unique_id('q')}",
                                  Attributes={"VisibilityTimeout": "2"}))["QueueUrl"]
    await send(sqs, url, "garbage")
    with logs_with_context() as logs:
        async with running(wsettings.with_(queue_url=url), sqs, policy=RetryPolicy()) as (worker, _):
            await wait_until(lambda: worker.counters.by_outcome.get("invalid", 0) == 1, 10, "the invalid outcome")
    assert events(logs, "queue has no redrive policy")
    kept = events(logs, "unusable message and the queue has no dead-letter queue")
    assert len(kept) == 1 and kept[0]["retry_in_s"] == 60 and "not valid JSON" in kept[0]["reason"]
    assert await queue_counts(sqs, url) == (0, 1, 0), "kept, hidden for a minute, not deleted"


async def test_duplicate_deliveries_store_the_rows_of_one_ingest(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str, reference_db: str,
) -> None:
    det, found = detection(emu, faces=100), search(emu, elements=60)
    await send(sqs, queues.url,
               enveloped(det), raw(det), enveloped(det, api_style="upper"),  # SNS delivers at least once
               raw(found), enveloped(found))
    with logs_with_context() as logs:
        worker = await drain(wsettings, sqs)
    outcomes = worker.counters.by_outcome
    assert set(outcomes) <= {"ingested", "duplicate", "busy"}
    assert outcomes.get("ingested", 0) + outcomes.get("duplicate", 0) == 5
    # One summary line per try, a copy turned away because its job was running here included.
    summaries = events(logs, "job finished")
    assert sorted(e["outcome"] for e in summaries) == sorted(o for o, n in outcomes.items() for _ in range(n))
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)
    await plain_backfill(wsettings, reference_db, [det, found])
    for fx in (det, found):
        mine = await snapshot(db_url, fx.job_id)
        assert mine == await snapshot(reference_db, fx.job_id)
        assert len(mine["faces"]) == len(fx.results)
        assert mine["landmarks"] and (fx is det or mine["face_matches"])


async def test_job_longer_than_the_visibility_timeout_completes_once(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    job = detection(emu, faces=100)  # 4 pages
    await send(sqs, queues.url, enveloped(job))
    emu.configure(latency_s=0.7)  # ~2.8 s of Get* calls against a 2 s visibility timeout
    started = time.monotonic()
    with logs_with_context() as logs:
        worker = await drain(wsettings.with_(max_concurrent_jobs=2), sqs)
    assert time.monotonic() - started > 2.5
    assert worker.counters.received == 1, "redelivered mid-way"
    assert worker.counters.by_outcome == {"ingested": 1}
    assert worker.counters.visibility_extensions >= 3
    assert worker.counters.visibility_extension_failures == 0
    summary = [e for e in events(logs, "job finished") if e.get("job_id") == job.job_id]
    assert len(summary) == 1
    assert summary[0]["receive_count"] == 1 and summary[0]["outcome"] == "ingested"
    assert summary[0]["pages"] == 4 and summary[0]["rows"] > 0 and summary[0]["seconds"] > 2
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert (await job_row(db_url, job.job_id) or {}).get("attempts") == 1


async def test_failed_visibility_extension_is_logged_and_the_job_still_completes(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    job = detection(emu, faces=100)
    await send(sqs, queues.url, enveloped(job))
    emu.configure(latency_s=0.5)
    failures_before = metric("rekognition_worker_visibility_extension_failures_total")
    with logs_with_context() as logs:
        async with running(wsettings, sqs, exit_when_idle=True) as (worker, task):
            await wait_until(lambda: worker.in_flight == 1, 10, "the job to start")
            # The message vanishes under the worker: its receipt handle is no longer valid.
            await sqs.purge_queue(QueueUrl=queues.url)
            await asyncio.wait_for(asyncio.shield(task), 20)
    assert worker.counters.visibility_extension_failures >= 1
    assert metric("rekognition_worker_visibility_extension_failures_total") - failures_before >= 1
    failed = events(logs, "visibility extension failed")
    assert failed and failed[0]["job_id"] == job.job_id and "ReceiptHandleIsInvalid" in failed[0]["error"]
    assert events(logs, "delete failed")
    assert worker.counters.by_outcome == {"ingested": 1}
    assert (await job_row(db_url, job.job_id) or {}).get("faces") == len(job.results)


async def test_never_more_messages_in_flight_than_job_slots(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any,
) -> None:
    jobs = [detection(emu, faces=30, seed=n) for n in range(6)]  # 2 pages each
    await send(sqs, queues.url, *(enveloped(j) for j in jobs))
    emu.configure(latency_s=0.2)
    seen_in_flight: list[int] = []
    seen_hidden: list[int] = []
    async with running(wsettings.with_(max_concurrent_jobs=2), sqs, exit_when_idle=True) as (worker, task):
        while not task.done():
            seen_in_flight.append(worker.in_flight)
            seen_hidden.append((await queue_counts(sqs, queues.url))[1])
            await asyncio.sleep(0.03)
    assert worker.counters.by_outcome == {"ingested": 6}
    assert max(seen_hidden) <= 2 and max(seen_in_flight) <= 2, "held more than it could start"
    assert worker.counters.peak_in_flight == 2 and 2 in seen_hidden


# --- shutdown --------------------------------------------------------------------------------------


async def test_stop_during_a_job_lets_it_finish_within_the_grace_period(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    job = detection(emu, faces=100)
    await send(sqs, queues.url, enveloped(job))
    emu.configure(latency_s=0.25)
    async with running(wsettings.with_(shutdown_grace_s=20.0), sqs) as (worker, task):
        await wait_until(lambda: worker.in_flight == 1, 10, "the job to start")
        await asyncio.sleep(0.3)
        worker.request_stop()
        worker.request_stop()  # idempotent
        assert await asyncio.wait_for(asyncio.shield(task), 20) == 0
    assert worker.counters.by_outcome == {"ingested": 1}
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert (await job_row(db_url, job.job_id) or {}).get("faces") == len(job.results)


async def test_stop_during_a_job_past_the_grace_period_releases_it_and_stores_nothing(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    job = detection(emu, faces=100)
    await send(sqs, queues.url, enveloped(job))
    emu.configure(latency_s=0.4)
    async with running(wsettings.with_(shutdown_grace_s=0.2), sqs) as (worker, task):
        await wait_until(lambda: worker.in_flight == 1, 10, "the job to start")
        await asyncio.sleep(0.5)
        worker.request_stop()
        t0 = time.monotonic()
        assert await asyncio.wait_for(asyncio.shield(task), 10) == 0
        assert time.monotonic() - t0 < 3.0  # one long poll at most, not the 1.6 s job plus grace
    assert worker.counters.by_outcome == {"released": 1}
    # Visible again at once (its heartbeat had it hidden for another 2 s), as a later delivery.
    again = (await sqs.receive_message(QueueUrl=queues.url, WaitTimeSeconds=0,
                                       MessageSystemAttributeNames=["ApproximateReceiveCount"])).get("Messages", [])
    assert len(again) == 1 and again[0]["Attributes"]["ApproximateReceiveCount"] == "2"
    # Only the notification's clock is recorded (the job is pending), no rows.
    row = await job_row(db_url, job.job_id)
    assert row is not None and row["ingest_state"] == "pending" and row["completed_at"] is not None
    assert await stored_rows(db_url, job.job_id) == 0


async def test_messages_from_a_receive_in_flight_at_stop_are_released_not_started(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    job = detection(emu, faces=20)
    async with running(wsettings.with_(poll_wait_s=4), sqs) as (worker, task):
        await asyncio.sleep(0.8)  # the worker is inside its long poll
        worker.request_stop()
        await send(sqs, queues.url, enveloped(job))  # arrives while that poll is still open
        assert await asyncio.wait_for(asyncio.shield(task), 10) == 0
    assert worker.counters.received == 1
    assert worker.counters.by_outcome == {"released": 1}
    again = (await sqs.receive_message(QueueUrl=queues.url, WaitTimeSeconds=0)).get("Messages", [])
    assert len(again) == 1, "released, not stuck invisible"
    assert await job_row(db_url, job.job_id) is None


async def test_run_service_serves_health_and_stops_on_sigterm(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    job = detection(emu, faces=20)
    await send(sqs, queues.url, enveloped(job))
    workers: list[SqsWorker] = []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    service = asyncio.create_task(run_service(wsettings, ready=workers.append))
    await wait_until(lambda: bool(workers), 15, "the service to start")
    worker = workers[0]
    assert worker.health is not None and worker.health.bound_port
    await wait_until(lambda: worker.counters.by_outcome.get("ingested") == 1, 15, "the job")
    base = f"http://127.0.0.1:{worker.health.bound_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/livez") as r:
            assert r.status == 200
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["checks"] == {"database": "ok", "queue": "ok", "credentials": "ok"}
        async with http.get(f"{base}/metrics") as r:
            text = await r.text()
    for name in ("messages_total{outcome=\"ingested\"}", "jobs_total{api=\"FACE_DETECTION\"", "pages_fetched_total",
                 "rows_written_total{table=\"faces\"}", "rekognition_calls_total", "jobs_in_flight",
                 "job_duration_seconds_bucket", "oldest_message_age_seconds"):
        assert f"rekognition_worker_{name}" in text, name
    # The handler only sets the stop event: a real SIGTERM to this very process is safe.
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    signal.raise_signal(signal.SIGTERM)
    assert await asyncio.wait_for(service, 15) == 0
    assert worker.stopping.is_set()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "handlers are removed when the service returns"
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)


# --- done when -------------------------------------------------------------------------------------


async def test_done_when_mix_of_formats_duplicates_failed_in_progress_and_poison(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str, reference_db: str,
) -> None:
    det, found, small = detection(emu, faces=80), search(emu, elements=50), detection(emu, faces=10, seed=9)
    late = detection(emu, "late", faces=40, seed=4)
    emu.complete_after(late.job_id, 1)  # IN_PROGRESS at first
    failed = synth.failed_job(unique_id("failed"), "GetFaceSearch", "Unsupported codec: could not decode")
    emu.add_job(failed)
    poison = ("not json at all", '{"JobId": "x y", "API": "StartFaceSearch"}',
              '{"JobId": "labels-0001", "API": "LABEL_DETECTION", "Status": "SUCCEEDED"}')
    await send(sqs, queues.url,
               enveloped(det), raw(det, api_style="upper"), enveloped(det),
               raw(found), enveloped(found, api_style="upper"),
               plain(small),
               enveloped(late), raw(late),
               enveloped(failed), raw(failed),
               *poison)
    worker = await drain(wsettings, sqs)  # returned 0
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert sorted(m["Body"] for m in await take_all(sqs, queues.dlq_url)) == sorted(poison)
    good = [det, found, small, late]
    await plain_backfill(wsettings, reference_db, good)
    for fx in good:
        assert await snapshot(db_url, fx.job_id) == await snapshot(reference_db, fx.job_id), fx.job_id
    row = await job_row(db_url, failed.job_id)
    assert row is not None and row["ingest_state"] == "failed"
    assert row["failure_reason"] == "Unsupported codec: could not decode"
    assert worker.counters.by_outcome["invalid"] == 2 * len(poison)
    assert worker.counters.by_outcome["not_ready"] >= 1



@pytest.mark.parametrize("setting", ["dead-letter", "delete"])
async def test_notifications_of_other_rekognition_apis_follow_the_setting(
    setting: str, wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    """A shared topic also carries label or text jobs: dead-lettered by default (never deleted unseen), or
    dropped and counted with OTHER_API_NOTIFICATIONS=delete. A face job beside them is ingested either way."""
    good = detection(emu, faces=10)
    others = [sns_envelope({"JobId": unique_id("labels"), "Status": "SUCCEEDED", "API": api, "Timestamp": 1,
                            "Video": {"S3ObjectName": "v.mp4", "S3Bucket": "b"}})
              for api in ("StartLabelDetection", "TEXT_DETECTION")]
    await send(sqs, queues.url, *others, enveloped(good))
    worker = await drain(wsettings.with_(other_api_notifications=setting), sqs)
    dead = [m["Body"] for m in await take_all(sqs, queues.dlq_url)]
    if setting == "delete":
        assert dead == [] and worker.counters.by_outcome == {"other_api": 2, "ingested": 1}
    else:
        assert sorted(dead) == sorted(others) and worker.counters.by_outcome == {"invalid": 4, "ingested": 1}
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert (await job_row(db_url, good.job_id) or {}).get("ingest_state") == "ingested"


def test_other_api_setting_is_validated() -> None:
    assert Settings.from_env({"OTHER_API_NOTIFICATIONS": "DELETE"}).other_api_notifications == "delete"
    assert Settings.from_env({}).other_api_notifications == "dead-letter"
    with pytest.raises(ConfigError, match="OTHER_API_NOTIFICATIONS"):
        Settings.from_env({"OTHER_API_NOTIFICATIONS": "ignore"})
