"""The start half of Rekognition Video for the emulator: StartFaceDetection and StartFaceSearch.

What a start does in the service, reduced to what a submitting client can observe: a JobId comes back, the
job counts toward the account's concurrent-job limit until it completes, Get* answers IN_PROGRESS until then
and SUCCEEDED with results afterwards, and when the start named a NotificationChannel a completion
notification reaches the topic (here: SNS-enveloped straight into an SQS queue). A ClientRequestToken makes
a start idempotent. "External" jobs stand for other systems in the same account: they only take room.

Nothing here does HTTP or holds a lock. :class:`StartBook` is plain state that the emulator changes under
its own lock, on its injected clock; :func:`deliver_notifications` is the emulator's background task that
sends what the book has queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
import re
import secrets
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, get_args

import structlog

from worker.local.sqs import sns_envelope
from worker.local.synth import Api, JobFixture, Json, detection_job, search_job

Clock = Callable[[], float]
StartOperation = Literal["StartFaceDetection", "StartFaceSearch"]
NotificationState = Literal["pending", "sent", "dropped", "failed"]

START_OPERATIONS: tuple[str, ...] = get_args(StartOperation)
GET_OPERATION: dict[str, Api] = {"StartFaceDetection": "GetFaceDetection", "StartFaceSearch": "GetFaceSearch"}
# The service's default when a StartFaceSearch names no FaceMatchThreshold.
DEFAULT_FACE_MATCH_THRESHOLD = 80.0
ACCOUNT_ID = "123456789012"

# Member constraints from botocore's service model (rekognition 2016-06-27). The model's patterns are
# Java-style, matched against the whole value.
_TOKEN_RE = re.compile(r"[a-zA-Z0-9-_]{1,64}")
_BUCKET_RE = re.compile(r"[0-9A-Za-z.\-_]{3,255}")
_TOPIC_RE = re.compile(r"arn:aws:sns:.*:\w{12}:.+")
_ROLE_RE = re.compile(r"arn:aws:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+")
_JOB_TAG_RE = re.compile(r"[a-zA-Z0-9_.\-:+=/]{1,1024}")
_COLLECTION_RE = re.compile(r"[a-zA-Z0-9_.\-]{1,255}")
_FACE_ATTRIBUTES = ("DEFAULT", "ALL")

_COUNTERS = ("starts_requested", "jobs_created", "idempotent_starts", "limit_exceeded", "start_throttled",
             "notifications_sent", "notifications_dropped", "notifications_failed")

log = structlog.get_logger("worker.local.starts")


class StartRejected(Exception):
    """A modeled error for a Start* call (the emulator answers it as ``{"__type", "Message"}``, HTTP 400)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> StartRejected:
    return StartRejected("InvalidParameterException", message)


