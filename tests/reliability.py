"""Helpers for the reliability suites (crash, hostile input, security, soak); no tests here.

Workers run as real processes (``python -m worker ...``) that reach the test's PostgreSQL, moto's SQS
server and the Rekognition emulator through the standard variables, as a deployment would.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil
from rich.console import Console

from tests.conftest import create_database as create_database_as
from tests.helpers import dump_job
from worker.backfill import run_backfill
from worker.config import Settings
from worker.messages import JobRef

ROOT = Path(__file__).resolve().parents[1]

# Short timeouts and small pages so a job spans many pages and every retry path runs in seconds.
FAST_ENV = {
    "HEALTH_PORT": "0", "POLL_WAIT_S": "1", "VISIBILITY_TIMEOUT_S": "3", "HEARTBEAT_INTERVAL_S": "0.5",
    "NOT_READY_DELAY_S": "1", "SHUTDOWN_GRACE_S": "5", "REKOGNITION_TPS": "1000", "RETRY_BASE_S": "0.01",
    "RETRY_CAP_S": "0.05", "MAX_CALL_ATTEMPTS": "4", "LOG_FORMAT": "json", "LOG_LEVEL": "info",
}


def worker_env(**values: str) -> dict[str, str]:
    """The environment of a worker process: no AWS variable of the caller's, dummy credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in ("DATABASE_URL", "QUEUE_URL")}
    env.update({
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials", "AWS_EC2_METADATA_DISABLED": "true",
        "COLUMNS": "200", **FAST_ENV,
    })
    env.update(values)
    return env


class WorkerProcess:
    """``python -m worker ARGS`` with its JSON log lines collected as they arrive."""

    def __init__(self, args: list[str], env: dict[str, str], *, python: list[str] | None = None) -> None:
        command = [*(python or [sys.executable, "-m", "worker"]), *args]
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.lines: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s,), daemon=True)
                         for s in (self.proc.stderr, self.proc.stdout)]
        for t in self._readers:
            t.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.text.append(line)
            try:
                parsed = json.loads(line)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                self.lines.append(parsed)

    def wait_for(self, what: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if predicate(line):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {what!r} line; exit {self.proc.poll()}; output: {self.output()[-3000:]}")

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in list(self.lines) if str(e.get("event", "")).startswith(name)]

    def wait(self, timeout_s: float) -> int:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout_s} s; output: {self.output()[-3000:]}") from None
        self._join()
        return rc

    def _join(self) -> None:
        # Everything the process wrote is in the pipe by now; a child it left behind may keep the
        # pipe open (no EOF), so do not wait for one.
        for t in self._readers:
            t.join(0.5)

    def children(self) -> list[psutil.Process]:
        try:
            children: list[psutil.Process] = psutil.Process(self.pid).children(recursive=True)
            return children
        except psutil.NoSuchProcess:
            return []

    def output(self) -> str:
        return "".join(self.text)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._join()


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def kill_all(processes: list[psutil.Process]) -> None:
    """SIGKILL each of these processes (by pid, each one this test started or its worker started)."""
    for p in alive(processes):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def create_database(server_url: str, template: str | None = None) -> str:
    """A fresh database on ``server_url`` (cloned from ``template`` when given); returns its URL."""
    name = f"rel_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server_url)
    try:
        await create_database_as(conn, name, template)
    finally:
        await conn.close()
    return with_database(server_url, name)


async def drop_database(server_url: str, url: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path.lstrip("/")}" WITH (FORCE)')
    finally:
        await conn.close()


async def clean_dump(settings: Settings, database_url: str, ref: JobRef) -> dict[str, list[tuple[Any, ...]]]:
    """What one clean, uninterrupted `backfill` stores for ``ref`` in ``database_url``."""
    outcomes = await run_backfill(settings.with_(database_url=database_url), [ref], console=Console(file=io.StringIO()))
    assert [o.outcome for o in outcomes] == ["ingested"], outcomes
    conn = await asyncpg.connect(database_url)
    try:
        return await dump_job(conn, ref.job_id)
    finally:
        await conn.close()


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
        batch = (await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                           VisibilityTimeout=60)).get("Messages", [])
        if not batch:
            return out
        out.extend(batch)
