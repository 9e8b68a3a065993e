"""`run` starts submitted videos: the account's limits, crashes, lost notifications (worker/scheduler.py).

Real components: the Rekognition emulator over HTTP with its Start* half (a concurrent-job limit, tokens,
timed completion, SNS-enveloped notifications delivered into moto's SQS, some of them lost), moto's SQS
server and PostgreSQL. Several replicas are several SqsWorkers with their own runtimes and schedulers on one
database and one queue, as several pods are.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import asyncpg
import pytest
from test_service_support import Queues

from worker.config import Settings
from worker.db.submissions import SchedulerStore, SubmissionStore
from worker.errors import ConfigError
from worker.local.emulator import EmulatorConfig, EmulatorThread
from worker.messages import Api, start_request_body
from worker.queue import RetryPolicy, describe_queue
from worker.runtime import open_runtime
from worker.scheduler import StartBackoff, early_probe_after_s
from worker.service import SqsWorker, open_scheduler
from worker.submissions import StartOptions, Video

TOPIC = "arn:aws:sns:us-east-1:123456789012:rekognition-done"
ROLE = "arn:aws:iam::123456789012:role/rekognition-publish"
FAST = RetryPolicy(busy_base_s=1, busy_cap_s=2, transient_base_s=1, transient_cap_s=2, waiting_s=1)
FAST_BACKOFF = StartBackoff(limit_base_s=0.2, limit_cap_s=1.0, throttle_s=0.2, fault_base_s=0.2, fault_cap_s=1.0,
                            credentials_s=1.0)


@pytest.fixture(scope="module")
def starts_emu() -> Iterator[EmulatorThread]:
    """An emulator of its own: these tests change its start-side settings and leave jobs running."""
    with EmulatorThread(EmulatorConfig()) as emu:
        yield emu


@pytest.fixture
def emu_for(starts_emu: EmulatorThread, moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AWS_ENDPOINT_URL_REKOGNITION", starts_emu.url)

    def configure(queues: Queues, **changes: Any) -> EmulatorThread:
        defaults: dict[str, Any] = {"max_concurrent_jobs": 4, "job_duration_s": 0.4, "start_quota_tps": None,
                                    "drop_notifications": 0, "drop_notifications_for": (), "invalid_videos": (),
                                    "started_job_faces": 30}
        starts_emu.configure(notification_queue_url=queues.url, sqs_endpoint_url=moto_url,
                             **{**defaults, **changes})
        starts_emu.reset_stats()
        return starts_emu

    return configure


@pytest.fixture
def ssettings(settings: Settings, queues: Queues) -> Settings:
    return settings.with_(queue_url=queues.url, poll_wait_s=1, visibility_timeout_s=5, heartbeat_interval_s=1.0,
                          not_ready_delay_s=1, not_ready_max_delay_s=2, shutdown_grace_s=5.0, health_port=0,
                          page_size=25, decode_processes=0, rekognition_tps=50.0, rekognition_start_tps=20.0,
                          rekognition_sns_topic_arn=TOPIC, rekognition_role_arn=ROLE, max_rekognition_jobs=20,
                          submit_sweep_after_s=30.0, submit_poll_interval_s=0.2, submit_start_lease_s=30.0,
                          queue_depth_interval_s=1.0)


@asynccontextmanager
async def replica(settings: Settings, sqs: Any, **scheduler_options: Any) -> AsyncIterator[SqsWorker]:
    """One pod: a runtime, a scheduler and an SqsWorker that exits once the queue and submissions are done."""
    assert settings.queue_url is not None
    async with AsyncExitStack() as stack:
        rt = await stack.enter_async_context(open_runtime(settings))
        scheduler = await open_scheduler(settings, rt, sqs, settings.queue_url, stack, backoff=FAST_BACKOFF,
                                         **scheduler_options)
        yield SqsWorker(settings, rt, sqs, await describe_queue(sqs, settings.queue_url), retry_policy=FAST,
                        scheduler=scheduler)


async def run_replicas(settings: Settings, sqs: Any, count: int, timeout_s: float = 60.0,
                       **scheduler_options: Any) -> list[SqsWorker]:
    async with AsyncExitStack() as stack:
        workers = [await stack.enter_async_context(replica(settings, sqs, **scheduler_options))
                   for _ in range(count)]
        async with asyncio.timeout(timeout_s):
            assert await asyncio.gather(*(w.run(exit_when_idle=True) for w in workers)) == [0] * count
        return workers


async def submit(settings: Settings, sqs: Any, names: list[str], api: Api = Api.FACE_DETECTION,
                 **options: Any) -> list[Video]:
    bucket = f"lib-{uuid.uuid4().hex[:10]}"
    videos = [Video(bucket, name) for name in names]
    if api is Api.FACE_SEARCH:
        options.setdefault("collection_id", "staff")
    recorded = await SubmissionStore(settings.asyncpg_dsn).record(videos, StartOptions.create(api, **options),
                                                                  force=False)
    assert recorded.new == len(videos)
    await sqs.send_message(QueueUrl=settings.queue_url, MessageBody=start_request_body(len(videos)))
    return videos


async def submissions(db_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db_url)
    try:
        return await conn.fetch("SELECT s.*, j.ingest_state::text AS job_state, j.faces AS job_faces "
                                "FROM submissions s LEFT JOIN jobs j USING (job_id) ORDER BY s.video_name")
    finally:
        await conn.close()


def started_for(emu: EmulatorThread, videos: list[Video]) -> list[dict[str, Any]]:
    """The emulator's record of the jobs Start* created for these videos."""
    names = {(v.bucket, v.name) for v in videos}
    return [r for r in emu.stats()["started_jobs"] if (r["video_bucket"], r["video_name"]) in names]


