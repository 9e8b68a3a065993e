"""A whole video library from S3 objects to rows, through the commands as an operator runs them.

A prefix in moto's S3 holds videos and other files; the Rekognition emulator allows 4 concurrent jobs and
loses one completion notification; `submit`, then two `run --exit-when-idle` processes (MAX_REKOGNITION_JOBS
at its default 20, so the account's limit is what stops them). Every video, and nothing else, is started
exactly once, never more than 4 at a time, every job is ingested in full, and a second `submit` starts
nothing new.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import asyncpg
import pytest
from aiobotocore.session import get_session
from test_service_process import REPO, WorkerProcess
from test_service_support import Queues

from worker import logsafe
from worker.local.emulator import EmulatorConfig, EmulatorThread

TOPIC = "arn:aws:sns:us-east-1:123456789012:rekognition-done"
ROLE = "arn:aws:iam::123456789012:role/rekognition-publish"
VIDEOS = [f"library/2025/{name}" for name in ("a.mp4", "b.MP4", "c.mov", "d.MOV", "e.m4v", "f/g.mp4", "f/h.mov",
                                              "i.M4V", "j.mp4", "k.mp4")]
OTHERS = ["library/2025/readme.txt", "library/2025/a.mp4.json", "library/2025/poster.jpg", "library/2025/f/",
          "library/2025/clip.mkv"]
FACES = 30


@pytest.fixture
def library_emu(moto_url: str, queues: Queues) -> Any:
    config = EmulatorConfig(max_concurrent_jobs=4, job_duration_s=1.0, drop_notifications=1,
                            started_job_faces=FACES, notification_queue_url=queues.url, sqs_endpoint_url=moto_url)
    with EmulatorThread(config) as emu:
        yield emu


def _env(db_url: str, queues: Queues, moto_url: str, emu: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({
        "DATABASE_URL": db_url, "QUEUE_URL": queues.url,
        "AWS_ENDPOINT_URL_SQS": moto_url, "AWS_ENDPOINT_URL_S3": moto_url, "AWS_ENDPOINT_URL_REKOGNITION": emu.url,
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-creds", "AWS_EC2_METADATA_DISABLED": "true",
        "REKOGNITION_SNS_TOPIC_ARN": TOPIC, "REKOGNITION_ROLE_ARN": ROLE, "SUBMIT_SWEEP_AFTER_S": "4",
        "SUBMIT_POLL_INTERVAL_S": "0.5", "HEALTH_PORT": "0", "POLL_WAIT_S": "1", "VISIBILITY_TIMEOUT_S": "5",
        "HEARTBEAT_INTERVAL_S": "1", "NOT_READY_DELAY_S": "1", "PAGE_SIZE": "10", "LOG_FORMAT": "json",
        "RATE_LIMIT_SCOPE": "fleet", "REKOGNITION_TPS": "20",
    })
    return env


def _submit(env: dict[str, str], url: str) -> str:
    done = subprocess.run([sys.executable, "-m", "worker", "submit", "--api", "StartFaceDetection", url], cwd=REPO,
                          env={**env, "LOG_FORMAT": "console"}, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_a_library_goes_from_s3_objects_to_rows_with_each_video_started_once(
    db_url: str, queues: Queues, moto_url: str, library_emu: Any,
) -> None:
    bucket = f"media-{uuid.uuid4().hex[:10]}"
    async with get_session().create_client("s3", region_name="us-east-1", endpoint_url=moto_url) as s3:
        await s3.create_bucket(Bucket=bucket)
        for key in VIDEOS + OTHERS + ["elsewhere/z.mp4"]:
            await s3.put_object(Bucket=bucket, Key=key, Body=b"\x00")
    env = _env(db_url, queues, moto_url, library_emu)
    url = f"s3://{bucket}/library/2025/"

    started_s = time.monotonic()
    assert f"{len(VIDEOS)} new, 0 already known, {len(OTHERS)} skipped" in _submit(env, url)
    workers = [WorkerProcess(["--exit-when-idle"], env) for _ in range(2)]
    try:
        assert [w.wait(180) for w in workers] == [0, 0], [w.lines[-10:] for w in workers]
    finally:
        for w in workers:
            w.kill()
    elapsed_s = time.monotonic() - started_s

    stats = library_emu.stats()
    started = [r for r in stats["started_jobs"] if r["video_bucket"] == bucket]
    assert sorted(r["video_name"] for r in started) == sorted(VIDEOS), "every video, and nothing else, once"
    assert stats["jobs_created"] == len(VIDEOS)
    assert stats["peak_running"] <= 4 and stats["limit_exceeded"] >= 1
    assert stats["notifications_dropped"] == 1
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT s.video_name, s.state, s.probes, j.faces, j.pages, s.submitted_at, "
                                "j.ingested_at FROM reporting.submissions s JOIN reporting.job_summary j "
                                "USING (job_id)")
        assert sorted(r["video_name"] for r in rows) == sorted(VIDEOS)
        assert {(r["state"], r["faces"], r["pages"]) for r in rows} == {("ingested", FACES, FACES // 10)}
        assert sum(r["probes"] > 0 for r in rows) >= 1, "the lost notification was found by a probe"
        first_submit = min(r["submitted_at"] for r in rows)
        last_row = max(r["ingested_at"] for r in rows)
    finally:
        await conn.close()
    probes = sum(1 for w in workers for e in w.events("completion notification never arrived"))
    # The logs name each video by bucket, extension and a hash of its key, never by the key.
    assert sorted(e["video"] for w in workers for e in w.events("video started")) == sorted(
        logsafe.video(bucket, name) for name in VIDEOS)
    assert not any(name in json.dumps(line) for w in workers for line in w.lines for name in VIDEOS)
    print(f"\nlibrary of {len(VIDEOS)} videos ({len(OTHERS)} other objects), account limit 4, one notification "
          f"lost: submit -> last row {(last_row - first_submit).total_seconds():.1f} s; both workers exited "
          f"after {elapsed_s:.1f} s; limit_exceeded {stats['limit_exceeded']}, peak running "
          f"{stats['peak_running']}, probes that found a job finished {probes}")

    # The same library again: nothing new, and a run starts nothing.
    assert f"0 new, {len(VIDEOS)} already known, {len(OTHERS)} skipped" in _submit(env, url)
    again = WorkerProcess(["--exit-when-idle"], env)
    try:
        assert again.wait(60) == 0
    finally:
        again.kill()
    assert library_emu.stats()["jobs_created"] == len(VIDEOS)


async def test_a_worker_killed_between_start_and_recording_leaves_one_job_that_the_next_collects(
    db_url: str, queues: Queues, moto_url: str, library_emu: Any,
) -> None:
    """SIGKILL while Rekognition has created the job but its answer is still on the way: the JobId was never
    recorded. The next worker, once the claim's lease is over, starts the video again with the same
    ClientRequestToken, gets the same JobId, and ingests the job (whose notification came in between)."""
    library_emu.configure(drop_notifications=0, start_answer_delay_s=3.0)
    bucket = f"media-{uuid.uuid4().hex[:10]}"
    async with get_session().create_client("s3", region_name="us-east-1", endpoint_url=moto_url) as s3:
        await s3.create_bucket(Bucket=bucket)
        await s3.put_object(Bucket=bucket, Key="crash/one.mp4", Body=b"\x00")
    env = {**_env(db_url, queues, moto_url, library_emu), "SUBMIT_START_LEASE_S": "2"}
    assert "1 new" in _submit(env, f"s3://{bucket}/crash/")

    first = WorkerProcess([], env)
    try:
        deadline = time.monotonic() + 30
        while library_emu.stats()["jobs_created"] < 1:
            assert time.monotonic() < deadline and first.proc.poll() is None, first.lines[-10:]
            time.sleep(0.05)
    finally:
        first.kill()  # SIGKILL, the Start* answer still delayed
    conn = await asyncpg.connect(db_url)
    try:
        row = await conn.fetchrow("SELECT state, job_id FROM submissions")
        assert (row["state"], row["job_id"]) == ("starting", None)
        library_emu.configure(start_answer_delay_s=0.0)
        second = WorkerProcess(["--exit-when-idle"], env)
        try:
            assert second.wait(90) == 0, second.lines[-10:]
        finally:
            second.kill()
        [created] = [r for r in library_emu.stats()["started_jobs"] if r["video_bucket"] == bucket]
        row = await conn.fetchrow("SELECT s.state, s.job_id, s.start_attempts, j.faces FROM submissions s "
                                  "JOIN jobs j USING (job_id)")
    finally:
        await conn.close()
    stats = library_emu.stats()
    assert stats["jobs_created"] == 1 and stats["idempotent_starts"] == 1
    assert (row["state"], row["job_id"], row["start_attempts"], row["faces"]) == (
        "ingested", created["job_id"], 2, FACES)
