"""Turn input (SQS bodies, backfill lines, CLI arguments) into validated JobRefs.

Everything is validated before any AWS call: the JobId pattern and a known face API.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

import orjson

from worker.errors import InvalidInput

JOB_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# A body larger than this cannot be a Rekognition notification; refuse before decoding.
MAX_BODY_BYTES = 256 * 1024
_MAX_JSON_DEPTH = 16
# The notification's informational members (JobTag <= 1024, S3 bucket <= 255, object name <= 1024
# characters in the service model) are stored as given when a job is recorded FAILED from the
# notification alone; anything PostgreSQL text cannot hold (NUL) or longer than the model allows is
# dropped rather than allowed to fail that write and send a good notification round in retries.
_MAX_INFO_CHARS = 1024
# Notification timestamps are Unix milliseconds; beyond year 9999 Python's datetime cannot hold them.
_MAX_TIMESTAMP_MS = 253_402_300_799_999


class Api(enum.StrEnum):
    """The two Rekognition Video face APIs, as stored in the database."""

    FACE_DETECTION = "FACE_DETECTION"
    FACE_SEARCH = "FACE_SEARCH"

    @property
    def operation(self) -> str:
        return "GetFaceDetection" if self is Api.FACE_DETECTION else "GetFaceSearch"

    @property
    def results_key(self) -> str:
        return "Faces" if self is Api.FACE_DETECTION else "Persons"


_API_NAMES = {
    "getfacedetection": Api.FACE_DETECTION,
    "startfacedetection": Api.FACE_DETECTION,
    "face_detection": Api.FACE_DETECTION,
    "getfacesearch": Api.FACE_SEARCH,
    "startfacesearch": Api.FACE_SEARCH,
    "face_search": Api.FACE_SEARCH,
}


def parse_api(name: object) -> Api:
    """Accept every documented spelling of the two face APIs, case-insensitively."""
    if not isinstance(name, str) or name.strip().lower() not in _API_NAMES:
        shown = name if isinstance(name, str) else type(name).__name__
        raise InvalidInput(
            f"unknown or unsupported API {str(shown)[:80]!r}: expected one of GetFaceDetection, "
            "GetFaceSearch, StartFaceDetection, StartFaceSearch, FACE_DETECTION, FACE_SEARCH"
        )
    return _API_NAMES[name.strip().lower()]


def validate_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        shown = job_id if isinstance(job_id, str) else type(job_id).__name__
        raise InvalidInput(f"invalid JobId {str(shown)[:80]!r}: must match ^[a-zA-Z0-9-_]{{1,64}}$")
    return job_id


@dataclass(frozen=True, slots=True)
class JobRef:
    """One job to ingest, and what the notification said about it (when there was one)."""

    job_id: str
    api: Api
    # Status from the completion notification: SUCCEEDED, FAILED or ERROR; None for backfills.
    notified_status: str | None = None
    notified_at_ms: int | None = None
    job_tag: str | None = None
    video_bucket: str | None = None
    video_name: str | None = None

    @classmethod
    def create(cls, job_id: object, api: object, **kw: Any) -> JobRef:
        return cls(job_id=validate_job_id(job_id), api=parse_api(api), **kw)


class OtherApiNotification(InvalidInput):
    """A well-formed completion notification of another Rekognition API (labels, text, persons...) that
    shares the topic: not this worker's to ingest. OTHER_API_NOTIFICATIONS decides what becomes of it."""

    def __init__(self, api: str, job_id: str) -> None:
        super().__init__(f"unsupported API {api[:80]!r}: a notification of another Rekognition API (job {job_id}); "
                         "this worker ingests only GetFaceDetection and GetFaceSearch results")
        self.api = api


# Rekognition's API names, in both documented spellings (StartLabelDetection, LABEL_DETECTION).
_REKOGNITION_API_RE = re.compile(r"^(Start[A-Z][A-Za-z]{1,60}|[A-Z][A-Z_]{1,60})$")


