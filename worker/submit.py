"""The `submit` and `submissions` commands.

`submit` lists the videos named (every .mp4/.mov/.m4v object under ``s3://bucket/prefix``, or the
``s3://bucket/key`` lines of a file), records the new ones as submitted in PostgreSQL and puts one start
request on QUEUE_URL; `run` starts them (worker/scheduler.py). It calls no Rekognition API itself.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError
from rich.console import Console

from worker.config import Settings
from worker.db.submissions import SubmissionStore, chunks
from worker.errors import InvalidInput, NotFound, Unavailable, aws_error
from worker.logs import get_logger
from worker.messages import start_request_body
from worker.submissions import StartOptions, Video, is_video, parse_s3_url

log = get_logger(__name__)

RECORD_BATCH = 1000


@dataclass
class Listing:
    """The videos found and how many other objects were passed over."""

    # In the order found; a video named twice is one submission.
    videos: dict[Video, None] = field(default_factory=dict)
    skipped: int = 0

    def add(self, video: Video) -> None:
        if is_video(video.name):
            self.videos[video] = None
        else:
            self.skipped += 1


def read_video_list(lines: Iterable[str]) -> list[Video]:
    """``s3://bucket/key`` lines; blank lines and ``#`` comments ignored. Every line is checked first."""
    out: list[Video] = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            bucket, key = parse_s3_url(text)
        except InvalidInput as exc:
            raise InvalidInput(f"line {number}: {exc}") from None
        if not key or key.endswith("/"):
            raise InvalidInput(f"line {number}: {text[:200]!r} names no object (lines are s3://bucket/key)")
        out.append(Video(bucket, key))
    return out


async def list_prefix(s3: Any, url: str) -> AsyncIterator[Video]:
    """Every object under ``s3://bucket/prefix`` (ListObjectsV2, page by page)."""
    bucket, prefix = parse_s3_url(url)
    paginator = s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            yield Video(bucket, item["Key"])


@dataclass(frozen=True, slots=True)
class SubmitResult:
    new: int
    known: int
    resubmitted: int
    skipped: int
    start_request_queued: bool


async def run_submit(settings: Settings, options: StartOptions, prefixes: Sequence[str], from_file: str | None, *,
                     force: bool) -> SubmitResult:
    listing = Listing()
    if from_file is not None:
        for video in _read_file(from_file):
            listing.add(video)
    if prefixes:
        for url in prefixes:
            parse_s3_url(url)  # every argument checked before the first listing
        async with get_session().create_client("s3", region_name=settings.aws_region) as s3:
            for url in prefixes:
                try:
                    async for video in list_prefix(s3, url):
                        listing.add(video)
                except (ClientError, BotoCoreError) as exc:
                    if aws_error(exc).get("aws_error_code") == "NoSuchBucket":
                        raise NotFound(f"listing {url} failed: no such bucket: {aws_error(exc)['error']}") from exc
                    raise SubmitError(f"listing {url} failed: {aws_error(exc)['error']}") from exc
    store = SubmissionStore(settings.asyncpg_dsn)
    new = known = resubmitted = 0
    for batch in chunks(listing.videos, RECORD_BATCH):
        recorded = await store.record(batch, options, force=force)
        new, known, resubmitted = new + recorded.new, known + recorded.known, resubmitted + recorded.resubmitted
    queued = False
    if settings.queue_url and (new or resubmitted or (await store.counts())["submitted"]):
        queued = await _queue_start_request(settings, new + resubmitted)
    log.info("videos submitted", api=options.api.value, new=new, known=known, resubmitted=resubmitted,
             skipped=listing.skipped, start_request_queued=queued)
    return SubmitResult(new, known, resubmitted, listing.skipped, queued)


class SubmitError(Unavailable):
    """S3 or SQS refused `submit` (the videos recorded so far stay recorded)."""


def _read_file(path: str) -> list[Video]:
    if path == "-":
        return read_video_list(sys.stdin)
    try:
        handle: TextIO
        with open(path, encoding="utf-8") as handle:
            return read_video_list(handle)
    except OSError as exc:
        raise InvalidInput(f"--from-file {path}: {exc.strerror or exc}") from None


async def _queue_start_request(settings: Settings, videos: int) -> bool:
    async with get_session().create_client("sqs", region_name=settings.aws_region) as sqs:
        try:
            await sqs.send_message(QueueUrl=settings.queue_url, MessageBody=start_request_body(videos))
        except (ClientError, BotoCoreError) as exc:
            raise SubmitError(
                f"the videos are recorded, but the start request could not be queued on QUEUE_URL "
                f"({aws_error(exc)['error']}): a running `run` still starts them; run `submit` again to wake a "
                "deployment scaled to zero") from exc
    return True


def print_submit_result(result: SubmitResult, console: Console, settings: Settings) -> None:
    parts = [f"{result.new} new", f"{result.known} already known"]
    if result.resubmitted:
        parts.append(f"{result.resubmitted} resubmitted (--force)")
    parts.append(f"{result.skipped} skipped (not .mp4, .mov or .m4v)")
    console.print("submitted: " + ", ".join(parts))
    if result.start_request_queued:
        console.print("a start request is on the queue: `run` starts the videos under MAX_REKOGNITION_JOBS")
    elif not settings.queue_url and (result.new or result.resubmitted):
        console.print("QUEUE_URL is not set: no start request was queued. A running `run` starts the videos; a "
                      "deployment scaled to zero is not woken.")
