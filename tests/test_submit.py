"""`submit` and `submissions`: a video library in moto's S3 recorded in PostgreSQL, once.

Real components: moto's server (S3 and SQS over HTTP), PostgreSQL; the commands run through the CLI's
``main`` as a user runs them.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiobotocore.session import get_session

from worker.cli import main
from worker.messages import Api, is_start_request
from worker.submissions import StartOptions, Video, client_request_token

LIBRARY = {
    "archive/2024/keynote.mp4": b"v",
    "archive/2024/PANEL.MOV": b"v",
    "archive/2024/deep/nested/clip.M4v": b"v",
    "archive/2024/notes.txt": b"x",
    "archive/2024/thumb.jpg": b"x",
    "archive/2024/movie.mp4.part": b"x",
    "archive/2024/folder/": b"",
    "elsewhere/other.mp4": b"v",  # outside the prefix
}
VIDEOS = {"archive/2024/keynote.mp4", "archive/2024/PANEL.MOV", "archive/2024/deep/nested/clip.M4v"}


@pytest.fixture
async def library(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_url)
    bucket = f"videos-{uuid.uuid4().hex[:12]}"
    async with get_session().create_client("s3", region_name="us-east-1") as s3:
        await s3.create_bucket(Bucket=bucket)
        for key, body in LIBRARY.items():
            await s3.put_object(Bucket=bucket, Key=key, Body=body)
    return bucket


@pytest.fixture
def cli_env(db_url: str, monkeypatch: pytest.MonkeyPatch, queues: Any) -> Any:
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("QUEUE_URL", queues.url)
    monkeypatch.setenv("LOG_FORMAT", "console")
    return queues


async def _rows(db_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db_url)
    try:
        return await conn.fetch("SELECT * FROM reporting.submissions ORDER BY video_name")
    finally:
        await conn.close()


async def _start_requests(sqs: Any, url: str) -> list[dict[str, Any]]:
    resp = await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
    return [m for m in resp.get("Messages", []) if is_start_request(m["Body"])]


async def test_submit_records_the_videos_under_a_prefix_once(
    library: str, cli_env: Any, db_url: str, sqs: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["submit", "--api", "StartFaceDetection", "--face-attributes", "all", "--job-tag", "lib-1",
            f"s3://{library}/archive/2024/"]
    assert await _in_thread(args) == 0
    out = capsys.readouterr().out
    assert "3 new, 0 already known, 4 skipped" in out
    rows = await _rows(db_url)
    assert {r["video_name"] for r in rows} == VIDEOS
    assert {(r["video_bucket"], r["api"], r["state"], r["job_tag"]) for r in rows} == {
        (library, "FACE_DETECTION", "submitted", "lib-1")}
    assert all(r["job_id"] is None and r["started_at"] is None for r in rows)
    requests = await _start_requests(sqs, cli_env.url)
    assert [orjson.loads(m["Body"]) for m in requests] == [{"SubmissionsWaiting": 3}]

    # The same library again: nothing new, and no second start request (none is waiting to start... yet
    # the three are, so one is queued to keep the deployment awake).
    assert await _in_thread(args) == 0
    assert "0 new, 3 already known, 4 skipped" in capsys.readouterr().out
    assert len(await _rows(db_url)) == 3

    # Other options are another submission of the same video.
    assert await _in_thread(["submit", "--api", "FACE_DETECTION", f"s3://{library}/archive/2024/keynote"]) == 0
    assert "1 new, 0 already known, 0 skipped" in capsys.readouterr().out
    assert len(await _rows(db_url)) == 4


async def test_submit_from_a_file_and_force(
    library: str, cli_env: Any, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    listing = tmp_path / "videos.txt"
    listing.write_text(f"# the keynote and a still\ns3://{library}/archive/2024/keynote.mp4\n\n"
                       f"s3://{library}/archive/2024/thumb.jpg\ns3://{library}/archive/2024/keynote.mp4\n")
    args = ["submit", "--api", "FACE_SEARCH", "--collection-id", "staff", "--from-file", str(listing)]
    assert await _in_thread(args) == 0
    assert "1 new, 0 already known, 1 skipped" in capsys.readouterr().out
    [row] = await _rows(db_url)
    assert orjson.loads(row["options"]) == {"collection_id": "staff", "face_match_threshold": 80.0}
    options = StartOptions.create(Api.FACE_SEARCH, collection_id="staff")
    video = Video(library, "archive/2024/keynote.mp4")
    conn = await asyncpg.connect(db_url)
    try:
        token = await conn.fetchval("SELECT client_request_token FROM submissions")
        assert token == client_request_token(video, options, 1)
        # Still open: --force leaves it alone (its job would be started twice).
        assert await _in_thread([*args, "--force"]) == 0
        assert "0 new, 1 already known" in capsys.readouterr().out
        await conn.execute("UPDATE submissions SET state = 'ingested', job_id = 'j-1', ingested_at = now()")
        assert await _in_thread([*args, "--force"]) == 0
        assert "0 new, 0 already known, 1 resubmitted (--force), 1 skipped" in capsys.readouterr().out
        row = await conn.fetchrow("SELECT * FROM submissions")
        assert (row["state"], row["generation"], row["job_id"], row["ingested_at"]) == ("submitted", 2, None, None)
        assert row["client_request_token"] == client_request_token(video, options, 2) != token
    finally:
        await conn.close()


@pytest.mark.parametrize(("args", "message"), [
    (["--api", "FACE_SEARCH", "s3://b-b-b/x"], "needs --collection-id"),
    (["--api", "FACE_DETECTION", "--collection-id", "c", "s3://b-b-b/x"], "are for FACE_SEARCH"),
    (["--api", "FACE_DETECTION", "--face-attributes", "SOME", "s3://b-b-b/x"], "DEFAULT or ALL"),
    (["--api", "FACE_SEARCH", "--collection-id", "c", "--face-match-threshold", "101", "s3://b-b-b/x"], "0..100"),
    (["--api", "LABEL_DETECTION", "s3://b-b-b/x"], "unknown or unsupported API"),
    (["--api", "FACE_DETECTION", "https://b-b-b/x"], "is not an s3://bucket/key URL"),
    (["--api", "FACE_DETECTION"], "needs s3://bucket/prefix arguments or --from-file"),
])
async def test_submit_refuses_bad_arguments_before_recording_anything(
    cli_env: Any, db_url: str, args: list[str], message: str, capsys: pytest.CaptureFixture[str],
) -> None:
    assert await _in_thread(["submit", *args]) == 2
    assert message in capsys.readouterr().err
    assert await _rows(db_url) == []


async def test_a_bad_line_refuses_the_whole_file(cli_env: Any, db_url: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "videos.txt"
    listing.write_text("s3://bucket-a/one.mp4\ns3://bucket-a/\n")
    assert await _in_thread(["submit", "--api", "FACE_DETECTION", "--from-file", str(listing)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert await _rows(db_url) == []


async def test_submissions_lists_by_state(library: str, cli_env: Any, db_url: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert await _in_thread(["submit", "--api", "FACE_DETECTION", f"s3://{library}/archive/"]) == 0
    capsys.readouterr()
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("UPDATE submissions SET state = 'failed', failure_reason = 'InvalidS3ObjectException' "
                           "WHERE video_name LIKE '%PANEL%'")
    finally:
        await conn.close()
    assert await _in_thread(["submissions", "--state", "failed", "--format", "json"]) == 0
    rows = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]  # JSON lines
    assert [r["video_name"] for r in rows] == ["archive/2024/PANEL.MOV"]
    assert await _in_thread(["submissions", "--counts", "--format", "json"]) == 0
    counts = {r["state"]: r["submissions"] for r in map(orjson.loads, capsys.readouterr().out.splitlines())}
    assert counts["failed"] == 1 and counts["submitted"] == 2
    assert await _in_thread(["submissions", "--format", "table"]) == 0
    out = capsys.readouterr().out
    assert "submitted 2" in out and "failed 1" in out and "InvalidS3ObjectException" in out
    assert await _in_thread(["submissions", "--state", "lost"]) == 2


async def _in_thread(argv: list[str]) -> int:
    """The CLI runs its own event loop: call it off this test's loop."""
    import asyncio

    return await asyncio.to_thread(main, argv)


async def test_a_listing_of_a_missing_bucket_records_nothing_and_exits_3(
    library: str, cli_env: Any, db_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["submit", "--api", "FACE_DETECTION", f"s3://{library}/archive/", "s3://no-such-bucket-here/x/"]
    assert await _in_thread(args) == 3  # not found (docs/cli.md, "Exit codes")
    assert "listing s3://no-such-bucket-here/x/ failed" in capsys.readouterr().err
    assert await _rows(db_url) == []
