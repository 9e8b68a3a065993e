"""No silent waits: submitted videos and no notification channel to start them.

`run --exit-when-idle` exits 2 naming the missing settings instead of waiting for an idle that cannot come;
`run` keeps its metric and alert and leaves `submit`'s start request waiting on the queue instead of
handing it back every few seconds. Real processes and components: moto's S3 and SQS, PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import AsyncExitStack
from typing import Any

import pytest
from aiobotocore.session import get_session
from test_service_support import Queues

from tests.test_cli_errors import json_events, run_cli
from worker import metrics
from worker.config import Settings
from worker.queue import describe_queue
from worker.runtime import open_runtime
from worker.service import SqsWorker, open_scheduler

TOPIC = "arn:aws:sns:us-east-1:123456789012:rekognition-done"


@pytest.fixture
async def library(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_url)
    bucket = f"blocked-{uuid.uuid4().hex[:12]}"
    async with get_session().create_client("s3", region_name="us-east-1") as s3:
        await s3.create_bucket(Bucket=bucket)
        for key in ("v/a.mp4", "v/b.mov", "v/notes.txt"):
            await s3.put_object(Bucket=bucket, Key=key, Body=b"v")
    return bucket


@pytest.fixture
def env(db_url: str, queues: Queues, moto_url: str) -> dict[str, str]:
    return {"DATABASE_URL": db_url, "QUEUE_URL": queues.url, "AWS_ENDPOINT_URL_SQS": moto_url,
            "AWS_ENDPOINT_URL_S3": moto_url, "AWS_ENDPOINT_URL_REKOGNITION": "http://127.0.0.1:1",
            "POLL_WAIT_S": "1", "HEALTH_PORT": "0", "SUBMIT_POLL_INTERVAL_S": "0.5"}


def test_run_exit_when_idle_without_a_channel_exits_naming_the_settings(env: dict[str, str], library: str) -> None:
    submitted = run_cli("submit", "--api", "FACE_DETECTION", f"s3://{library}/v/", env=env)
    assert submitted.returncode == 0, submitted.stderr
    started = time.monotonic()
    result = run_cli("run", "--exit-when-idle", env=env, timeout_s=90)
    elapsed_s = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert elapsed_s < 90
    [failed] = [e for e in json_events(result.stderr) if e["event"] == "command failed"]
    assert failed["kind"] == "configuration"
    assert "2 submitted video(s) wait to be started" in failed["error"]
    assert "set REKOGNITION_SNS_TOPIC_ARN and REKOGNITION_ROLE_ARN" in failed["error"]
    # Half a channel is no channel: only the missing setting is named.
    half = run_cli("run", "--exit-when-idle", env={**env, "REKOGNITION_SNS_TOPIC_ARN": TOPIC}, timeout_s=90)
    assert half.returncode == 2
    [failed] = [e for e in json_events(half.stderr) if e["event"] == "command failed"]
    assert "set REKOGNITION_ROLE_ARN (" in failed["error"] and "REKOGNITION_SNS_TOPIC_ARN" not in failed["error"]


async def test_run_without_a_channel_keeps_one_start_request_waiting(
        settings: Settings, queues: Queues, sqs: Any, library: str, env: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_REKOGNITION", "http://127.0.0.1:1")  # nothing may reach AWS
    assert run_cli("submit", "--api", "FACE_DETECTION", f"s3://{library}/v/", env=env).returncode == 0
    run_settings = settings.with_(queue_url=queues.url, poll_wait_s=1, visibility_timeout_s=5,
                                  heartbeat_interval_s=1.0, health_port=0, submit_poll_interval_s=0.2,
                                  queue_depth_interval_s=1.0)
    assert run_settings.rekognition_sns_topic_arn is None and run_settings.rekognition_role_arn is None
    async with AsyncExitStack() as stack:
        rt = await stack.enter_async_context(open_runtime(run_settings))
        scheduler = await open_scheduler(run_settings, rt, sqs, queues.url, stack)
        worker = SqsWorker(run_settings, rt, sqs, await describe_queue(sqs, queues.url), scheduler=scheduler)
        task = asyncio.create_task(worker.run())
        # Longer than two rounds of the 5 s a start request waited before, while submissions could start.
        await asyncio.sleep(12)
        worker.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
    assert scheduler.blocked is not None and "REKOGNITION_SNS_TOPIC_ARN" in scheduler.blocked
    # Received once and settled as blocked: it waits invisible (900 s), still counted as in flight.
    assert worker.counters.by_outcome == {"blocked": 1}
    attrs = (await sqs.get_queue_attributes(QueueUrl=queues.url, AttributeNames=["All"]))["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "1"
    # The metric behind the alert RekognitionWorkerSubmissionsNotStarting.
    assert metrics.SUBMISSIONS.labels("submitted")._value.get() == 2
