"""Helpers shared by the SQS worker tests (test_service.py, test_service_process.py); no tests here.

Everything talks to real components: moto's SQS server over HTTP, the Rekognition emulator over
HTTP, and the suite's PostgreSQL.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
from aiobotocore.session import get_session
from rich.console import Console

from tests.conftest import create_database as create_database_as
from tests.helpers import job_rows_sql
from worker.backfill import run_backfill
from worker.config import Settings
from worker.db.store import ArchivedPage
from worker.local import synth
from worker.local.sqs import create_queue_with_dlq, notification, sns_envelope
from worker.messages import JobRef

# Result tables of one job and a total order for each, for row-by-row comparison.
RESULT_ORDER = {
    "faces": "face_seq",
    "landmarks": "face_seq",  # one row per face since 0012
    "emotions": "face_seq",
    "face_matches": "face_seq, ordinal",
    "collection_faces": "face_id",
    "persons": "person_index",
}
# jobs columns that record when and how often a job was written, not what was stored.
# completed_at too: it comes from the notification, which a backfill does not have.
# ingest_id too: each ingest writes under a key of its own (0012).
BOOKKEEPING = ("attempts", "notified_at", "completed_at", "ingest_started_at", "ingested_at", "updated_at",
               "ingest_id", "first_ingested_at")


@dataclass(frozen=True)
class Queues:
    url: str
    dlq_url: str


async def make_queues(sqs: Any, *, visibility_timeout_s: int = 2, max_receive_count: int = 2) -> Queues:
    url, dlq_url = await create_queue_with_dlq(sqs, f"ingest-{uuid.uuid4().hex[:12]}",
                                               visibility_timeout_s=visibility_timeout_s,
                                               max_receive_count=max_receive_count)
    return Queues(url, dlq_url)


@asynccontextmanager
async def sqs_client() -> AsyncIterator[Any]:
    """A client resolved the way the worker resolves it: AWS_ENDPOINT_URL_SQS from the environment."""
    async with get_session().create_client("sqs", region_name="us-east-1") as client:
        yield client


async def send(sqs: Any, queue_url: str, *bodies: str) -> None:
    for body in bodies:
        await sqs.send_message(QueueUrl=queue_url, MessageBody=body)


async def queue_counts(sqs: Any, queue_url: str) -> tuple[int, int, int]:
    """(visible, in flight, delayed)."""
    attrs = (await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible", "ApproximateNumberOfMessagesDelayed",
    ]))["Attributes"]
    return (int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"]),
            int(attrs["ApproximateNumberOfMessagesDelayed"]))


async def take_all(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    """Every visible message (hidden for a minute, so each is returned once)."""
    out: list[dict[str, Any]] = []
    while True:
        resp = await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                         VisibilityTimeout=60,
                                         MessageSystemAttributeNames=["ApproximateReceiveCount"])
        batch = resp.get("Messages", [])
        if not batch:
            return out
        out.extend(batch)


def enveloped(fixture: synth.JobFixture, **kw: Any) -> str:
    return sns_envelope(notification(fixture, **kw))


def raw(fixture: synth.JobFixture, **kw: Any) -> str:
    return orjson.dumps(notification(fixture, **kw)).decode()


def plain(fixture: synth.JobFixture) -> str:
    return orjson.dumps({"JobId": fixture.job_id, "API": fixture.api}).decode()


def detection(emulator: Any, prefix: str = "det", *, faces: int = 60, seed: int = 1) -> synth.JobFixture:
    fx = synth.detection_job(unique_id(prefix), faces=faces, attributes="DEFAULT", seed=seed)
    emulator.add_job(fx)
    return fx


def search(emulator: Any, prefix: str = "search", *, elements: int = 40, seed: int = 2) -> synth.JobFixture:
    fx = synth.search_job(unique_id(prefix), persons_elements=elements, persons=4, seed=seed)
    emulator.add_job(fx)
    return fx


def unique_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


async def create_database(pg_server_url: str, template_db: str, name: str | None = None) -> str:
    """A fresh migrated database beside the test's own (the caller drops it with drop_database)."""
    name = name or f"ref_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_server_url)
    try:
        await create_database_as(conn, name, template_db)
    finally:
        await conn.close()
    parts = urlsplit(pg_server_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


async def drop_database(pg_server_url: str, url: str) -> None:
    name = database_name(url)
    conn = await asyncpg.connect(pg_server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def plain_backfill(settings: Settings, database_url: str, fixtures: list[synth.JobFixture]) -> None:
    """What `python -m worker backfill` stores for these jobs, in ``database_url``."""
    refs = [JobRef.create(f.job_id, f.api) for f in fixtures]
    outcomes = await run_backfill(settings.with_(database_url=database_url), refs,
                                  console=Console(file=io.StringIO()))
    assert [o.outcome for o in outcomes] == ["ingested"] * len(refs), outcomes


async def snapshot(database_url: str, job_id: str) -> dict[str, Any]:
    """Everything stored for one job, bookkeeping columns aside."""
    conn = await asyncpg.connect(database_url)
    try:
        out: dict[str, Any] = {}
        job = await conn.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)
        out["jobs"] = None if job is None else {k: v for k, v in dict(job).items() if k not in BOOKKEEPING}
        for table, order in RESULT_ORDER.items():
            rows = await conn.fetch(job_rows_sql(table) + f" ORDER BY {order}", job_id)
            out[table] = [tuple(v for k, v in r.items() if k != "ingest_id") for r in rows]
        pages = await conn.fetch(job_rows_sql("raw_pages", "page_no, encoding, body_bytes, body") + " ORDER BY page_no",
                                 job_id)
        out["raw_pages"] = [
            (p["page_no"], p["encoding"], p["body_bytes"],
             ArchivedPage(bytes(p["body"]), p["body_bytes"], p["encoding"]).decompress())
            for p in pages
        ]
        return out
    finally:
        await conn.close()


async def job_row(database_url: str, job_id: str) -> dict[str, Any] | None:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)
        return None if row is None else dict(row)
    finally:
        await conn.close()


async def stored_rows(database_url: str, job_id: str) -> int:
    """Rows of the job in every result table, as readers see them (0: nothing partial was left behind)."""
    conn = await asyncpg.connect(database_url)
    try:
        total = 0
        for table in (*RESULT_ORDER, "raw_pages"):
            total += int(await conn.fetchval(job_rows_sql(table, "count(*)"), job_id))
        return total
    finally:
        await conn.close()


POISON_BODIES = (
    "this is not a notification",
    "[1, 2, 3]",
    # A video name that names a person: logs must not carry it (worker/logsafe.py).
    '{"JobId": "has spaces and !", "API": "StartFaceDetection", "Status": "SUCCEEDED", '
    '"Video": {"S3ObjectName": "interviews/anna.m4v", "S3Bucket": "media"}}',
    '{"JobId": "label-job-0001", "API": "StartLabelDetection", "Status": "SUCCEEDED"}',
    '{"JobId": 12345, "API": "StartFaceSearch"}',
    '{"JobId": "wrong-type-api", "API": ["StartFaceSearch"]}',
    '{"API": "StartFaceDetection", "Status": "SUCCEEDED"}',
    '{"JobId": "bad-status-0001", "API": "FACE_SEARCH", "Status": 7}',
    '{"Type": "Notification", "Message": {"JobId": "nested-not-string", "API": "StartFaceSearch"}}',
    '{"Type": "Notification", "Message": "not json either"}',
)
