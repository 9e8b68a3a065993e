"""`python -m worker local`: the whole local stack kept running, and the environment that points at it.

Embedded PostgreSQL (unless DATABASE_URL is set; the same data directory as `demo`, migrated to head), moto's
SQS and S3 (a queue with a dead-letter queue, and the demo's video library in a bucket), and the Rekognition
emulator holding the demo's sample jobs, sending completion notifications of the jobs `run` starts to the
queue. Every command in the README can be tried against it with the printed environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session

from worker.config import Settings
from worker.db.migrate import upgrade_to_head
from worker.local import synth
from worker.local.demo import DEMO_ROLE, DEMO_TOPIC, LIBRARY_BUCKET, LIBRARY_OTHERS, LIBRARY_VIDEOS, PGDATA
from worker.local.emulator import EmulatorConfig, EmulatorThread
from worker.local.pg import start_embedded_postgres
from worker.local.sqs import create_queue_with_dlq, start_moto_server

QUEUE_NAME = "rekognition-local"
REGION = "us-east-1"


@dataclass
class LocalStack:
    """What is running, and the environment variables that reach it."""

    env: dict[str, str] = field(default_factory=dict)
    sample_jobs: list[tuple[str, str]] = field(default_factory=list)  # (JobId, API)

    def exports(self) -> list[str]:
        """``export NAME=value`` lines for a POSIX shell, values quoted."""
        return [f"export {name}={shlex.quote(value)}" for name, value in self.env.items()]


async def _aws_resources(moto_url: str) -> str:
    """The queue (with its DLQ) and the video library; returns the queue's URL."""
    session = get_session()
    kwargs: dict[str, Any] = {"region_name": REGION, "endpoint_url": moto_url, "aws_access_key_id": "local",
                              "aws_secret_access_key": "local"}
    async with session.create_client("sqs", **kwargs) as sqs, session.create_client("s3", **kwargs) as s3:
        queue_url, _ = await create_queue_with_dlq(sqs, QUEUE_NAME, visibility_timeout_s=30, max_receive_count=3)
        await s3.create_bucket(Bucket=LIBRARY_BUCKET)
        for key in LIBRARY_VIDEOS + LIBRARY_OTHERS:
            await s3.put_object(Bucket=LIBRARY_BUCKET, Key=key, Body=b"local")
    return str(queue_url)


@contextlib.contextmanager
def local_stack(settings: Settings, pgdata: Path = PGDATA) -> Iterator[LocalStack]:
    """Start everything; stop what this started when the block ends (a PostgreSQL already running stays)."""
    stack = LocalStack()
    server = None
    database_url = settings.database_url
    if database_url is None:
        already = (pgdata / "postmaster.pid").exists()
        server, database_url = start_embedded_postgres(pgdata, keep_running=already)
    moto_server = None
    try:
        upgrade_to_head(settings.with_(database_url=database_url))
        moto_server, moto_url = start_moto_server()
        queue_url = asyncio.run(_aws_resources(moto_url))
        fixtures = synth.demo_jobs()
        # The emulator sends the notifications of the jobs it starts with an SQS client of this process, to
        # moto's endpoint only (given below): moto takes any key, and a process without one would send nothing.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
        config = EmulatorConfig(quota_tps=max(settings.rekognition_tps, 5.0), max_concurrent_jobs=4,
                                job_duration_s=2.0, started_job_faces=300, notification_queue_url=queue_url,
                                sqs_endpoint_url=moto_url)
        with EmulatorThread(config, jobs=fixtures) as emu:
            stack.sample_jobs = [(f.job_id, f.api) for f in fixtures]
            stack.env = {
                "DATABASE_URL": database_url,
                "QUEUE_URL": queue_url,
                "AWS_ENDPOINT_URL_REKOGNITION": emu.url,
                "AWS_ENDPOINT_URL_SQS": moto_url,
                "AWS_ENDPOINT_URL_S3": moto_url,
                "AWS_ACCESS_KEY_ID": "local",
                "AWS_SECRET_ACCESS_KEY": "local",
                "AWS_REGION": REGION,
                "REKOGNITION_SNS_TOPIC_ARN": DEMO_TOPIC,
                "REKOGNITION_ROLE_ARN": DEMO_ROLE,
                # A fresh key each start: the local audit's hashes mean nothing elsewhere.
                "ERASURE_HASH_KEY": secrets.token_hex(32),
            }
            yield stack
    finally:
        if moto_server is not None:
            moto_server.stop()
        if server is not None and server.cleanup_mode is not None:
            server.cleanup()


def wait_for_stop() -> str:
    """Block until SIGINT or SIGTERM; returns the signal's name. The handlers only set an event."""
    stop = threading.Event()
    received: list[str] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return received[0] if received else "SIGINT"