def _string(params: Json, name: str, pattern: re.Pattern[str] | None = None, *,
            max_chars: int | None = None) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _invalid(f"{name} must be a non-empty string")
    if max_chars is not None and len(value) > max_chars:
        raise _invalid(f"{name} must be at most {max_chars} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise _invalid(f"{name} must match {pattern.pattern}")
    return value


def _required(params: Json, name: str, pattern: re.Pattern[str] | None = None, *,
              max_chars: int | None = None) -> str:
    value = _string(params, name, pattern, max_chars=max_chars)
    if value is None:
        raise _invalid(f"{name} is required")
    return value


def _object(params: Json, name: str, *, required: bool = False) -> Json | None:
    value = params.get(name)
    if value is None:
        if required:
            raise _invalid(f"{name} is required")
        return None
    if not isinstance(value, dict):
        raise _invalid(f"{name} must be an object")
    return value


@dataclass(frozen=True)
class StartRequest:
    """A validated Start* request; equality (token aside) decides IdempotentParameterMismatchException."""

    operation: StartOperation
    bucket: str
    name: str
    version: str | None = None
    token: str | None = None
    topic_arn: str | None = None
    role_arn: str | None = None
    job_tag: str | None = None
    face_attributes: str = "DEFAULT"
    collection_id: str | None = None
    face_match_threshold: float | None = None

    @classmethod
    def parse(cls, operation: str, params: Json) -> StartRequest:
        """Validate as the service model does; raises StartRejected(InvalidParameterException)."""
        if operation not in START_OPERATIONS:
            raise _invalid(f"not a start operation: {operation!r}")
        video = _object(params, "Video", required=True)
        assert video is not None
        # The model leaves S3Object and its members optional (the shape is shared with images given as
        # bytes); a stored video has none of that choice, and the service rejects a start without them.
        s3 = _object(video, "S3Object", required=True)
        assert s3 is not None
        channel = _object(params, "NotificationChannel")
        face_attributes = params.get("FaceAttributes", "DEFAULT")
        threshold = params.get("FaceMatchThreshold")
        collection_id = None
        if operation == "StartFaceDetection":
            if face_attributes not in _FACE_ATTRIBUTES:
                raise _invalid(f"FaceAttributes must be DEFAULT or ALL (got {face_attributes!r})")
        else:
            face_attributes = "DEFAULT"  # GetFaceSearch returns only the default attributes
            collection_id = _required(params, "CollectionId", _COLLECTION_RE)
            if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                          or not 0 <= threshold <= 100):
                raise _invalid("FaceMatchThreshold must be a number within 0..100")
        return cls(
            operation=operation,  # type: ignore[arg-type]  # checked against START_OPERATIONS above
            bucket=_required(s3, "Bucket", _BUCKET_RE),
            name=_required(s3, "Name", max_chars=1024),
            version=_string(s3, "Version", max_chars=1024),
            token=_string(params, "ClientRequestToken", _TOKEN_RE),
            topic_arn=None if channel is None else _required(channel, "SNSTopicArn", _TOPIC_RE),
            role_arn=None if channel is None else _required(channel, "RoleArn", _ROLE_RE),
            job_tag=_string(params, "JobTag", _JOB_TAG_RE),
            face_attributes=face_attributes,
            collection_id=collection_id,
            face_match_threshold=None if threshold is None else float(threshold),
        )

    @property
    def get_operation(self) -> Api:
        return GET_OPERATION[self.operation]

    def video(self) -> Json:
        """The ``Video`` member Get* echoes: the started object."""
        s3: Json = {"Bucket": self.bucket, "Name": self.name}
        if self.version is not None:
            s3["Version"] = self.version
        return {"S3Object": s3}


@dataclass
class StartedJob:
    """One job created by a Start* call, and what became of its completion notification."""

    job_id: str
    request: StartRequest
    faces: int
    created_s: float
    due_s: float
    completed_s: float | None = None
    notification: NotificationState | None = None  # None: the start named no NotificationChannel

    def pending_fixture(self) -> JobFixture:
        """What Get* serves until the job completes: IN_PROGRESS, no results."""
        return JobFixture(job_id=self.job_id, api=self.request.get_operation, job_status="IN_PROGRESS",
                          video=self.request.video(), job_tag=self.request.job_tag)

    def finished_fixture(self) -> JobFixture:
        """SUCCEEDED with results synthesized from the JobId (same JobId, same results)."""
        req = self.request
        if req.operation == "StartFaceDetection":
            fixture = detection_job(self.job_id, faces=self.faces, attributes="ALL" if req.face_attributes == "ALL"
                                    else "DEFAULT")
        else:
            fixture = search_job(self.job_id, persons_elements=self.faces)
            threshold = DEFAULT_FACE_MATCH_THRESHOLD if req.face_match_threshold is None else req.face_match_threshold
            fixture.results = [
                {**person, "FaceMatches": [m for m in person["FaceMatches"] if m["Similarity"] >= threshold]}
                for person in fixture.results
            ]
        return replace(fixture, video=req.video(), job_tag=req.job_tag)

    def notification_body(self, timestamp_ms: int) -> Json:
        """Rekognition's completion notification, members in the service's order."""
        note: Json = {"JobId": self.job_id, "Status": "SUCCEEDED", "API": self.request.operation}
        if self.request.job_tag is not None:
            note["JobTag"] = self.request.job_tag
        note["Timestamp"] = timestamp_ms
        note["Video"] = {"S3ObjectName": self.request.name, "S3Bucket": self.request.bucket}
        return note

    def record(self) -> Json:
        req = self.request
        return {
            "job_id": self.job_id, "api": req.operation, "token": req.token, "video_bucket": req.bucket,
            "video_name": req.name, "job_tag": req.job_tag, "created_s": self.created_s,
            "completed_s": self.completed_s, "notification": self.notification,
        }


