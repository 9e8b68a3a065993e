"""Job events end to end: the outbox written in the transaction of each change, delivered to moto's SNS (read
back from an SQS queue subscribed to the topic) and EventBridge, by `run`, by the commands that change data,
after a crash, and again by `events replay`; NOTIFY at commit; every event checked against
docs/events.schema.json and for identities it must not carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema
import orjson
import pytest
from aiobotocore.session import get_session
from rich.console import Console
from test_cli import run_cli
from test_service_process import start_worker  # noqa: F401 - a fixture
from test_service_support import Queues, enveloped, send

from tests.conftest import unique_job_id
from worker import metrics
from worker.backfill import run_backfill
from worker.config import Settings
from worker.db.engine import create_engine
from worker.events import CHANNEL
from worker.events.outbox import Event
from worker.events.publisher import Destinations, Publisher, backoff_s, flush, open_destinations, run_publisher
from worker.lifecycle import purge_expired, selector_hash
from worker.local import synth
from worker.messages import JobRef

SCHEMA = orjson.loads((Path(__file__).resolve().parents[1] / "docs" / "events.schema.json").read_bytes())
ERASURE_KEY = "k" * 40
DEADLINE_S = 90

_PENDING = f"{metrics.PREFIX}events_pending"
_FAILURES = f"{metrics.PREFIX}events_publish_failures_total"


@dataclass(frozen=True)
class Topic:
    arn: str
    queue_url: str  # subscribed to every event
    deleted_queue_url: str  # subscribed with a filter policy: job.deleted only


@pytest.fixture
async def topic(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Topic:
    """An SNS topic with two SQS subscribers (one filtered on the `type` attribute), on moto's server."""
    for service in ("SNS", "SQS", "EVENTBRIDGE"):
        monkeypatch.setenv(f"AWS_ENDPOINT_URL_{service}", moto_url)
    name = f"events-{uuid.uuid4().hex[:10]}"
    session = get_session()
    async with session.create_client("sns", region_name="us-east-1") as sns, \
            session.create_client("sqs", region_name="us-east-1") as sqs:
        arn = (await sns.create_topic(Name=name))["TopicArn"]
        urls = []
        for suffix, policy in (("all", None), ("deleted", {"type": ["job.deleted"]})):
            url = (await sqs.create_queue(QueueName=f"{name}-{suffix}"))["QueueUrl"]
            queue_arn = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"]))["Attributes"][
                "QueueArn"]
            attributes = {"FilterPolicy": orjson.dumps(policy).decode()} if policy else {}
            await sns.subscribe(TopicArn=arn, Protocol="sqs", Endpoint=queue_arn, Attributes=attributes)
            urls.append(url)
    return Topic(arn, urls[0], urls[1])


def events_env(db_url: str, moto_url: str, topic: Topic, **more: str) -> dict[str, str]:
    return {"DATABASE_URL": db_url, "EVENTS_SNS_TOPIC_ARN": topic.arn, "AWS_ENDPOINT_URL_SNS": moto_url,
            "AWS_ENDPOINT_URL_SQS": moto_url, "AWS_REGION": "us-east-1", **more}


@dataclass(frozen=True)
class Received:
    event: dict[str, Any]
    type_attribute: str | None
    body: str  # the SQS body as received, to search for what must not be in it


async def received(queue_url: str) -> list[Received]:
    """Every message on the queue (deleted once read), unwrapped from its SNS envelope, in arrival order."""
    out: list[Received] = []
    async with get_session().create_client("sqs", region_name="us-east-1") as sqs:
        while True:
            batch = (await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                               VisibilityTimeout=60)).get("Messages", [])
            if not batch:
                return out
            for m in batch:
                envelope = orjson.loads(m["Body"])
                attribute = (envelope.get("MessageAttributes") or {}).get("type", {})
                out.append(Received(orjson.loads(envelope["Message"]), attribute.get("Value"), m["Body"]))
                await sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])


async def identities(db: asyncpg.Connection) -> set[str]:
    """Every FaceId, ExternalImageId and UserId stored: none of them may appear in an event."""
    rows = await db.fetch("SELECT face_id, external_image_id, user_id FROM collection_faces "
                          "UNION SELECT face_id, NULL, NULL FROM face_matches")
    return {v for r in rows for v in r.values() if v}


def check_contract(messages: list[Received], forbidden: set[str] | frozenset[str] = frozenset()) -> None:
    """Every event valid against the schema, its `type` attribute equal to its type, no identity in it."""
    for m in messages:
        jsonschema.validate(m.event, SCHEMA, cls=jsonschema.Draft202012Validator)
        assert m.type_attribute == m.event["type"], m
        leaked = {value for value in forbidden if value in m.body}
        assert not leaked, (m.event["type"], leaked)


