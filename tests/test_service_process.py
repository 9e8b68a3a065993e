"""`python -m worker run` as a real process: signals, exit codes, health endpoints, --exit-when-idle.

The process reaches the same moto SQS server, Rekognition emulator and PostgreSQL as the test, through
the standard variables (AWS_ENDPOINT_URL_SQS, AWS_ENDPOINT_URL_REKOGNITION, DATABASE_URL, QUEUE_URL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_service_support import (
    Queues,
    create_database,
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
from worker.local import synth

REPO = Path(__file__).resolve().parents[1]




class WorkerProcess:
    """`python -m worker run ...` with its JSON log lines collected as they arrive."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "worker", "run", *args], cwd=REPO, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[dict[str, Any]] = []
        self.other: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s,), daemon=True)
                         for s in (self.proc.stderr, self.proc.stdout)]
        for t in self._readers:
            t.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.other.append(line)

    def wait_for(self, what: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if predicate(line):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {what!r} line; exit {self.proc.poll()}; "
                             f"output: {self.lines[-20:]} {self.other[-20:]}")

    def health_port(self) -> int:
        return int(self.wait_for("worker started", lambda e: e.get("event") == "worker started")["health_port"])

    def wait(self, timeout_s: float) -> int:
        rc = self.proc.wait(timeout_s)
        for t in self._readers:
            t.join(5)
        return rc

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.lines if e.get("event", "").startswith(name)]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def start_worker(db_url: str, queues: Queues, moto_url: str, emu: Any) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(*args: str, **overrides: str) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({
            "DATABASE_URL": db_url, "QUEUE_URL": queues.url,
            "AWS_ENDPOINT_URL_SQS": moto_url, "AWS_ENDPOINT_URL_REKOGNITION": emu.url,
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-creds",
            "AWS_EC2_METADATA_DISABLED": "true",
            "HEALTH_PORT": "0", "POLL_WAIT_S": "1", "VISIBILITY_TIMEOUT_S": "2", "HEARTBEAT_INTERVAL_S": "0.5",
            "NOT_READY_DELAY_S": "1", "SHUTDOWN_GRACE_S": "5", "PAGE_SIZE": "25",
            "REKOGNITION_TPS": "1000", "RETRY_BASE_S": "0.01", "RETRY_CAP_S": "0.05", "MAX_CALL_ATTEMPTS": "4",
            "LOG_FORMAT": "json", "LOG_LEVEL": "info",
        })
        env.update(overrides)
        proc = WorkerProcess(list(args), env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for_job_in_flight(port: int, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "rekognition_worker_jobs_in_flight 1.0" in get(port, "/metrics")[1]:
            return
        time.sleep(0.03)
    raise AssertionError("the job never started")


PAGE_SETTINGS = Settings(page_size=25, rekognition_tps=1000.0, retry_base_s=0.01, retry_cap_s=0.05,
                         max_call_attempts=4)


async def test_run_exit_when_idle_drains_the_done_when_mix_and_exits_0(
    start_worker: Callable[..., WorkerProcess], sqs: Any, queues: Queues, emu: Any, db_url: str,
    pg_server_url: str, template_db: str,
) -> None:
    """Through a real SQS implementation (2 s visibility, maxReceiveCount 2): enveloped and raw
    notifications, duplicates, a FAILED job, a job IN_PROGRESS at first and poison messages."""
    det, found, small = detection(emu, faces=80), search(emu, elements=50), detection(emu, faces=10, seed=9)
    late = detection(emu, "late", faces=40, seed=4)
    emu.complete_after(late.job_id, 1)
    failed = synth.failed_job(unique_id("failed"), "GetFaceDetection", "Unsupported codec")
    emu.add_job(failed)
    poison = ("{not json", '{"JobId": "ok-0001", "API": "StartLabelDetection", "Status": "SUCCEEDED"}',
              '{"JobId": "../etc/passwd", "API": "StartFaceDetection"}')
    await send(sqs, queues.url,
               enveloped(det), raw(det), enveloped(det, api_style="upper"),
               raw(found, api_style="upper"), enveloped(found),
               plain(small), enveloped(late), enveloped(failed), *poison)
    emu.configure(latency_s=0.05)
    # One slot: copies of a job run one after another and settle as duplicates, not as "busy" (which
    # waits 5 s with the production backoff). test_service.py covers busy copies with four slots.
    proc = start_worker("--exit-when-idle", MAX_CONCURRENT_JOBS="1")
    port = proc.health_port()
    status, body = get(port, "/livez")
    assert status == 200 and json.loads(body)["live"] is True
    status, body = get(port, "/readyz")
    assert status == 200, body
    assert json.loads(body) == {"ready": True, "checks": {"database": "ok", "queue": "ok", "credentials": "ok"}}
    status, metrics_text = get(port, "/metrics")
    assert status == 200 and "rekognition_worker_messages_total" in metrics_text
    assert "rekognition_worker_jobs_in_flight" in metrics_text
    assert proc.wait(60) == 0
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert sorted(m["Body"] for m in await take_all(sqs, queues.dlq_url)) == sorted(poison)
    reference = await create_database(pg_server_url, template_db)
    try:
        good = [det, found, small, late]
        await plain_backfill(PAGE_SETTINGS, reference, good)
        for fx in good:
            assert await snapshot(db_url, fx.job_id) == await snapshot(reference, fx.job_id), fx.job_id
    finally:
        await drop_database(pg_server_url, reference)
    row = await job_row(db_url, failed.job_id)
    assert row is not None and row["ingest_state"] == "failed" and row["failure_reason"] == "Unsupported codec"
    # Logs: one JSON line per event with the message's context; reasons for the poison messages.
    unusable = proc.events("unusable message")
    assert {e["body_sha256"] for e in unusable} == {logsafe.short_hash(body) for body in poison}
    assert not any(body in json.dumps(e) for e in unusable for body in poison)
    assert all(e["reason"] and e["message_id"] and e["level"] == "warning" for e in unusable)
    summaries = proc.events("job finished")
    assert {e["job_id"] for e in summaries} == {f.job_id for f in (*good, failed)}
    assert all({"message_id", "api", "receive_count", "outcome", "seconds"} <= set(e) for e in summaries)
    assert all({"pages", "rows"} <= set(e) for e in summaries)
    assert proc.events("worker stopped")


async def test_sigterm_mid_job_lets_it_finish_and_exits_0(
    start_worker: Callable[..., WorkerProcess], sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    job = detection(emu, faces=100)
    await send(sqs, queues.url, enveloped(job))
    emu.configure(latency_s=0.3)  # 4 pages: ~1.2 s
    proc = start_worker(SHUTDOWN_GRACE_S="20")
    wait_for_job_in_flight(proc.health_port())
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert proc.events("shutdown requested") and proc.events("worker stopped")
    assert await queue_counts(sqs, queues.url) == (0, 0, 0), "processed and deleted"
    assert (await job_row(db_url, job.job_id) or {}).get("faces") == len(job.results)


async def test_sigterm_mid_job_past_the_grace_period_releases_it_and_exits_0(
    start_worker: Callable[..., WorkerProcess], sqs: Any, queues: Queues, emu: Any, db_url: str,
) -> None:
    job = detection(emu, faces=100)
    await send(sqs, queues.url, enveloped(job))
    emu.configure(latency_s=0.5)
    proc = start_worker(SHUTDOWN_GRACE_S="0.2")
    wait_for_job_in_flight(proc.health_port())
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert proc.events("grace period over")
    # Released: receivable at once (the heartbeat had it hidden), nothing partial stored.
    again = (await sqs.receive_message(QueueUrl=queues.url, WaitTimeSeconds=0,
                                       MessageSystemAttributeNames=["ApproximateReceiveCount"])).get("Messages", [])
    assert len(again) == 1 and again[0]["Attributes"]["ApproximateReceiveCount"] == "2"
    # Only the notification's clock is recorded (the job is pending), no rows.
    row = await job_row(db_url, job.job_id)
    assert row is not None and row["ingest_state"] == "pending" and row["completed_at"] is not None
    assert await stored_rows(db_url, job.job_id) == 0


async def test_a_second_signal_exits_at_once(
    start_worker: Callable[..., WorkerProcess], sqs: Any, queues: Queues, emu: Any,
) -> None:
    job = detection(emu, faces=100)
    await send(sqs, queues.url, enveloped(job))
    emu.configure(latency_s=1.0)  # ~4 s job, 30 s grace: only the second signal can end it early
    proc = start_worker(SHUTDOWN_GRACE_S="30")
    wait_for_job_in_flight(proc.health_port())
    proc.proc.send_signal(signal.SIGTERM)
    proc.wait_for("shutdown requested", lambda e: e.get("event", "").startswith("shutdown requested"))
    t0 = time.monotonic()
    proc.proc.send_signal(signal.SIGINT)
    assert proc.wait(5) == 128 + signal.SIGINT
    assert time.monotonic() - t0 < 3.0  # the job alone would take ~4 s, the grace 30 s
    assert proc.events("second signal")