@dataclass(frozen=True)
class Outgoing:
    """A completion notification waiting for delivery: the SQS body (SNS envelope) and where it goes."""

    job_id: str
    queue_url: str
    body: str


@dataclass
class StartBook:
    """Started and external jobs, idempotency tokens, the notification outbox and the start counters.

    Not thread-safe by itself: the emulator calls it under its lock. Times are on the emulator's clock;
    ``wall_clock`` only dates the notifications (Unix milliseconds).
    """

    clock: Clock
    wall_clock: Clock = time.time
    jobs: dict[str, StartedJob] = field(default_factory=dict)
    # (operation, token) -> JobId; kept forever (the service keeps them 7 days).
    tokens: dict[tuple[str, str], str] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    outbox: deque[Outgoing] = field(default_factory=deque)
    _running: list[tuple[float, str]] = field(default_factory=list)  # heap of (due_s, JobId)
    _external: list[float] = field(default_factory=list)  # heap of due_s
    _peak_running: int = 0
    _peak_running_started: int = 0

    def __post_init__(self) -> None:
        # The clock may be monotonic: anchor it to the wall clock once, so notifications carry real dates.
        self._wall_offset_s = self.wall_clock() - self.clock()

    def running(self) -> int:
        return len(self._running) + len(self._external)

    def start(self, request: StartRequest, now_s: float, *, max_running: int, duration_s: float, faces: int,
              invalid_videos: Collection[str]) -> tuple[StartedJob, bool]:
        """The job for ``request`` and whether it is new; raises StartRejected.

        Checks in the service's order for what a client can tell apart: a known token answers before the
        account's limit is looked at, so a retried start of a job that exists succeeds even when full.
        Call :meth:`complete_due` first, so the limit sees the jobs still running at ``now_s``.
        """
        key = None if request.token is None else (request.operation, request.token)
        if key is not None and key in self.tokens:
            job = self.jobs[self.tokens[key]]
            if replace(job.request, token=None) != replace(request, token=None):
                raise StartRejected(
                    "IdempotentParameterMismatchException",
                    "A ClientRequestToken input parameter was reused with an operation, but at least one of "
                    "the other input parameters is different from the previous call to the operation.",
                )
            self.counters["idempotent_starts"] += 1
            return job, False
        if request.name in invalid_videos:
            raise StartRejected("InvalidS3ObjectException",
                                "Unable to get object metadata from S3. Check object key, region and/or access "
                                "permissions.")
        if self.running() >= max_running:
            self.counters["limit_exceeded"] += 1
            raise StartRejected("LimitExceededException",
                                f"{self.running()} open Jobs for User {ACCOUNT_ID}. Maximum limit: {max_running}")
        job = StartedJob(job_id=secrets.token_hex(32), request=request, faces=faces, created_s=now_s,
                         due_s=now_s + duration_s, notification=None if request.topic_arn is None else "pending")
        self.jobs[job.job_id] = job
        if key is not None:
            self.tokens[key] = job.job_id
        heapq.heappush(self._running, (job.due_s, job.job_id))
        self.counters["jobs_created"] += 1
        self._note_peaks()
        return job, True

    def occupy(self, jobs: int, duration_s: float, now_s: float) -> None:
        """Add ``jobs`` running jobs started by another system in the account, for ``duration_s``."""
        if jobs < 0 or not duration_s >= 0:
            raise ValueError(f"occupy needs jobs >= 0 and duration_s >= 0 (got {jobs!r}, {duration_s!r})")
        for _ in range(jobs):
            heapq.heappush(self._external, now_s + duration_s)
        self._note_peaks()

    def _note_peaks(self) -> None:
        self._peak_running = max(self._peak_running, self.running())
        self._peak_running_started = max(self._peak_running_started, len(self._running))

    def next_due_s(self) -> float | None:
        """When the next started job completes (external ones send nothing, so they do not count)."""
        return self._running[0][0] if self._running else None

    def complete_due(self, now_s: float, *, queue_url: str | None, drop_next: int,
                     drop_for: Collection[str]) -> tuple[list[StartedJob], int]:
        """Complete every job due by ``now_s``, in completion order; returns them and how many of the
        ``drop_next`` notifications to lose were used. Notifications to send go to :attr:`outbox`."""
        while self._external and self._external[0] <= now_s:
            heapq.heappop(self._external)
        done: list[StartedJob] = []
        drops_used = 0
        while self._running and self._running[0][0] <= now_s:
            due_s, job_id = heapq.heappop(self._running)
            job = self.jobs[job_id]
            job.completed_s = due_s
            done.append(job)
            if job.notification is None:
                continue
            if job.request.name in drop_for or drops_used < drop_next:
                if job.request.name not in drop_for:
                    drops_used += 1
                job.notification = "dropped"
                self.counters["notifications_dropped"] += 1
            elif queue_url is None:
                job.notification = "failed"
                self.counters["notifications_failed"] += 1
                log.warning("completion notification not delivered: no notification_queue_url", job_id=job_id)
            else:
                timestamp_ms = round((due_s + self._wall_offset_s) * 1000)
                body = sns_envelope(job.notification_body(timestamp_ms), topic_arn=job.request.topic_arn or "",
                                    message_id=str(uuid.uuid4()), timestamp=_iso_ms(timestamp_ms))
                self.outbox.append(Outgoing(job_id, queue_url, body))
        return done, drops_used

    def take_outbox(self) -> list[Outgoing]:
        batch = list(self.outbox)
        self.outbox.clear()
        return batch

    def delivered(self, outgoing: Outgoing, error: str | None) -> None:
        job = self.jobs.get(outgoing.job_id)
        if error is None:
            self.counters["notifications_sent"] += 1
        else:
            self.counters["notifications_failed"] += 1
            log.warning("completion notification not delivered", job_id=outgoing.job_id,
                        queue_url=outgoing.queue_url, error=error)
        if job is not None:
            job.notification = "sent" if error is None else "failed"

    def stats(self) -> Json:
        out: Json = {name: self.counters[name] for name in _COUNTERS}
        out["notifications_pending"] = len(self.outbox)
        out["running_now"] = self.running()
        out["peak_running"] = self._peak_running
        out["peak_running_started"] = self._peak_running_started
        out["started_jobs"] = [job.record() for job in self.jobs.values()]
        return out

    def reset_stats(self) -> None:
        """Zero the counters; the peaks restart from what runs now. Jobs and tokens stay."""
        self.counters.clear()
        self._peak_running = self.running()
        self._peak_running_started = len(self._running)