def per_job(messages: list[Received]) -> dict[str | None, list[str]]:
    """Each job's event types in the order they arrived (one publisher: a job's next event waits for the last)."""
    out: dict[str | None, list[str]] = {}
    for m in messages:
        out.setdefault(m.event["job_id"], []).append(m.event["type"])
    return out


async def job_summary(db: asyncpg.Connection, job_id: str) -> dict[str, Any]:
    row = await db.fetchrow("SELECT faces, persons, collection_matches AS face_matches, pages, ingested_at "
                            "FROM reporting.job_summary WHERE job_id = $1", job_id)
    assert row is not None
    return dict(row)


def assert_counts_match(event: dict[str, Any], summary: dict[str, Any]) -> None:
    assert {k: event[k] for k in ("faces", "persons", "face_matches", "pages")} == {
        k: summary[k] for k in ("faces", "persons", "face_matches", "pages")}
    assert datetime.fromisoformat(event["ingested_at"]) == summary["ingested_at"]


async def outbox_rows(db: asyncpg.Connection) -> list[dict[str, Any]]:
    return [dict(r) for r in await db.fetch(
        "SELECT seq, event_id::text AS event_id, type, job_id, published_at, attempts, last_error, "
        "payload::text AS payload FROM event_outbox ORDER BY seq")]


async def backfill_quietly(settings: Settings, fixtures: list[synth.JobFixture]) -> None:
    outcomes = await run_backfill(settings, [JobRef.create(f.job_id, f.api) for f in fixtures],
                                  console=Console(file=io.StringIO()))
    assert all(o.outcome in ("ingested", "failed") for o in outcomes), outcomes


# --- pure parts ---------------------------------------------------------------------------------------


