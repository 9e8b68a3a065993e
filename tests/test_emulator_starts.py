"""The emulator's Start* half, through real aiobotocore clients (signed, over HTTP) and moto's SQS.

Jobs run 0.3 s of real time, so waits are short and bounded; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import ClientError

from worker.local import synth
from worker.local.emulator import EmulatorConfig, RekognitionEmulator, _config_from_args, _parse_args
from worker.messages import Api, parse_message_body

JOB_ID_RE = re.compile(r"^[a-zA-Z0-9-_]{1,64}$")
DURATION_S = 0.3
BUCKET = "acme-uploads"
TOPIC = "arn:aws:sns:us-east-1:123456789012:AmazonRekognitionFaces"
CHANNEL = {"SNSTopicArn": TOPIC, "RoleArn": "arn:aws:iam::123456789012:role/RekognitionPublish"}
# What the shared emulator goes back to after each test here, so other modules meet the defaults.
START_DEFAULTS = {name: getattr(EmulatorConfig(), name) for name in (
    "max_concurrent_jobs", "job_duration_s", "start_quota_tps", "started_job_faces", "notification_queue_url",
    "sqs_endpoint_url", "drop_notifications", "drop_notifications_for", "invalid_videos",
)}


def video(name: str) -> dict[str, Any]:
    return {"S3Object": {"Bucket": BUCKET, "Name": name}}


@pytest.fixture
async def starts(emu: Any) -> AsyncIterator[Any]:
    """The session's emulator with short jobs; start settings restored and the account empty afterwards."""
    emu.configure(job_duration_s=DURATION_S)
    try:
        yield emu
    finally:
        emu.configure(**START_DEFAULTS)
        await wait_for(lambda: emu.stats()["running_now"] == 0, timeout_s=3.0)


@pytest.fixture(scope="module")
def aws() -> AioSession:
    """One botocore session for the module: it parses each service model once."""
    return get_session()


@pytest.fixture(scope="module")
async def rek_client(emulator: Any, aws: AioSession) -> AsyncIterator[Any]:
    config = AioConfig(retries={"total_max_attempts": 1})
    async with aws.create_client("rekognition", region_name="us-east-1", endpoint_url=emulator.url,
                                 aws_access_key_id="testing", aws_secret_access_key="testing",
                                 config=config) as client:
        yield client


@pytest.fixture
def rek(starts: Any, rek_client: Any) -> Any:
    """A Rekognition client for the session's emulator, without retries."""
    return rek_client


async def wait_for(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


def record(emu: Any, job_id: str) -> dict[str, Any]:
    return next(r for r in emu.stats()["started_jobs"] if r["job_id"] == job_id)


async def error_of(call: Any) -> ClientError:
    with pytest.raises(ClientError) as info:
        await call
    return info.value


def code(err: ClientError) -> str:
    return str(err.response["Error"]["Code"])


async def receive_all(sqs: Any, queue_url: str, wait_s: int = 0) -> list[str]:
    got = await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_s)
    return [m["Body"] for m in got.get("Messages", [])]


async def test_started_detection_is_in_progress_then_succeeds_with_its_video(starts: Any, rek: Any) -> None:
    started = await rek.start_face_detection(Video=video("lobby/cam1.mp4"), FaceAttributes="ALL", JobTag="batch-7")
    job_id = started["JobId"]
    assert JOB_ID_RE.fullmatch(job_id)

    early = await rek.get_face_detection(JobId=job_id, MaxResults=1)
    assert early["JobStatus"] == "IN_PROGRESS"
    assert early["Faces"] == [] and "NextToken" not in early
    assert early["Video"]["S3Object"] == {"Bucket": BUCKET, "Name": "lobby/cam1.mp4"}
    assert early["JobTag"] == "batch-7"

    await asyncio.sleep(DURATION_S + 0.05)
    probe = await rek.get_face_detection(JobId=job_id, MaxResults=1)
    assert probe["JobStatus"] == "SUCCEEDED" and len(probe["Faces"]) == 1 and probe["NextToken"]
    faces = list(probe["Faces"])
    token = probe["NextToken"]
    while token:
        page = await rek.get_face_detection(JobId=job_id, MaxResults=1000, NextToken=token)
        faces += page["Faces"]
        token = page.get("NextToken")
    # Deterministic from the JobId; FaceAttributes=ALL brings the attributes DEFAULT leaves out.
    assert faces == synth.detection_job(job_id, faces=40, attributes="ALL").results
    assert "Emotions" in faces[0]["Face"]
    assert probe["Video"]["S3Object"] == {"Bucket": BUCKET, "Name": "lobby/cam1.mp4"}
    assert probe["JobTag"] == "batch-7"
    rec = record(starts, job_id)
    assert rec["api"] == "StartFaceDetection" and rec["video_name"] == "lobby/cam1.mp4"
    assert rec["completed_s"] == pytest.approx(rec["created_s"] + DURATION_S)
    assert rec["notification"] is None  # no NotificationChannel