def _iso_ms(timestamp_ms: int) -> str:
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _sqs_config() -> Any:
    from aiobotocore.config import AioConfig

    # Bounded, so one unreachable queue cannot hold the others back for long.
    return AioConfig(connect_timeout=2, read_timeout=5, retries={"mode": "standard", "total_max_attempts": 2})


async def deliver_notifications(
    *,
    settle: Callable[[], tuple[list[Outgoing], float | None]],
    delivered: Callable[[Outgoing, str | None], None],
    endpoint_url: Callable[[], str | None],
    wake: asyncio.Event,
    clock: Clock,
) -> None:
    """Run until cancelled: complete due jobs, send their notifications, sleep until the next completion.

    ``settle`` completes what is due (under the emulator's lock) and returns the notifications to send and
    the next completion time; ``wake`` is set when that may have changed (a start, a lazy completion). A
    failed delivery is reported through ``delivered`` and never ends the task.
    """
    session: Any = None
    while True:
        wake.clear()
        try:
            batch, next_due_s = settle()
        except Exception:  # a bug here must not end deliveries for good: try again at the next wake
            log.exception("settling started jobs failed")
            batch, next_due_s = [], None
        if batch:
            try:
                if session is None:  # imported on first use: an emulator that never notifies never pays for it
                    from aiobotocore.session import get_session

                    session = get_session()
                # A client per batch: the endpoint (AWS_ENDPOINT_URL_SQS) may change between batches.
                async with session.create_client("sqs", region_name=_region(), endpoint_url=endpoint_url(),
                                                  config=_sqs_config()) as sqs:
                    while batch:
                        out = batch[0]
                        try:
                            await sqs.send_message(QueueUrl=out.queue_url, MessageBody=out.body)
                        except Exception as exc:
                            delivered(out, f"{type(exc).__name__}: {exc}")
                        else:
                            delivered(out, None)
                        batch.pop(0)
            except Exception as exc:  # the client itself failed (no credentials, bad endpoint)
                for out in batch:
                    delivered(out, f"{type(exc).__name__}: {exc}")
            continue  # more may have come due while sending
        delay_s = None if next_due_s is None else max(0.0, next_due_s - clock())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await wake.wait()

