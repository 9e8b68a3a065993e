"""`python -m worker demo`: the whole pipeline on the embedded local stack.

Embedded PostgreSQL (unless DATABASE_URL is set), the Rekognition emulator on loopback, and moto's
SQS and S3: half the sample jobs go through `backfill`, the other half arrive as SNS-enveloped completion
notifications (plus a duplicate and a poison message) that the SQS worker drains. Then a video library
in S3 goes the whole way: `submit` records it, and the worker starts its jobs under an account limit of
4 concurrent jobs, collects their notifications (one of which Rekognition loses) and ingests them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import orjson
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
from worker.messages import Api, JobRef
from worker.queue import describe_queue
from worker.runtime import open_runtime
from worker.service import SqsWorker, open_scheduler
from worker.submissions import StartOptions
from worker.submit import run_submit

PGDATA = Path(".local") / "pgdata"


# The demo library: videos Rekognition analyses, and files `submit` passes over.
LIBRARY_BUCKET = "demo-video-library"
LIBRARY_VIDEOS = ("lobby/monday.mp4", "lobby/tuesday.MP4", "keynote/part-1.mov", "keynote/part-2.mov",
                  "interviews/anna.m4v", "interviews/ben.mp4")
LIBRARY_OTHERS = ("lobby/README.txt", "keynote/slides.pdf", "interviews/anna.jpg")
DEMO_TOPIC = "arn:aws:sns:us-east-1:123456789012:rekognition-demo"
DEMO_ROLE = "arn:aws:iam::123456789012:role/rekognition-demo-publish"


def _local_aws_env(rekognition_url: str, sqs_url: str) -> None:
    # The demo's own stack: point botocore's standard endpoint variables at it, with dummy keys.
    os.environ["AWS_ENDPOINT_URL_REKOGNITION"] = rekognition_url
    os.environ["AWS_ENDPOINT_URL_SQS"] = sqs_url
    os.environ["AWS_ENDPOINT_URL_S3"] = sqs_url  # moto's server answers both
    os.environ["AWS_ENDPOINT_URL_SNS"] = sqs_url  # and the job events' topic
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


async def _library_path(settings: Settings, emu: EmulatorThread, moto_url: str) -> dict[str, Any]:
    """`submit` a library in moto's S3, then one worker starts, collects and ingests it."""
    session = get_session()
    async with session.create_client("s3", region_name=settings.aws_region) as s3, \
            session.create_client("sqs", region_name=settings.aws_region) as sqs:
        await s3.create_bucket(Bucket=LIBRARY_BUCKET)
        for key in LIBRARY_VIDEOS + LIBRARY_OTHERS:
            await s3.put_object(Bucket=LIBRARY_BUCKET, Key=key, Body=b"demo")
        queue_url, _ = await create_queue_with_dlq(sqs, "rekognition-demo-library", visibility_timeout_s=30,
                                                   max_receive_count=3)
        # An account that allows 4 concurrent jobs and loses one completion notification.
        emu.configure(max_concurrent_jobs=4, job_duration_s=1.0, drop_notifications=1, started_job_faces=300,
                      notification_queue_url=queue_url, sqs_endpoint_url=moto_url)
        run_settings = settings.with_(queue_url=queue_url, poll_wait_s=1, heartbeat_interval_s=10.0,
                                      visibility_timeout_s=30, rekognition_sns_topic_arn=DEMO_TOPIC,
                                      rekognition_role_arn=DEMO_ROLE, submit_sweep_after_s=4.0,
                                      submit_poll_interval_s=0.5)
        t0 = time.perf_counter()
        submitted = await run_submit(run_settings, StartOptions.create(Api.FACE_DETECTION, face_attributes="ALL"),
                                     [f"s3://{LIBRARY_BUCKET}/"], None, force=False)
        async with contextlib.AsyncExitStack() as stack:
            rt = await stack.enter_async_context(open_runtime(run_settings))
            scheduler = await open_scheduler(run_settings, rt, sqs, queue_url, stack)
            worker = SqsWorker(run_settings, rt, sqs, await describe_queue(sqs, queue_url), scheduler=scheduler)
            await asyncio.wait_for(worker.run(exit_when_idle=True), timeout=300)
        elapsed_s = time.perf_counter() - t0
        again = await run_submit(run_settings, StartOptions.create(Api.FACE_DETECTION, face_attributes="ALL"),
                                 [f"s3://{LIBRARY_BUCKET}/"], None, force=False)
    stats = emu.stats()
    return {"submitted": submitted, "again": again, "seconds": elapsed_s, "stats": stats}


