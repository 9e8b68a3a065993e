"""moto's SQS in server mode, and helpers to build the queue topology the worker expects."""

from __future__ import annotations

from typing import Any

import orjson

from worker.local.synth import JobFixture

NOTIFICATION_API = {"GetFaceDetection": "StartFaceDetection", "GetFaceSearch": "StartFaceSearch"}


def start_moto_server() -> tuple[Any, str]:
    """A ThreadedMotoServer on a free loopback port; returns (server, endpoint_url)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # moto is a demo/test extra, not a runtime dependency
        raise RuntimeError("moto is not installed: pip install 'rekognition-ingest-worker[local]'") from exc
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


async def create_queue_with_dlq(sqs: Any, name: str, *, visibility_timeout_s: int,
                                max_receive_count: int) -> tuple[str, str]:
    """A queue with a dead-letter queue behind a redrive policy; returns (queue_url, dlq_url)."""
    dlq_url = (await sqs.create_queue(QueueName=f"{name}-dlq"))["QueueUrl"]
    dlq_arn = (await sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"]))["Attributes"]["QueueArn"]
    redrive = orjson.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}).decode()
    queue_url = (await sqs.create_queue(QueueName=name, Attributes={
        "VisibilityTimeout": str(visibility_timeout_s), "RedrivePolicy": redrive,
    }))["QueueUrl"]
    return queue_url, dlq_url


def notification(fixture: JobFixture, *, status: str | None = None, api_style: str = "operation",
                 timestamp_ms: int = 1_763_700_000_000) -> dict[str, Any]:
    """The Rekognition completion notification for a fixture."""
    if api_style == "operation":
        api = NOTIFICATION_API[fixture.api]
    else:
        api = "FACE_DETECTION" if fixture.api == "GetFaceDetection" else "FACE_SEARCH"
    s3 = (fixture.video or {}).get("S3Object", {})
    note: dict[str, Any] = {
        "JobId": fixture.job_id,
        "Status": status or ("FAILED" if fixture.job_status == "FAILED" else "SUCCEEDED"),
        "API": api,
        "Timestamp": timestamp_ms,
        "Video": {"S3ObjectName": s3.get("Name", "video.mp4"), "S3Bucket": s3.get("Bucket", "bucket")},
    }
    if fixture.job_tag:
        note["JobTag"] = fixture.job_tag
    return note


def sns_envelope(message: dict[str, Any], *,
                 topic_arn: str = "arn:aws:sns:us-east-1:123456789012:AmazonRekognition",
                 message_id: str = "00000000-0000-4000-8000-000000000000",
                 timestamp: str = "2026-11-22T00:00:00.000Z") -> str:
    """The SQS body SNS delivers without raw message delivery: the notification as a JSON string."""
    return orjson.dumps({
        "Type": "Notification",
        "MessageId": message_id,
        "TopicArn": topic_arn,
        "Subject": "",
        "Message": orjson.dumps(message).decode(),
        "Timestamp": timestamp,
        "SignatureVersion": "1",
        "Signature": "EXAMPLE",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService.pem",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
    }).decode()