class ApiMissing(InvalidInput):
    """A backfill line names a valid JobId but no API (and no --api was given)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} names no API: write JOB_ID,API or pass --api")
        self.job_id = job_id


def parse_backfill_line(line: str, default_api: Api | None = None) -> JobRef | None:
    """``JOB_ID`` or ``JOB_ID,API``; blank lines and ``#`` comments give None."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    job_id, sep, api = (p.strip() for p in text.partition(","))
    if not sep:
        if default_api is None:
            raise ApiMissing(validate_job_id(job_id))
        return JobRef(job_id=validate_job_id(job_id), api=default_api)
    return JobRef.create(job_id, api)


def _depth(value: Any, limit: int) -> int:
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


def _loads(raw: bytes | str, what: str) -> Any:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    if _depth(value, _MAX_JSON_DEPTH) > _MAX_JSON_DEPTH:
        raise InvalidInput(f"{what} is nested deeper than {_MAX_JSON_DEPTH} levels")
    return value


# `submit` puts ``{"SubmissionsWaiting": N}`` on the queue: it wakes a deployment scaled to zero (the queue
# autoscaler counts it) and keeps one replica up while submissions are open (see worker/service.py).
START_REQUEST_KEY = "SubmissionsWaiting"


def start_request_body(videos: int) -> str:
    return orjson.dumps({START_REQUEST_KEY: videos}).decode()


def is_start_request(body: str | bytes) -> bool:
    """A start request of `submit` (checked before :func:`parse_message_body`, which would refuse it)."""
    if len(body) > 1024:
        return False
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and set(doc) == {START_REQUEST_KEY}


def parse_message_body(body: str | bytes) -> JobRef:
    """An SQS body: the SNS envelope, the raw Rekognition notification, or ``{"JobId", "API"}``.

    Raises InvalidInput with the reason for anything else.
    """
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidInput(f"message body is {len(raw)} bytes, larger than any notification")
    doc = _loads(raw, "message body")
    if isinstance(doc, dict) and doc.get("Type") == "Notification" and "Message" in doc:
        inner = doc["Message"]
        if not isinstance(inner, str):
            raise InvalidInput("SNS envelope's Message is not a string")
        doc = _loads(inner, "SNS Message")
    if not isinstance(doc, dict):
        raise InvalidInput(f"notification must be a JSON object, got {type(doc).__name__}")
    if "JobId" not in doc:
        raise InvalidInput("notification has no JobId")
    if "API" not in doc:
        raise InvalidInput("notification has no API")
    status = doc.get("Status")
    if status is not None and status not in ("SUCCEEDED", "FAILED", "ERROR", "IN_PROGRESS"):
        raise InvalidInput(f"notification Status {str(status)[:40]!r} is not a job status")
    ts = doc.get("Timestamp")
    notified_at_ms = ts if type(ts) is int and 0 < ts <= _MAX_TIMESTAMP_MS else None
    video_raw = doc.get("Video")
    video: dict[str, Any] = video_raw if isinstance(video_raw, dict) else {}
    api = doc["API"]
    if isinstance(api, str) and api.strip().lower() not in _API_NAMES and _REKOGNITION_API_RE.fullmatch(api):
        raise OtherApiNotification(api, validate_job_id(doc["JobId"]))
    return JobRef.create(
        doc["JobId"],
        doc["API"],
        notified_status=status,
        notified_at_ms=notified_at_ms,
        job_tag=_info(doc.get("JobTag")),
        video_bucket=_info(video.get("S3Bucket")),
        video_name=_info(video.get("S3ObjectName")),
    )


def _info(value: object) -> str | None:
    """An informational string member, or None when it is absent or unstorable (see _MAX_INFO_CHARS)."""
    if type(value) is str and 0 < len(value) <= _MAX_INFO_CHARS and "\x00" not in value:
        return value
    return None