def test_backoff_doubles_from_the_base_up_to_the_cap_with_jitter_in_the_upper_half() -> None:
    assert backoff_s(0) == 0.0
    assert [backoff_s(n, base_s=1.0, cap_s=30.0, rand=lambda: 1.0) for n in (1, 2, 3, 4, 5, 6, 60)] == [
        1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert [backoff_s(n, base_s=1.0, cap_s=30.0, rand=lambda: 0.0) for n in (1, 3, 6)] == [0.5, 2.0, 15.0]


async def test_a_refused_round_backs_off_by_the_injected_clock_and_delivers_once_the_topic_exists(
        settings: Settings, db: asyncpg.Connection, moto_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SNS", moto_url)
    arn = f"arn:aws:sns:us-east-1:123456789012:later-{uuid.uuid4().hex[:8]}"
    job_id = unique_job_id("refused")
    await db.execute("INSERT INTO jobs (job_id, api, ingest_state, ingested_at) VALUES ($1, 'FACE_DETECTION', "
                     "'ingested', now())", job_id)
    now = [1000.0]
    async with asyncio.timeout(DEADLINE_S), open_destinations(settings.with_(events_sns_topic_arn=arn)) as dest:
        publisher = Publisher(dest, clock=lambda: now[0], rand=lambda: 1.0, base_s=2.0, cap_s=60.0)
        conn = await asyncpg.connect(settings.asyncpg_dsn)
        try:
            first = await publisher.deliver_round(conn)  # the topic does not exist yet: NotFound
            assert (first.claimed, first.delivered, first.failed) == (1, 0, 1)
            assert publisher.wait_s() == 2.0
            now[0] += 1.0
            assert publisher.wait_s() == 1.0
            assert publisher.note_failure() == 4.0  # a second failure in a row doubles it
            row = (await outbox_rows(db))[0]
            assert row["published_at"] is None and row["attempts"] == 1 and "NotFound" in row["last_error"]
            async with get_session().create_client("sns", region_name="us-east-1") as sns:
                assert (await sns.create_topic(Name=arn.rsplit(":", 1)[1]))["TopicArn"] == arn
            done = await publisher.deliver_round(conn)
            assert (done.delivered, publisher.failures, publisher.wait_s()) == (1, 0, 0.0)
        finally:
            await conn.close()
    assert (await outbox_rows(db))[0]["published_at"] is not None


# --- the outbox and NOTIFY ---------------------------------------------------------------------------


async def test_notify_reaches_a_listener_at_commit_and_never_for_a_rollback(db: asyncpg.Connection,
                                                                              db_url: str) -> None:
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(db_url)
    await listener.add_listener(CHANNEL, lambda *args: heard.put_nowait(args[3]))
    try:
        async with asyncio.timeout(DEADLINE_S):
            rolled_back = unique_job_id("rollback")
            tx = db.transaction()
            await tx.start()
            await db.execute("INSERT INTO jobs (job_id, api, ingest_state, ingested_at) "
                             "VALUES ($1, 'FACE_SEARCH', 'ingested', now())", rolled_back)
            await tx.rollback()
            job_id = unique_job_id("notify")
            tx = db.transaction()
            await tx.start()
            await db.execute("INSERT INTO jobs (job_id, api, ingest_state, ingested_at) "
                             "VALUES ($1, 'FACE_SEARCH', 'ingested', now())", job_id)
            await asyncio.sleep(0.3)
            assert heard.empty()  # not before the commit
            await tx.commit()
            event_id = await asyncio.wait_for(heard.get(), 10)
            assert await db.fetchval("SELECT job_id FROM event_outbox WHERE event_id = $1::uuid", event_id) == job_id
            await asyncio.sleep(0.3)
            assert heard.empty()  # one event, nothing for the rolled-back job
            assert await db.fetchval("SELECT count(*) FROM event_outbox WHERE job_id = $1", rolled_back) == 0
    finally:
        await listener.close()


async def test_replicas_deliver_each_event_once_and_each_jobs_events_in_order(
        settings: Settings, db: asyncpg.Connection, topic: Topic) -> None:
    jobs = [unique_job_id("order") for _ in range(12)]
    for job_id in jobs:  # ingested, then deleted: two events per job, in that order
        await db.execute("INSERT INTO jobs (job_id, api, ingest_state, ingested_at, faces, pages) "
                         "VALUES ($1, 'FACE_DETECTION', 'ingested', now(), 3, 1)", job_id)
    for job_id in jobs:
        await db.execute("DELETE FROM jobs WHERE job_id = $1", job_id)
    publishing = settings.with_(events_sns_topic_arn=topic.arn)
    async with asyncio.timeout(DEADLINE_S):
        # Two events a round, so the replicas' rounds interleave and contend for the same rows.
        results = await asyncio.gather(*(flush(publishing, timeout_s=30, batch_events=2) for _ in range(3)))
    assert sum(r.delivered for r in results if r is not None) == 24
    messages = await received(topic.queue_url)
    check_contract(messages)
    ids = [m.event["event_id"] for m in messages]
    assert len(ids) == len(set(ids)) == 24
    rows = await outbox_rows(db)
    assert all(r["published_at"] is not None for r in rows)
    for job_id in jobs:
        mine = [r for r in rows if r["job_id"] == job_id]
        assert [r["type"] for r in mine] == ["job.ingested", "job.deleted"]
        assert mine[0]["published_at"] < mine[1]["published_at"]  # the second waited for the first
    assert {m.event["type"] for m in await received(topic.deleted_queue_url)} == {"job.deleted"}


async def test_delivered_events_are_pruned_after_the_retention_window_and_pending_ones_kept(
        settings: Settings, db: asyncpg.Connection, topic: Topic) -> None:
    from worker.events import outbox

    for n in range(3):
        await db.execute("INSERT INTO jobs (job_id, api, ingest_state, ingested_at) "
                         "VALUES ($1, 'FACE_DETECTION', 'ingested', now())", unique_job_id(f"prune{n}"))
    rows = await outbox_rows(db)
    await db.execute("UPDATE event_outbox SET occurred_at = now() - interval '8 days', "
                     "published_at = CASE WHEN seq <> $1 THEN now() END", rows[0]["seq"])
    await db.execute("UPDATE event_outbox SET occurred_at = now() WHERE seq = $1", rows[2]["seq"])
    removed = await outbox.prune(db, datetime.now(tz=UTC) - timedelta(days=7), undelivered_too=False)
    # The old delivered one goes; the old undelivered one and the recent delivered one stay.
    assert removed == 1
    assert [r["seq"] for r in await outbox_rows(db)] == [rows[0]["seq"], rows[2]["seq"]]


# --- every path that changes data announces it ------------------------------------------------------


async def test_jobs_ingested_by_backfill_are_announced_with_the_counts_of_job_summary(
        db_url: str, db: asyncpg.Connection, emulator: Any, moto_url: str, topic: Topic) -> None:
    emulator.configure(quota_tps=None, fault_rate=0.0, latency_s=0.0)
    det = synth.detection_job(unique_job_id("ev-det"), faces=120, attributes="ALL")
    srch = synth.search_job(unique_job_id("ev-search"), persons_elements=150, persons=5)
    failed = synth.failed_job(unique_job_id("ev-failed"), "GetFaceSearch", "Unsupported codec")
    emulator.add_jobs([det, srch, failed])
    env = events_env(db_url, moto_url, topic, AWS_ENDPOINT_URL_REKOGNITION=emulator.url, REKOGNITION_TPS="200",
                     PAGE_SIZE="50")
    lines = f"{det.job_id},FACE_DETECTION\n{srch.job_id},FACE_SEARCH\n{failed.job_id},FACE_SEARCH\n"
    result = run_cli("backfill", "--from-file", "-", env=env, stdin=lines)
    assert result.returncode == 1, result.stderr  # the failed job
    messages = await received(topic.queue_url)
    check_contract(messages, await identities(db))
    by_job = {m.event["job_id"]: m.event for m in messages}
    assert sorted((e["job_id"], e["type"]) for e in by_job.values()) == sorted(
        [(det.job_id, "job.ingested"), (srch.job_id, "job.ingested"), (failed.job_id, "job.failed")])
    assert len(messages) == 3
    for fx in (det, srch):
        event = by_job[fx.job_id]
        assert_counts_match(event, await job_summary(db, fx.job_id))
        assert event["api"] == ("FACE_DETECTION" if fx is det else "FACE_SEARCH") and event["job_status"] == "SUCCEEDED"
        s3 = fx.video["S3Object"]  # type: ignore[index]
        assert event["video"] == {"bucket": s3["Bucket"], "name": s3["Name"]}
    assert by_job[srch.job_id]["persons"] > 0 and by_job[srch.job_id]["face_matches"] > 0
    assert by_job[failed.job_id]["job_status"] == "FAILED" and by_job[failed.job_id]["failure_code"]
    assert "Unsupported codec" not in str(messages)  # the reason stays in the database
    assert all(r["published_at"] is not None for r in await outbox_rows(db))
    assert await received(topic.deleted_queue_url) == []  # the filter policy keeps other types out


async def test_jobs_ingested_and_failed_through_run_are_announced(
        start_worker: Any, queues: Queues, sqs: Any, emu: Any, db: asyncpg.Connection,  # noqa: F811
        moto_url: str, topic: Topic) -> None:
    srch = synth.search_job(unique_job_id("run-search"), persons_elements=60, persons=3)
    failed = synth.failed_job(unique_job_id("run-failed"), "GetFaceDetection", "Access denied to the video")
    emu.add_jobs([srch, failed])
    await send(sqs, queues.url, enveloped(srch), enveloped(failed))
    worker = start_worker("--exit-when-idle", EVENTS_SNS_TOPIC_ARN=topic.arn, AWS_ENDPOINT_URL_SNS=moto_url)
    assert worker.wait(60) == 0, worker.lines[-10:]
    messages = await received(topic.queue_url)
    check_contract(messages, await identities(db))
    assert sorted((m.event["job_id"], m.event["type"]) for m in messages) == sorted(
        [(srch.job_id, "job.ingested"), (failed.job_id, "job.failed")])
    ingested = next(m.event for m in messages if m.event["type"] == "job.ingested")
    assert_counts_match(ingested, await job_summary(db, srch.job_id))
    assert ingested["job_tag"] == srch.job_tag
    failure = next(m.event for m in messages if m.event["type"] == "job.failed")
    assert failure["job_status"] == "FAILED" and failure["failure_code"] == "JobFailed"


async def test_delete_and_the_retention_purge_are_announced_as_job_deleted(
        settings: Settings, db_url: str, db: asyncpg.Connection, emu: Any, moto_url: str, topic: Topic) -> None:
    doomed = synth.detection_job(unique_job_id("doomed"), faces=40)
    expired = synth.detection_job(unique_job_id("expired"), faces=40)
    emu.add_jobs([doomed, expired])
    await backfill_quietly(settings, [doomed, expired])  # no topic configured: the events wait in the outbox
    assert [r["published_at"] for r in await outbox_rows(db)] == [None, None]
    result = run_cli("delete", doomed.job_id, env=events_env(db_url, moto_url, topic))
    assert result.returncode == 0, result.stderr
    await db.execute("UPDATE jobs SET ingested_at = now() - interval '40 days' WHERE job_id = $1", expired.job_id)
    engine = create_engine(settings, pool_size=1)  # one connection: the purge's, reused below
    try:
        purged = await purge_expired(engine, 30, now=datetime.now(tz=UTC))
        assert purged is not None and purged.jobs == 1
        # The purge's session setting does not outlive it: the pool's next user deletes as `delete`.
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert await raw.fetchval("SELECT current_setting('rekognition.event_reason', true)") in ("", None)
    finally:
        await engine.dispose()
    done = await flush(settings.with_(events_sns_topic_arn=topic.arn))
    assert done is not None and done.pending == 0
    messages = await received(topic.queue_url)
    check_contract(messages)
    assert per_job(messages) == {doomed.job_id: ["job.ingested", "job.deleted"],
                                 expired.job_id: ["job.ingested", "job.deleted"]}
    assert {(m.event["job_id"], m.event.get("reason")) for m in messages if m.event["type"] == "job.deleted"} == {
        (doomed.job_id, "delete"), (expired.job_id, "retention")}
    deleted = await received(topic.deleted_queue_url)
    assert [(m.event["job_id"], m.event["reason"]) for m in deleted] == [(doomed.job_id, "delete"),
                                                                        (expired.job_id, "retention")]


async def test_an_erasure_is_announced_with_the_audit_and_never_the_identifier(
        settings: Settings, db_url: str, db: asyncpg.Connection, emu: Any, moto_url: str, topic: Topic) -> None:
    fx = synth.search_job(unique_job_id("erase"), persons_elements=120, persons=4)
    emu.add_jobs([fx])
    await backfill_quietly(settings, [fx])
    forbidden = await identities(db)
    target = await db.fetchval("SELECT external_image_id FROM collection_faces ORDER BY 1 LIMIT 1")
    result = run_cli("erase", "--external-image-id", target,
                     env=events_env(db_url, moto_url, topic, ERASURE_HASH_KEY=ERASURE_KEY))
    assert result.returncode == 0, result.stderr
    messages = await received(topic.queue_url)
    check_contract(messages, forbidden | {target})
    assert sorted(m.event["type"] for m in messages) == ["identity.erased", "job.ingested"]
    erased = next(m.event for m in messages if m.event["type"] == "identity.erased")
    audit = await db.fetchrow("SELECT * FROM erasures")
    assert erased["job_id"] is None and erased["video"] is None
    assert erased["erasure"]["selector_kind"] == "external_image_id"
    assert erased["erasure"]["selector_hash"] == selector_hash(ERASURE_KEY, "external_image_id", target)
    assert erased["erasure"]["audit_id"] == audit["id"]
    assert erased["erasure"]["counts"] == {k: audit[k] for k in erased["erasure"]["counts"]}
    assert erased["erasure"]["counts"]["persons"] > 0


async def test_events_reach_an_eventbridge_bus_with_the_type_as_detail_type(
        settings: Settings, db: asyncpg.Connection, topic: Topic) -> None:
    bus = f"bus-{uuid.uuid4().hex[:8]}"
    session = get_session()
    async with session.create_client("events", region_name="us-east-1") as ev, \
            session.create_client("sqs", region_name="us-east-1") as sqs:
        await ev.create_event_bus(Name=bus)
        await ev.put_rule(Name="all", EventBusName=bus, EventPattern='{"source": ["rekognition-video-worker"]}')
        url = (await sqs.create_queue(QueueName=bus))["QueueUrl"]
        arn = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"]))["Attributes"]["QueueArn"]
        await ev.put_targets(Rule="all", EventBusName=bus, Targets=[{"Id": "q", "Arn": arn}])
        job_id = unique_job_id("bus")
        await db.execute("INSERT INTO jobs (job_id, api, ingest_state, ingested_at) "
                         "VALUES ($1, 'FACE_SEARCH', 'ingested', now())", job_id)
        done = await flush(settings.with_(events_sns_topic_arn=topic.arn, events_event_bus_name=bus))
        assert done is not None and done.delivered == 1 and done.pending == 0
        body = orjson.loads((await sqs.receive_message(QueueUrl=url))["Messages"][0]["Body"])
    assert body["detail-type"] == "job.ingested" and body["source"] == "rekognition-video-worker"
    assert body["detail"]["job_id"] == job_id
    jsonschema.validate(body["detail"], SCHEMA, cls=jsonschema.Draft202012Validator)
    assert [m.event["event_id"] for m in await received(topic.queue_url)] == [body["detail"]["event_id"]]


# --- outages and crashes --------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """An HTTP endpoint that accepts connections and never answers: a publish waits on it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for s in (*held, server):
            s.close()


async def wait_until(what: str, check: Callable[[], Any], timeout_s: float = 90) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := await check():
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_an_event_written_while_the_topic_is_unreachable_is_delivered_by_the_next_run(
        start_worker: Any, queues: Queues, sqs: Any, emu: Any, db: asyncpg.Connection,  # noqa: F811
        moto_url: str, topic: Topic) -> None:
    fx = synth.detection_job(unique_job_id("outage"), faces=50)
    emu.add_jobs([fx])
    await send(sqs, queues.url, enveloped(fx))
    first = start_worker(EVENTS_SNS_TOPIC_ARN=topic.arn, AWS_ENDPOINT_URL_SNS=f"http://127.0.0.1:{closed_port()}")

    async def refused() -> Any:
        rows = await outbox_rows(db)
        return rows if rows and rows[0]["attempts"] >= 1 else None

    rows = await wait_until("a refused delivery", refused)
    first.proc.send_signal(signal.SIGKILL)  # the publishing replica dies while the topic is unreachable
    first.wait(10)
    assert rows[0]["published_at"] is None and rows[0]["type"] == "job.ingested"
    assert any(e.get("event") == "job events not delivered; retrying with backoff" for e in first.lines)
    # Idle, but the topic still unreachable: --exit-when-idle says the events were not delivered.
    stuck = start_worker("--exit-when-idle", EVENTS_SNS_TOPIC_ARN=topic.arn, EVENTS_FLUSH_TIMEOUT_S="1",
                         AWS_ENDPOINT_URL_SNS=f"http://127.0.0.1:{closed_port()}")
    assert stuck.wait(60) == 1
    assert any(e.get("event", "").startswith("job events not delivered before exit") for e in stuck.lines)
    assert (await outbox_rows(db))[0]["published_at"] is None
    second = start_worker("--exit-when-idle", EVENTS_SNS_TOPIC_ARN=topic.arn, AWS_ENDPOINT_URL_SNS=moto_url)
    assert second.wait(60) == 0, second.lines[-10:]
    messages = await received(topic.queue_url)
    check_contract(messages)
    assert [m.event["event_id"] for m in messages] == [rows[0]["event_id"]]
    assert (await outbox_rows(db))[0]["published_at"] is not None


async def test_a_sigkill_between_the_commit_and_the_publish_delays_the_event_and_announces_only_what_happened(
        db_url: str, db: asyncpg.Connection, emu: Any, moto_url: str, topic: Topic,
        start_worker: Any, queues: Queues, sqs: Any) -> None:  # noqa: F811
    done = synth.detection_job(unique_job_id("committed"), faces=50)
    emu.add_jobs([done])
    with black_hole() as endpoint:
        # A long flush budget: the command is still waiting on the black hole whenever the kill comes.
        env = events_env(db_url, moto_url, topic, AWS_ENDPOINT_URL_REKOGNITION=emu.url, AWS_ENDPOINT_URL_SNS=endpoint,
                         REKOGNITION_TPS="200", LOG_FORMAT="json", EVENTS_FLUSH_TIMEOUT_S="300")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        full_env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                         "AWS_EC2_METADATA_DISABLED": "true", **env})
        import subprocess
        import sys

        proc = subprocess.Popen([sys.executable, "-m", "worker", "backfill", "--api", "FACE_DETECTION", done.job_id],
                                cwd=Path(__file__).resolve().parents[1], env=full_env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            async def committed() -> Any:
                return await db.fetchval("SELECT ingest_state = 'ingested' FROM jobs WHERE job_id = $1", done.job_id)

            await wait_until("the ingest's commit", committed, timeout_s=90)
            await asyncio.sleep(1.0)  # the command is now waiting on the black hole's answer
            assert proc.poll() is None
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
    rows = await outbox_rows(db)
    assert [(r["job_id"], r["type"], r["published_at"]) for r in rows] == [(done.job_id, "job.ingested", None)]
    assert await received(topic.queue_url) == []
    # A job killed before its commit: no event, nothing visible.
    slow = synth.detection_job(unique_job_id("uncommitted"), faces=300)
    emu.add_jobs([slow])
    emu.configure(latency_s=0.5)  # 15 pages: 7.5 s at least, time enough to kill it mid-job
    try:
        await send(sqs, queues.url, enveloped(slow))
        killed = start_worker(PAGE_SIZE="20", EVENTS_SNS_TOPIC_ARN=topic.arn, AWS_ENDPOINT_URL_SNS=moto_url)

        async def writing() -> Any:
            return await db.fetchval("SELECT EXISTS (SELECT 1 FROM ingests WHERE job_id = $1)", slow.job_id)

        await wait_until("the slow job's first page", writing, timeout_s=90)
        assert await db.fetchval("SELECT count(*) FROM jobs WHERE job_id = $1 AND ingest_state = 'ingested'",
                                 slow.job_id) == 0
        killed.proc.send_signal(signal.SIGKILL)
        killed.wait(10)
    finally:
        emu.configure(latency_s=0.0)
    assert [r["job_id"] for r in await outbox_rows(db)] == [done.job_id]
    rerun = start_worker("--exit-when-idle", EVENTS_SNS_TOPIC_ARN=topic.arn, AWS_ENDPOINT_URL_SNS=moto_url,
                         VISIBILITY_TIMEOUT_S="2")
    assert rerun.wait(90) == 0, rerun.lines[-10:]
    messages = await received(topic.queue_url)
    check_contract(messages)
    assert sorted((m.event["job_id"], m.event["type"]) for m in messages) == sorted(
        [(done.job_id, "job.ingested"), (slow.job_id, "job.ingested")])
    assert rows[0]["event_id"] in {m.event["event_id"] for m in messages}


# --- operations ----------------------------------------------------------------------------------------


async def test_events_list_and_replay_redeliver_the_same_event_ids(
        db_url: str, db: asyncpg.Connection, moto_url: str, topic: Topic, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from worker.cli import main

    jobs = [unique_job_id("replay") for _ in range(3)]
    for job_id in jobs:
        await db.execute("INSERT INTO jobs (job_id, api, ingest_state, ingested_at) "
                         "VALUES ($1, 'FACE_DETECTION', 'ingested', now())", job_id)
    listed = run_cli("events", "list", "--pending", "--format", "json", env={"DATABASE_URL": db_url})
    assert listed.returncode == 0, listed.stderr
    pending = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(p["job_id"] for p in pending) == sorted(jobs)
    for p in pending:
        jsonschema.validate(p["event"], SCHEMA, cls=jsonschema.Draft202012Validator)
        assert p["published_at"] is None and p["event"]["event_id"] == p["event_id"]
    first = await flush(Settings(database_url=db_url, events_sns_topic_arn=topic.arn))
    assert first is not None and first.delivered == 3
    delivered = {m.event["event_id"] for m in await received(topic.queue_url)}
    assert delivered == {p["event_id"] for p in pending}
    since = (datetime.now(tz=UTC) - timedelta(hours=1)).isoformat()
    replay = run_cli("events", "replay", "--since", since, env=events_env(db_url, moto_url, topic))
    assert replay.returncode == 0, replay.stderr
    again = await received(topic.queue_url)
    check_contract(again)
    assert sorted(m.event["event_id"] for m in again) == sorted(delivered)

    # The rest in this process (the CLI runs its own loop, so off this one): the same code, faster.
    async def cli(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("LOG_FORMAT", "console")
    capsys.readouterr()  # what this test logged so far
    assert await cli("events", "list", "--pending", "--format", "json") == (0, "", "")
    code, _, err = await cli("events", "replay", "--since", "2020-01-01")
    assert code == 2 and "EVENTS_SNS_TOPIC_ARN" in err and err.count("\n") == 1  # nowhere to deliver to
    monkeypatch.setenv("EVENTS_SNS_TOPIC_ARN", topic.arn)
    code, _, err = await cli("events", "replay", "--since", "2020-01-01", "--job", jobs[0])
    assert code == 0, err
    assert [m.event["job_id"] for m in await received(topic.queue_url)] == [jobs[0]]
    code, _, err = await cli("events", "replay", "--since", "2099-01-01")
    assert code == 3 and err.count("\n") == 1 and "no events" in err  # nothing matched: not found
    code, _, err = await cli("events", "replay", "--since", "yesterday")
    assert code == 2 and "ISO 8601" in err and "Traceback" not in err
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    code, _, err = await cli("events", "list")
    assert code == 4 and err.startswith("error: ") and "127.0.0.1:1" in err and err.count("\n") == 1  # unavailable


async def test_run_reads_the_backlog_into_the_metrics(settings: Settings, db: asyncpg.Connection, topic: Topic,
                                                     moto_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import REGISTRY

    job_id = unique_job_id("metrics")
    await db.execute("INSERT INTO jobs (job_id, api, ingest_state, ingested_at) "
                     "VALUES ($1, 'FACE_DETECTION', 'ingested', now())", job_id)
    await db.execute("UPDATE event_outbox SET occurred_at = now() - interval '90 seconds'")
    unreachable = settings.with_(events_sns_topic_arn=topic.arn, events_poll_interval_s=0.1)
    failures = REGISTRY.get_sample_value(_FAILURES, {"destination": "sns"}) or 0.0
    stop = asyncio.Event()
    monkeypatch.setenv("AWS_ENDPOINT_URL_SNS", f"http://127.0.0.1:{closed_port()}")
    task = asyncio.create_task(run_publisher(unreachable, stop))
    try:
        await wait_until("the backlog in the metrics",
                         _async(lambda: (REGISTRY.get_sample_value(_PENDING) or 0) >= 1))
        assert REGISTRY.get_sample_value("rekognition_worker_events_oldest_pending_age_seconds") >= 90
        assert REGISTRY.get_sample_value(_FAILURES, {"destination": "sns"}) > failures
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SNS", moto_url)
    # The same loop with the topic reachable delivers it and reads an empty backlog.
    stop = asyncio.Event()
    task = asyncio.create_task(run_publisher(unreachable, stop))
    try:
        await wait_until("the backlog delivered",
                         _async(lambda: REGISTRY.get_sample_value(_PENDING) == 0), timeout_s=60)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert [m.event["job_id"] for m in await received(topic.queue_url)] == [job_id]


def _async(check: Callable[[], Any]) -> Callable[[], Any]:
    async def run() -> Any:
        return check()

    return run


def test_destinations_name_fifo_groups_by_job(settings: Settings) -> None:
    from worker.events.publisher import eventbridge_entry, sns_message

    event = Event(1, str(uuid.uuid4()), "job.deleted", "job-1", '{"a": 1}')
    plain = sns_message(event, "arn:aws:sns:us-east-1:1:t")
    assert plain["MessageAttributes"] == {"type": {"DataType": "String", "StringValue": "job.deleted"}}
    assert "MessageGroupId" not in plain and plain["Message"] == '{"a": 1}'
    fifo = sns_message(event, "arn:aws:sns:us-east-1:1:t.fifo")
    assert (fifo["MessageGroupId"], fifo["MessageDeduplicationId"]) == ("job-1", event.event_id)
    assert eventbridge_entry(event, "b") == {"Source": "rekognition-video-worker", "DetailType": "job.deleted",
                                             "Detail": '{"a": 1}', "EventBusName": "b"}
    assert not Destinations().enabled


async def test_each_change_writes_exactly_its_own_event(settings: Settings, db: asyncpg.Connection,
                                                      emu: Any) -> None:
    """Through the real writers: a reprocess is an ingest; a failed re-attempt that keeps the complete ingest,
    an erasure's counter update and the hiding of a large job being deleted are not events of their own."""
    from worker.db.store import Store
    from worker.lifecycle import delete_job, erase
    from worker.reprocess import run_reprocess

    fx = synth.search_job(unique_job_id("changes"), persons_elements=80, persons=4)
    emu.add_jobs([fx])
    await backfill_quietly(settings, [fx])

    async def types() -> list[str]:
        return [r["type"] for r in await outbox_rows(db) if r["job_id"] in (fx.job_id, None)]

    assert await types() == ["job.ingested"]
    assert [o.outcome for o in await run_reprocess(settings, [fx.job_id])] == ["ingested"]
    assert await types() == ["job.ingested", "job.ingested"]
    engine = create_engine(settings, pool_size=1)
    try:
        kept = await Store(engine).record_failure(JobRef.create(fx.job_id, fx.api), code="RepeatedFailure",
                                                  reason="a re-attempt failed")
        assert kept is False  # the complete ingest stays: nothing changed for readers, no event
        assert await types() == ["job.ingested", "job.ingested"]
        target = await db.fetchval("SELECT external_image_id FROM collection_faces ORDER BY 1 LIMIT 1")
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            await erase(raw, "external_image_id", target, key=ERASURE_KEY)
            assert await types() == ["job.ingested", "job.ingested", "identity.erased"]
            faces = await db.fetchval("SELECT faces FROM jobs WHERE job_id = $1", fx.job_id)
            assert faces > 10
            # More faces than a chunk: hidden first (failed, Deleting), then deleted in batches.
            assert (await delete_job(raw, fx.job_id, chunk_faces=10)).outcome == "deleted"
    finally:
        await engine.dispose()
    assert await types() == ["job.ingested", "job.ingested", "identity.erased", "job.deleted"]
    rows = [orjson.loads(r["payload"]) for r in await outbox_rows(db)]
    for event in rows:
        jsonschema.validate(event, SCHEMA, cls=jsonschema.Draft202012Validator)
    assert rows[1]["ingested_at"] > rows[0]["ingested_at"] and rows[1]["event_id"] != rows[0]["event_id"]