async def test_several_replicas_start_every_video_once_and_never_exceed_the_limit(
    ssettings: Settings, sqs: Any, queues: Queues, emu_for: Any, db_url: str,
) -> None:
    emu = emu_for(queues, max_concurrent_jobs=8, job_duration_s=0.3)
    settings = ssettings.with_(max_rekognition_jobs=3)
    videos = await submit(settings, sqs, [f"v{i:02}.mp4" for i in range(10)], Api.FACE_SEARCH)
    workers = await run_replicas(settings, sqs, 3)

    stats = emu.stats()
    assert len(started_for(emu, videos)) == 10, "each video started once"
    assert stats["jobs_created"] == 10 and stats["limit_exceeded"] == 0
    assert stats["peak_running_started"] <= 3, "MAX_REKOGNITION_JOBS across the replicas"
    rows = await submissions(db_url)
    assert {(r["state"], r["job_state"]) for r in rows} == {("ingested", "ingested")}
    assert all(r["job_faces"] == 30 and r["ingested_at"] is not None and r["started_at"] is not None for r in rows)
    assert sum(w.counters.by_outcome.get("ingested", 0) for w in workers) == 10
    assert await queue_is_empty(sqs, queues)


async def test_limit_exceeded_from_other_systems_is_waited_out(
    ssettings: Settings, sqs: Any, queues: Queues, emu_for: Any, db_url: str,
) -> None:
    emu = emu_for(queues, max_concurrent_jobs=4, job_duration_s=0.3)
    emu.occupy(3, 1.5)  # another system's jobs hold 3 of the account's 4 slots for 1.5 s
    videos = await submit(ssettings, sqs, [f"clip{i}.MOV" for i in range(5)])
    await run_replicas(ssettings, sqs, 2)

    stats = emu.stats()
    assert stats["limit_exceeded"] >= 1, "the account was full"
    assert stats["peak_running"] <= 4
    assert len(started_for(emu, videos)) == 5
    rows = await submissions(db_url)
    assert {r["state"] for r in rows} == {"ingested"}, [dict(r) for r in rows if r["state"] != "ingested"]
    assert all(r["failure_reason"] is None for r in rows)
    assert max(r["start_attempts"] for r in rows) > 1


async def test_a_lost_notification_is_recovered_by_one_probe(
    ssettings: Settings, sqs: Any, queues: Queues, emu_for: Any, db_url: str,
) -> None:
    videos_named = ["a.mp4", "b.mp4", "c.mp4"]
    emu = emu_for(queues, job_duration_s=0.3, drop_notifications_for=("b.mp4",))
    settings = ssettings.with_(submit_sweep_after_s=1.5)
    await submit(settings, sqs, videos_named, job_tag="sweep")
    await run_replicas(settings, sqs, 1)

    assert emu.stats()["notifications_dropped"] == 1
    rows = {r["video_name"]: r for r in await submissions(db_url)}
    assert {name: r["state"] for name, r in rows.items()} == dict.fromkeys(videos_named, "ingested")
    assert rows["b.mp4"]["probes"] >= 1 and rows["a.mp4"]["probes"] == 0
    conn = await asyncpg.connect(db_url)
    try:
        job = await conn.fetchrow("SELECT * FROM jobs WHERE job_id = $1", rows["b.mp4"]["job_id"])
    finally:
        await conn.close()
    assert job["job_tag"] == "sweep" and job["video_name"] == "b.mp4" and job["faces"] == 30


