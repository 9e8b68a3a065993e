"""Credentials and IAM errors are the deployment's, not the job's: nothing is deleted, failed or dead-lettered;
the worker pauses after a run of them, reports not ready, and resumes by itself once a probe succeeds.

Real components: moto's SQS server, the Rekognition emulator over HTTP (its ``access_denied`` switch
answers AccessDeniedException to every call, as after a bad IAM deploy), PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import io
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from rich.console import Console
from test_service import FAST, events, logs_with_context, metric, wait_until
from test_service_support import (
    Queues,
    detection,
    enveloped,
    job_row,
    queue_counts,
    send,
    unique_id,
)

from worker import backfill
from worker.commands import backfill as backfill_command
from worker.commands.base import Context
from worker.config import Settings
from worker.credentials import CredentialsGate
from worker.ingest import JobOutcome
from worker.local import synth
from worker.service import SqsWorker, run_service


@pytest.fixture
def wsettings(settings: Settings, queues: Queues) -> Settings:
    return settings.with_(queue_url=queues.url, poll_wait_s=1, visibility_timeout_s=2, heartbeat_interval_s=0.5,
                          not_ready_delay_s=1, not_ready_max_delay_s=2, shutdown_grace_s=5.0, health_port=0,
                          max_concurrent_jobs=1, credentials_pause_after=3, credentials_probe_interval_s=0.3)


async def readyz(worker: SqsWorker) -> tuple[int, dict[str, Any]]:
    assert worker.health is not None
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{worker.health.bound_port}/readyz") as r:
        return r.status, await r.json()


async def test_access_denied_pauses_the_worker_and_a_probe_resumes_it(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    jobs = [detection(emu, faces=20, seed=n) for n in range(4)]
    failed = synth.failed_job(unique_id("failed"), "GetFaceDetection", "Unsupported codec")
    emu.add_job(failed)
    emu.configure(access_denied=True)  # the deployment's role lost rekognition:Get*
    await send(sqs, queues.url, *(enveloped(j) for j in jobs), enveloped(failed))
    failures_before = metric("rekognition_worker_credentials_failures_total")
    probes_before = metric("rekognition_worker_rekognition_calls_total", operation="GetFaceDetection",
                           outcome="credentials_error")
    workers: list[SqsWorker] = []

    def ready(worker: SqsWorker) -> None:
        worker.retry_policy = FAST  # a transient job is back in 1 s, not 10
        workers.append(worker)

    async with asyncio.timeout(60):
        with logs_with_context() as logs:
            service = asyncio.create_task(run_service(wsettings, ready=ready))
            try:
                await wait_until(lambda: bool(workers), 15, "the service to start")
                worker = workers[0]
                await wait_until(lambda: worker.credentials.paused, 15, "the pause")
                assert metric("rekognition_worker_credentials_failures_total") - failures_before == 3
                assert metric("rekognition_worker_credentials_paused") == 1
                status, body = await readyz(worker)
                assert status == 503 and body["checks"]["database"] == "ok"
                assert body["checks"]["credentials"].startswith("paused: AWS refused the credentials 3 times")
                assert "AccessDeniedException" in body["checks"]["credentials"]
                # Paused: no message is taken while the probes keep failing; none is deleted or dead-lettered.
                received = worker.counters.received
                await wait_until(lambda: metric("rekognition_worker_rekognition_calls_total",
                                                operation="GetFaceDetection", outcome="credentials_error")
                                 - probes_before >= 5, 10, "probes")
                assert worker.counters.received == received == 3
                assert sum(await queue_counts(sqs, queues.url)) == 5
                assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)
                emu.configure(access_denied=False)  # the IAM fix is deployed
                await wait_until(lambda: not worker.credentials.paused, 10, "the resume")
                assert metric("rekognition_worker_credentials_paused") == 0
                assert (await readyz(worker))[0] == 200
                await wait_until(lambda: worker.counters.by_outcome.get("ingested", 0) == 4
                                 and worker.counters.by_outcome.get("failed", 0) == 1, 20, "every job")
                assert await queue_counts(sqs, queues.url) == (0, 0, 0)
            finally:
                if workers:
                    workers[0].request_stop()
                assert await asyncio.wait_for(service, 15) == 0
    assert worker.counters.by_outcome["transient"] == 3
    assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)
    for job in jobs:
        row = await job_row(db_url, job.job_id)
        assert row is not None and row["ingest_state"] == "ingested" and row["attempts"] == 1
        assert row["faces"] == len(job.results)
    # Recorded once Rekognition could be asked, with its own StatusMessage.
    assert (await job_row(db_url, failed.job_id) or {}).get("failure_reason") == "Unsupported codec"
    paused = events(logs, "AWS refuses the worker's credentials")
    assert len(paused) == 1 and paused[0]["log_level"] == "warning" and paused[0]["failures_in_row"] == 3
    resumed = events(logs, "AWS accepts the worker's credentials again")
    assert len(resumed) == 1 and resumed[0]["log_level"] == "info"
    assert "ResourceNotFoundException" in resumed[0]["probe"]
    refused = [e for e in events(logs, "job finished") if "AccessDeniedException" in str(e.get("reason"))]
    assert len(refused) == 3 and all(e["outcome"] == "transient" for e in refused)


async def test_only_credential_failures_in_a_row_pause() -> None:
    """A job that Rekognition answered starts the count again; one that made no call proves nothing."""
    gate = CredentialsGate(pause_after=2, probe_interval_s=60, probe=None)
    denied = JobOutcome("j", "FACE_DETECTION", "transient", reason="AccessDeniedException", credentials_error=True)
    for outcome in (denied, JobOutcome("j", "FACE_DETECTION", "ingested"), denied,
                    JobOutcome("j", "FACE_DETECTION", "duplicate"), JobOutcome("j", "FACE_DETECTION", "failed")):
        gate.record(outcome)
    assert not gate.paused and gate.failures_in_row == 0
    gate.record(denied)
    gate.record(JobOutcome("j", "FACE_DETECTION", "busy"))  # no Rekognition call: proves nothing
    gate.record(denied)
    assert gate.paused and await gate.readiness() == (
        False, "paused: AWS refused the credentials 2 times in a row; probing every 60 s; last: AccessDeniedException")
    await gate.close()


def test_backfill_of_jobs_aws_refuses_exits_non_zero_and_records_nothing(
    settings: Settings, emulator: Any, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    det = synth.detection_job(unique_id("denied-det"), faces=10)
    srch = synth.search_job(unique_id("denied-search"), persons_elements=10)
    plain = synth.detection_job(unique_id("denied-plain"), faces=10)  # no API given: asked of Rekognition
    emulator.add_jobs([det, srch, plain])
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(f"{det.job_id},GetFaceDetection\n{srch.job_id},GetFaceSearch\n{plain.job_id}\n")
    monkeypatch.setenv("AWS_ENDPOINT_URL_REKOGNITION", emulator.url)
    monkeypatch.setattr(backfill, "RETRY_DELAY_S", 0.01)  # the retry rounds, without their 2 s and 4 s waits
    out = io.StringIO()
    emulator.configure(quota_tps=None, fault_rate=0.0, latency_s=0.0, access_denied=True)
    try:
        rc = backfill_command.run(Context(argparse.Namespace(api=None, job_ids=[], from_file=str(jobs),
                                                             format="table", restore_deleted=False),
                                          settings, Console(file=out, width=250), "worker"))
    finally:
        emulator.configure(access_denied=False)
    assert rc == 1
    summary = out.getvalue()
    for job in (det, srch, plain):
        line = next(x for x in summary.splitlines() if job.job_id in x)
        assert "transient" in line and "failed" not in line, line

    async def stored() -> list[Any]:
        conn = await asyncpg.connect(db_url)
        try:
            return list(await conn.fetch("SELECT job_id, ingest_state FROM jobs"))
        finally:
            await conn.close()

    assert asyncio.run(stored()) == [], "a job AWS refused was recorded"