async def test_started_search_keeps_matches_above_the_threshold(starts: Any, rek: Any) -> None:
    starts.configure(started_job_faces=25)
    job_id = (await rek.start_face_search(Video=video("door.mov"), CollectionId="staff",
                                          FaceMatchThreshold=95))["JobId"]
    await asyncio.sleep(DURATION_S + 0.05)
    got = await rek.get_face_search(JobId=job_id, SortBy="INDEX")
    assert got["JobStatus"] == "SUCCEEDED" and len(got["Persons"]) == 25
    matches = [m["Similarity"] for p in got["Persons"] for m in p["FaceMatches"]]
    assert matches and min(matches) >= 95
    assert got["Video"]["S3Object"]["Name"] == "door.mov"
    # The default attributes only, as the service returns for face search.
    assert all("Emotions" not in p["Person"]["Face"] for p in got["Persons"])


async def test_token_reuse_returns_the_job_even_when_the_account_is_full(
        starts: Any, rek: Any, sqs: Any, queues: Any) -> None:
    starts.configure(max_concurrent_jobs=1, notification_queue_url=queues.url)
    request = {"Video": video("a.mp4"), "ClientRequestToken": "video-a-detect", "NotificationChannel": CHANNEL}
    first = (await rek.start_face_detection(**request))["JobId"]
    # The account is full now; the retried start still answers, a new one does not.
    assert (await rek.start_face_detection(**request))["JobId"] == first
    err = await error_of(rek.start_face_detection(Video=video("b.mp4"), NotificationChannel=CHANNEL))
    assert code(err) == "LimitExceededException"

    await wait_for(lambda: record(starts, first)["notification"] == "sent")
    assert (await rek.start_face_detection(**request))["JobId"] == first  # after completion too
    stats = starts.stats()
    assert (stats["jobs_created"], stats["idempotent_starts"], stats["starts_requested"]) == (1, 2, 4)
    assert stats["notifications_sent"] == 1
    assert sum(r["token"] == "video-a-detect" for r in stats["started_jobs"]) == 1

    bodies = await receive_all(sqs, queues.url, wait_s=1)
    assert [parse_message_body(b).job_id for b in bodies] == [first]
    await asyncio.sleep(0.1)
    assert await receive_all(sqs, queues.url) == []


async def test_token_with_other_parameters_is_a_mismatch(starts: Any, rek: Any) -> None:
    job_id = (await rek.start_face_detection(Video=video("c.mp4"), ClientRequestToken="tok-c"))["JobId"]
    for changed in ({"Video": video("other.mp4")}, {"Video": video("c.mp4"), "JobTag": "t"},
                    {"Video": video("c.mp4"), "FaceAttributes": "ALL"}):
        err = await error_of(rek.start_face_detection(ClientRequestToken="tok-c", **changed))
        assert code(err) == "IdempotentParameterMismatchException"
    # Tokens belong to one operation: the same token starts a search job of its own.
    search_id = (await rek.start_face_search(Video=video("c.mp4"), CollectionId="staff",
                                             ClientRequestToken="tok-c"))["JobId"]
    assert search_id != job_id
    assert starts.stats()["jobs_created"] == 2


