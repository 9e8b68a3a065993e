"""`python -m worker demo`: the whole pipeline on the embedded local stack.

Embedded PostgreSQL (unless DATABASE_URL is set), the Rekognition emulator on loopback, and moto's
SQS: half the sample jobs go through `backfill`, the other half arrive as SNS-enveloped completion
notifications (plus a duplicate and a poison message) that the SQS worker drains.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session
from rich.console import Console
from rich.table import Table

from worker.config import Settings, redact_url
from worker.db.engine import connect
from worker.db.migrate import upgrade_to_head
from worker.ingest import JobOutcome
from worker.local import synth
from worker.local.emulator import EmulatorConfig, EmulatorThread
from worker.local.pg import start_embedded_postgres, stop_embedded_postgres
from worker.local.sqs import create_queue_with_dlq, notification, sns_envelope, start_moto_server
from worker.logs import configure_logging
from worker.messages import JobRef
from worker.queue import describe_queue
from worker.runtime import open_runtime
from worker.service import SqsWorker

PGDATA = Path(".local") / "pgdata"


def _local_aws_env(rekognition_url: str, sqs_url: str) -> None:
    # The demo's own stack: point botocore's standard endpoint variables at it, with dummy keys.
    os.environ["AWS_ENDPOINT_URL_REKOGNITION"] = rekognition_url
    os.environ["AWS_ENDPOINT_URL_SQS"] = sqs_url
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


async def _queue_path(settings: Settings, fixtures: list[synth.JobFixture]) -> tuple[dict[str, int], int, int]:
    """Publish notifications for ``fixtures`` into a moto queue and drain it with the worker."""
    session = get_session()
    async with session.create_client("sqs", region_name=settings.aws_region) as sqs:
        queue_url, dlq_url = await create_queue_with_dlq(sqs, "rekognition-demo", visibility_timeout_s=30,
                                                         max_receive_count=2)
        bodies = [sns_envelope(notification(f)) for f in fixtures]
        bodies.append(sns_envelope(notification(fixtures[0])))  # SNS delivers at least once
        bodies.append("this is not a notification")  # a poison message: ends in the DLQ, never deleted
        for body in bodies:
            await sqs.send_message(QueueUrl=queue_url, MessageBody=body)
        run_settings = settings.with_(queue_url=queue_url, poll_wait_s=1, not_ready_delay_s=1,
                                      heartbeat_interval_s=10.0, visibility_timeout_s=30)
        async with open_runtime(run_settings) as rt:
            worker = SqsWorker(run_settings, rt, sqs, await describe_queue(sqs, queue_url))
            await asyncio.wait_for(worker.run(exit_when_idle=True), timeout=300)
        dlq = (await sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["ApproximateNumberOfMessages"]))
        left = (await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"]))
        return (worker.counters.by_outcome, int(dlq["Attributes"]["ApproximateNumberOfMessages"]),
                int(left["Attributes"]["ApproximateNumberOfMessages"]))


async def _backfill_path(settings: Settings, fixtures: list[synth.JobFixture]) -> list[JobOutcome]:
    async with open_runtime(settings) as rt:
        refs = [JobRef.create(f.job_id, f.api) for f in fixtures]
        return await rt.ingestor.ingest_many(refs, concurrency=settings.max_concurrent_jobs)


async def _summary(settings: Settings) -> list[dict[str, Any]]:
    conn = await connect(settings.asyncpg_dsn)
    try:
        rows = await conn.fetch(
            "SELECT job_id, api, job_status, ingest_state, pages, faces, persons, collection_matches, "
            "coalesce(failure_reason, '') AS reason FROM reporting.job_summary ORDER BY job_id"
        )
        return [dict(r) for r in rows]
    finally:
        await conn.close()


def run_demo(settings: Settings, console: Console) -> int:
    started = time.perf_counter()
    if "LOG_LEVEL" not in os.environ:
        # The summary below tells the story; per-message log lines would bury it (LOG_LEVEL=info shows them).
        configure_logging("warning", settings.log_format)
    if settings.database_url is None:
        _, url = start_embedded_postgres(PGDATA, keep_running=True)
        settings = settings.with_(database_url=url)
        console.print(f"embedded PostgreSQL at {PGDATA} ([dim]{url}[/])")
    fixtures = synth.demo_jobs()
    moto_server, sqs_url = start_moto_server()
    try:
        with EmulatorThread(EmulatorConfig(quota_tps=max(settings.rekognition_tps, 5.0)), jobs=fixtures) as emu:
            _local_aws_env(emu.url, sqs_url)
            console.print(f"Rekognition emulator at {emu.url}, moto SQS at {sqs_url}")
            upgrade_to_head(settings)
            direct, queued = fixtures[::2], fixtures[1::2]
            t0 = time.perf_counter()
            outcomes = asyncio.run(_backfill_path(settings, direct))
            backfill_s = time.perf_counter() - t0
            by_outcome, dlq_depth, left = asyncio.run(_queue_path(settings, queued))
            stats = emu.stats()
    finally:
        moto_server.stop()
    jobs = asyncio.run(_summary(settings))
    table = Table(title="demo: jobs in reporting.job_summary")
    for col in ("job", "api", "job status", "ingest", "pages", "faces", "persons", "matches", "reason"):
        table.add_column(col)
    for j in jobs:
        table.add_row(j["job_id"], j["api"], str(j["job_status"]), j["ingest_state"], str(j["pages"]), str(j["faces"]),
                      str(j["persons"]), str(j["collection_matches"]), j["reason"][:60])
    console.print(table)
    faces = sum(j["faces"] for j in jobs)
    backfill_faces = sum(o.faces for o in outcomes)
    console.print(f"backfill path: {', '.join(f'{o.job_id}={o.outcome}' for o in outcomes)}; "
                  f"{backfill_faces} faces in {backfill_s:.2f} s = {backfill_faces / backfill_s:,.0f} faces/s")
    console.print(f"queue path: outcomes {by_outcome}; dead-letter queue holds {dlq_depth}; main queue holds {left}")
    console.print(
        f"jobs {len(jobs)}, faces {faces}, persons {sum(j['persons'] for j in jobs)}, "
        f"matches {sum(j['collection_matches'] for j in jobs)}; Rekognition calls {stats.get('requests')}, "
        f"throttled {stats.get('throttled')}; total {time.perf_counter() - started:.1f} s"
    )
    console.print(f"explore: psql '{redact_url(settings.asyncpg_dsn)}'  (e.g. SELECT * FROM reporting.job_summary;)")
    if settings.database_url and PGDATA.exists():
        console.print("stop the embedded PostgreSQL with: .venv/bin/python -m worker demo --stop")
    ingested = {j["job_id"] for j in jobs if j["ingest_state"] == "ingested"}
    expected = {f.job_id for f in fixtures if f.job_status == "SUCCEEDED"}
    failed_ok = all(j["ingest_state"] == "failed" for j in jobs if j["job_id"] not in expected)
    return 0 if expected <= ingested and failed_ok and dlq_depth == 1 else 1


def stop_demo(console: Console) -> int:
    if stop_embedded_postgres(PGDATA):
        console.print(f"stopped the embedded PostgreSQL at {PGDATA}")
    else:
        console.print("no embedded PostgreSQL is running")
    return 0