async def test_a_lost_notification_among_short_jobs_is_probed_before_the_sweep_wait(
    ssettings: Settings, sqs: Any, queues: Queues, emu_for: Any, db_url: str,
) -> None:
    """SUBMIT_SWEEP_AFTER_S at 15 minutes, jobs that take a fraction of a second: the job whose notification
    was lost has run far longer than the others, so it is probed long before the 15 minutes."""
    emu = emu_for(queues, job_duration_s=0.3, drop_notifications_for=("e.mp4",))
    settings = ssettings.with_(submit_sweep_after_s=900.0, queue_depth_interval_s=0.5)
    await submit(settings, sqs, [f"{c}.mp4" for c in "abcdef"])
    await run_replicas(settings, sqs, 1, timeout_s=45, early_probe_min_s=2.0)
    assert emu.stats()["notifications_dropped"] == 1
    rows = {r["video_name"]: r for r in await submissions(db_url)}
    assert {r["state"] for r in rows.values()} == {"ingested"}
    assert rows["e.mp4"]["probes"] == 1


def test_an_early_probe_needs_enough_recent_jobs_and_a_floor() -> None:
    assert early_probe_after_s(None, 0) is None
    assert early_probe_after_s(10.0, 2) is None, "two jobs are not a pattern"
    assert early_probe_after_s(10.0, 3) == 30.0
    assert early_probe_after_s(120.0, 50) == 360.0
    assert early_probe_after_s(0.1, 50) == 30.0, "never sooner than the floor"


async def test_a_crash_between_start_and_recording_the_job_id_reuses_the_token(
    ssettings: Settings, sqs: Any, queues: Queues, emu_for: Any, db_url: str,
) -> None:
    """What a replica killed after Rekognition accepted its start leaves: the submission claimed (starting),
    a job running at Rekognition, no JobId in the database. The next replica starts it with the same token,
    gets the same JobId, and the video is analysed once."""
    emu = emu_for(queues, job_duration_s=0.3)
    settings = ssettings.with_(submit_start_lease_s=1.0)
    [video] = await submit(settings, sqs, ["crash.m4v"])
    store = SchedulerStore(settings.asyncpg_dsn)
    try:
        claim = await store.claim(settings.max_rekognition_jobs, settings.submit_start_lease_s)
        assert claim is not None
        async with open_runtime(settings) as rt:
            first = await rt.client.start_face_detection(
                **claim.options.start_request(claim.video, claim.token, {"SNSTopicArn": TOPIC, "RoleArn": ROLE}))
        # ... and the replica dies here.
    finally:
        await store.close()
    await run_replicas(settings, sqs, 1)

    stats = emu.stats()
    assert [r["job_id"] for r in started_for(emu, [video])] == [first["JobId"]]
    assert stats["idempotent_starts"] == 1
    [row] = await submissions(db_url)
    assert (row["job_id"], row["state"], row["start_attempts"]) == (first["JobId"], "ingested", 2)


async def test_a_refused_video_fails_with_its_reason_and_the_others_go_on(
    ssettings: Settings, sqs: Any, queues: Queues, emu_for: Any, db_url: str,
) -> None:
    emu_for(queues, job_duration_s=0.2, invalid_videos=("broken.mp4",))
    await submit(ssettings, sqs, ["broken.mp4", "fine.mp4"])
    await run_replicas(ssettings, sqs, 1)
    rows = {r["video_name"]: r for r in await submissions(db_url)}
    assert rows["fine.mp4"]["state"] == "ingested"
    assert rows["broken.mp4"]["state"] == "failed" and rows["broken.mp4"]["job_id"] is None
    assert "InvalidS3ObjectException" in rows["broken.mp4"]["failure_reason"]


async def test_without_a_notification_channel_nothing_starts(
    ssettings: Settings, sqs: Any, queues: Queues, emu_for: Any, db_url: str,
) -> None:
    emu = emu_for(queues)
    settings = ssettings.with_(rekognition_sns_topic_arn=None)
    videos = await submit(settings, sqs, ["x.mp4"])
    async with replica(settings, sqs) as worker:
        # No silent wait: --exit-when-idle ends at once, naming what is missing (docs/cli.md).
        with pytest.raises(ConfigError, match=r"1 submitted video\(s\) wait .* set REKOGNITION_SNS_TOPIC_ARN \("):
            await asyncio.wait_for(worker.run(exit_when_idle=True), 15)
    assert started_for(emu, videos) == []
    assert [r["state"] for r in await submissions(db_url)] == ["submitted"]


async def queue_is_empty(sqs: Any, queues: Queues) -> bool:
    attrs = (await sqs.get_queue_attributes(QueueUrl=queues.url, AttributeNames=["All"]))["Attributes"]
    dlq = (await sqs.get_queue_attributes(QueueUrl=queues.dlq_url, AttributeNames=["All"]))["Attributes"]
    names = ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible")
    return all(int(attrs[n]) == 0 and int(dlq[n]) == 0 for n in names)