async def test_limit_exceeded_until_a_job_completes(starts: Any, rek: Any) -> None:
    starts.configure(max_concurrent_jobs=2)
    for name in ("d1.mp4", "d2.mp4"):
        await rek.start_face_detection(Video=video(name))
    err = await error_of(rek.start_face_search(Video=video("d3.mp4"), CollectionId="staff"))
    assert code(err) == "LimitExceededException"
    assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "Maximum limit: 2" in err.response["Error"]["Message"]

    await asyncio.sleep(DURATION_S + 0.05)
    assert JOB_ID_RE.fullmatch((await rek.start_face_search(Video=video("d3.mp4"), CollectionId="staff"))["JobId"])
    stats = starts.stats()
    assert (stats["limit_exceeded"], stats["jobs_created"], stats["running_now"]) == (1, 3, 1)
    assert stats["peak_running_started"] == 2
    assert stats["by_operation"]["StartFaceSearch"]["errors"] == 1


async def test_occupied_room_counts_toward_the_limit(starts: Any, rek: Any) -> None:
    starts.configure(max_concurrent_jobs=3)
    starts.occupy(1, DURATION_S)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{starts.url}/_emulator/occupy", json={"jobs": 1, "duration_s": DURATION_S}) as resp:
            assert resp.status == 200 and (await resp.json())["running_now"] == 2
        async with http.post(f"{starts.url}/_emulator/occupy", json={"jobs": -1, "duration_s": 1}) as resp:
            assert resp.status == 400
    await rek.start_face_detection(Video=video("e1.mp4"))
    err = await error_of(rek.start_face_detection(Video=video("e2.mp4")))
    assert code(err) == "LimitExceededException"
    stats = starts.stats()
    assert (stats["peak_running"], stats["peak_running_started"], stats["running_now"]) == (3, 1, 3)

    await asyncio.sleep(DURATION_S + 0.05)
    await rek.start_face_detection(Video=video("e2.mp4"))
    assert starts.stats()["notifications_sent"] == 0  # external jobs tell this account's queue nothing


async def test_start_quota_throttles_starts_only(starts: Any, rek: Any) -> None:
    starts.configure(start_quota_tps=0.1)  # a bucket of one start, refilled every 10 s
    await rek.start_face_detection(Video=video("f1.mp4"))
    err = await error_of(rek.start_face_detection(Video=video("f2.mp4")))
    assert code(err) == "ThrottlingException"
    fixture = synth.detection_job("starts-quota-probe", faces=3)
    starts.add_job(fixture)
    for _ in range(3):
        assert (await rek.get_face_detection(JobId=fixture.job_id))["JobStatus"] == "SUCCEEDED"
    stats = starts.stats()
    assert (stats["starts_requested"], stats["start_throttled"], stats["jobs_created"]) == (2, 1, 1)
    # The Get* counters and call records see the Get* traffic alone.
    assert (stats["requests"], stats["throttled"], len(stats["calls"])) == (3, 0, 3)
    assert stats["by_operation"]["StartFaceDetection"]["throttled"] == 1


async def test_notification_arrives_sns_enveloped(starts: Any, rek: Any, sqs: Any, queues: Any) -> None:
    # sqs_endpoint_url stays None: botocore finds moto through AWS_ENDPOINT_URL_SQS, as in a deployment.
    starts.configure(notification_queue_url=queues.url)
    before_ms = time.time() * 1000
    job_id = (await rek.start_face_search(Video=video("hall/entry.mp4"), CollectionId="staff",
                                          NotificationChannel=CHANNEL, JobTag="nightly:42"))["JobId"]
    [body] = await receive_all(sqs, queues.url, wait_s=3)
    envelope = orjson.loads(body)
    assert envelope["Type"] == "Notification" and envelope["TopicArn"] == TOPIC
    note = orjson.loads(envelope["Message"])
    assert (note["JobId"], note["Status"], note["API"]) == (job_id, "SUCCEEDED", "StartFaceSearch")
    ref = parse_message_body(body)
    assert (ref.job_id, ref.api, ref.notified_status) == (job_id, Api.FACE_SEARCH, "SUCCEEDED")
    assert (ref.job_tag, ref.video_bucket, ref.video_name) == ("nightly:42", BUCKET, "hall/entry.mp4")
    assert ref.notified_at_ms is not None
    assert before_ms + DURATION_S * 1000 - 50 <= ref.notified_at_ms <= time.time() * 1000 + 50
    # By the time the notification is out, Get* agrees that the job is done.
    assert (await rek.get_face_search(JobId=job_id, MaxResults=1))["JobStatus"] == "SUCCEEDED"
    # Counted once SQS has answered the send, which can be after the message is already receivable.
    await wait_for(lambda: record(starts, job_id)["notification"] == "sent")
    assert starts.stats()["notifications_sent"] == 1