async def _events_path(settings: Settings) -> dict[str, int]:
    """Deliver the job events the paths above wrote to a moto SNS topic; count what its subscribed queue got."""
    from worker.events.publisher import flush

    session = get_session()
    async with session.create_client("sns", region_name=settings.aws_region) as sns, \
            session.create_client("sqs", region_name=settings.aws_region) as sqs:
        topic = (await sns.create_topic(Name="rekognition-demo-job-events"))["TopicArn"]
        queue_url = (await sqs.create_queue(QueueName="rekognition-demo-job-events"))["QueueUrl"]
        queue_arn = (await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"]))["Attributes"][
            "QueueArn"]
        await sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn,
                            Attributes={"RawMessageDelivery": "true"})
        await flush(settings.with_(events_sns_topic_arn=topic), timeout_s=60)
        counts: dict[str, int] = {}
        while batch := (await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                                  VisibilityTimeout=60)).get("Messages", []):
            for m in batch:
                kind = orjson.loads(m["Body"])["type"]
                counts[kind] = counts.get(kind, 0) + 1
        return counts


async def _backfill_path(settings: Settings, fixtures: list[synth.JobFixture]) -> list[JobOutcome]:
    async with open_runtime(settings) as rt:
        refs = [JobRef.create(f.job_id, f.api) for f in fixtures]
        return await rt.ingestor.ingest_many(refs, concurrency=settings.max_concurrent_jobs)


async def _summary(settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    conn = await connect(settings.asyncpg_dsn)
    try:
        rows = await conn.fetch(
            "SELECT job_id, api, job_status, ingest_state, pages, faces, persons, collection_matches, "
            "coalesce(failure_reason, '') AS reason FROM reporting.job_summary ORDER BY job_id"
        )
        library = await conn.fetch(
            "SELECT s.video_name, s.state, s.job_id, s.probes, j.faces, "
            "extract(epoch FROM s.ingested_at - s.submitted_at) AS seconds "
            "FROM reporting.submissions s LEFT JOIN reporting.job_summary j USING (job_id) "
            "WHERE s.video_bucket = $1 ORDER BY s.video_name", LIBRARY_BUCKET)
        return [dict(r) for r in rows], [dict(r) for r in library]
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
            library = asyncio.run(_library_path(settings, emu, sqs_url))
            events = asyncio.run(_events_path(settings))
    finally:
        moto_server.stop()
    jobs, videos = asyncio.run(_summary(settings))
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
    _print_library(console, library, videos)
    console.print("job events delivered to an SNS topic, read back from the SQS queue subscribed to it: "
                  + (", ".join(f"{kind} {n}" for kind, n in sorted(events.items())) or "none")
                  + " (docs/events.md; python -m worker events list)")
    console.print(f"explore: psql '{redact_url(settings.asyncpg_dsn)}'  (e.g. SELECT * FROM reporting.job_summary;)")
    if settings.database_url and PGDATA.exists():
        console.print("stop the embedded PostgreSQL with: .venv/bin/python -m worker demo --stop")
    ingested = {j["job_id"] for j in jobs if j["ingest_state"] == "ingested"}
    expected = {f.job_id for f in fixtures if f.job_status == "SUCCEEDED"}
    library_jobs = {v["job_id"] for v in videos}
    failed_ok = all(j["ingest_state"] == "failed" for j in jobs if j["job_id"] not in expected | library_jobs)
    library_ok = (len(videos) == len(LIBRARY_VIDEOS) and all(v["state"] == "ingested" for v in videos)
                  and library["again"].new == 0)
    return 0 if expected <= ingested and failed_ok and dlq_depth == 1 and library_ok else 1


def _print_library(console: Console, library: dict[str, Any], videos: list[dict[str, Any]]) -> None:
    table = Table(title=f"demo: the library s3://{LIBRARY_BUCKET}/ in reporting.submissions")
    for col in ("video", "state", "job", "faces", "probes", "submit to rows (s)"):
        table.add_column(col)
    for v in videos:
        table.add_row(v["video_name"], v["state"], v["job_id"] or "", str(v["faces"] or 0), str(v["probes"]),
                      f"{float(v['seconds'] or 0):.1f}")
    console.print(table)
    sub, again, stats = library["submitted"], library["again"], library["stats"]
    console.print(
        f"library path: submit found {sub.new} videos and skipped {sub.skipped} other files; the account allowed 4 "
        f"jobs at once (peak {stats.get('peak_running')}, LimitExceeded {stats.get('limit_exceeded')} times, "
        f"waited out), Rekognition lost {stats.get('notifications_dropped')} notification(s) (found by a probe); "
        f"last row {max((float(v['seconds'] or 0) for v in videos), default=0.0):.1f} s after submit, the worker done "
        f"after {library['seconds']:.1f} s; submitting again: {again.new} new, {again.known} already known")


def stop_demo(console: Console) -> int:
    if stop_embedded_postgres(PGDATA):
        console.print(f"stopped the embedded PostgreSQL at {PGDATA}")
    else:
        console.print("no embedded PostgreSQL is running")
    return 0