async def test_dropped_notifications_are_lost(starts: Any, rek: Any, sqs: Any, queues: Any, moto_url: str) -> None:
    starts.configure(notification_queue_url=queues.url, sqs_endpoint_url=moto_url, drop_notifications=1,
                     drop_notifications_for=["never-told.mp4"])
    ids = [(await rek.start_face_detection(Video=video(name), NotificationChannel=CHANNEL))["JobId"]
           for name in ("g1.mp4", "g2.mp4", "never-told.mp4", "g3.mp4")]
    await wait_for(lambda: all(record(starts, i)["notification"] in ("sent", "dropped") for i in ids))
    stats = starts.stats()
    assert (stats["notifications_dropped"], stats["notifications_sent"]) == (2, 2)
    assert starts.config.drop_notifications == 0  # the countdown is spent
    bodies = await receive_all(sqs, queues.url, wait_s=1)
    # The first completion is the one lost; the named video's is never sent.
    assert sorted(parse_message_body(b).job_id for b in bodies) == sorted([ids[1], ids[3]])


async def test_delivery_failures_are_counted(starts: Any, rek: Any, queues: Any) -> None:
    starts.configure(notification_queue_url=queues.url + "-missing")
    job_id = (await rek.start_face_detection(Video=video("h.mp4"), NotificationChannel=CHANNEL))["JobId"]
    await wait_for(lambda: record(starts, job_id)["notification"] == "failed")
    assert starts.stats()["notifications_failed"] == 1
    assert (await rek.start_face_detection(Video=video("h2.mp4")))["JobId"]  # still serving


async def test_invalid_videos_and_parameters_are_rejected(starts: Any, rek: Any) -> None:
    starts.configure(invalid_videos=("broken.mp4",))
    err = await error_of(rek.start_face_detection(Video=video("broken.mp4")))
    assert code(err) == "InvalidS3ObjectException"
    # Patterns botocore does not check on the client side; the model's constraints, checked here.
    for kwargs in ({"JobTag": "spaces are not allowed"},
                   {"NotificationChannel": {**CHANNEL, "SNSTopicArn": "arn:aws:sqs:us-east-1:1:q"}},
                   {"ClientRequestToken": "no/slashes"}):
        err = await error_of(rek.start_face_detection(Video=video("ok.mp4"), **kwargs))
        assert code(err) == "InvalidParameterException"
    err = await error_of(rek.start_face_search(Video={"S3Object": {"Bucket": "bad!", "Name": "x.mp4"}},
                                               CollectionId="staff"))
    assert code(err) == "InvalidParameterException"
    assert starts.stats()["jobs_created"] == 0


async def test_missing_members_are_rejected_by_the_server(starts: Any, aws: AioSession) -> None:
    config = AioConfig(retries={"total_max_attempts": 1}, parameter_validation=False)
    async with aws.create_client("rekognition", region_name="us-east-1", config=config) as lax:
        for call in (lax.start_face_search(Video=video("x.mp4")), lax.start_face_detection(),
                     lax.start_face_detection(Video={"S3Object": {"Bucket": BUCKET}})):
            assert code(await error_of(call)) == "InvalidParameterException"


async def test_stop_cancels_a_delivery_that_hangs(aws: AioSession) -> None:
    """A queue endpoint that accepts and never answers must not hold stop() up."""
    connected = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await reader.read()  # until the client goes away
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    emu = RekognitionEmulator(EmulatorConfig(job_duration_s=0.05, notification_queue_url="http://q/1/q",
                                             sqs_endpoint_url=f"http://127.0.0.1:{port}"))
    url = await emu.start()
    try:
        async with aws.create_client("rekognition", region_name="us-east-1", endpoint_url=url) as rek:
            await rek.start_face_detection(Video=video("i.mp4"), NotificationChannel=CHANNEL)
        async with asyncio.timeout(5):
            await connected.wait()
    finally:
        async with asyncio.timeout(3):
            await emu.stop()
        server.close()
        await server.wait_closed()
    assert emu.stats()["notifications_sent"] == 0


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 500.0

    def __call__(self) -> float:
        return self.now_s


async def test_completion_and_quota_follow_the_injected_clock(aws: AioSession) -> None:
    clock = FakeClock()
    config = EmulatorConfig(job_duration_s=10.0, max_concurrent_jobs=1, start_quota_tps=1.0)
    async with RekognitionEmulator(config, clock=clock) as emu, aws.create_client(
            "rekognition", region_name="us-east-1", endpoint_url=emu.url,
            config=AioConfig(retries={"total_max_attempts": 1})) as rek:
        job_id = (await rek.start_face_detection(Video=video("j.mp4")))["JobId"]
        clock.now_s += 9.999
        assert (await rek.get_face_detection(JobId=job_id, MaxResults=1))["JobStatus"] == "IN_PROGRESS"
        assert code(await error_of(rek.start_face_detection(Video=video("k.mp4")))) == "LimitExceededException"
        clock.now_s += 0.001
        assert (await rek.get_face_detection(JobId=job_id, MaxResults=1))["JobStatus"] == "SUCCEEDED"
        # Room again, but the start bucket (one token a second) is empty until the clock moves on.
        assert code(await error_of(rek.start_face_detection(Video=video("k.mp4")))) == "ThrottlingException"
        clock.now_s += 1.0
        await rek.start_face_detection(Video=video("k.mp4"))
        [first, _] = emu.stats()["started_jobs"]
        assert (first["created_s"], first["completed_s"]) == (500.0, 510.0)


def test_config_fields_and_cli_flags() -> None:
    args = _parse_args(["--max-concurrent-jobs", "5", "--job-duration-s", "0.5", "--start-quota-tps", "2",
                        "--notification-queue-url", "http://localhost:4566/000000000000/n",
                        "--sqs-endpoint-url", "http://localhost:4566", "--drop-notifications", "3",
                        "--started-job-faces", "7"])
    config = _config_from_args(args)
    assert (config.max_concurrent_jobs, config.job_duration_s, config.start_quota_tps) == (5, 0.5, 2.0)
    assert config.notification_queue_url == "http://localhost:4566/000000000000/n"
    assert (config.sqs_endpoint_url, config.drop_notifications, config.started_job_faces) == (
        "http://localhost:4566", 3, 7)
    assert EmulatorConfig(invalid_videos=["a.mp4"]).invalid_videos == ("a.mp4",)  # type: ignore[arg-type]
    for bad in ({"max_concurrent_jobs": -1}, {"job_duration_s": float("nan")}, {"start_quota_tps": 0},
                {"notification_queue_url": "queue"}, {"drop_notifications_for": "a.mp4"},
                {"started_job_faces": 1.5}):
        with pytest.raises(ValueError):
            EmulatorConfig(**bad)


async def test_config_endpoint_takes_start_fields(starts: Any) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{starts.url}/_emulator/config",
                             json={"max_concurrent_jobs": 4, "invalid_videos": ["z.mp4"]}) as resp:
            body = await resp.json()
            assert resp.status == 200 and body["max_concurrent_jobs"] == 4 and body["invalid_videos"] == ["z.mp4"]
        async with http.post(f"{starts.url}/_emulator/config", json={"job_duration_s": -1}) as resp:
            assert resp.status == 400
        async with http.get(f"{starts.url}/_emulator/stats") as resp:
            stats = await resp.json()
    assert {"starts_requested", "jobs_created", "idempotent_starts", "limit_exceeded", "start_throttled",
            "notifications_sent", "notifications_dropped", "running_now", "peak_running", "peak_running_started",
            "started_jobs"} <= set(stats)
