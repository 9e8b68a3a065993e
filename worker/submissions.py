"""What a submission is, without I/O: the videos `submit` accepts, the start options, the idempotency token.

A submission is one video analysed by one API with one set of start options. Its ClientRequestToken is
derived from exactly those (and the generation, which `submit --force` bumps), so every retry of a start,
by any replica and after any crash, sends the same token, and Rekognition answers a repeated start with
the JobId of the first instead of starting the video again.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson

from worker.errors import InvalidInput
from worker.messages import Api

# Object names Rekognition Video analyses (MPEG-4 and QuickTime containers), compared case-insensitively.
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v")
# The states in the order a submission walks them; `starting` and `started` hold a MAX_REKOGNITION_JOBS slot.
STATES = ("submitted", "starting", "started", "finished", "ingested", "failed")
RUNNING_STATES = ("starting", "started")
OPEN_STATES = ("submitted", "starting", "started")

# Patterns and ranges of the Start* members, from the service model.
_COLLECTION_ID_RE = re.compile(r"^[a-zA-Z0-9_.\-]{1,255}$")
_JOB_TAG_RE = re.compile(r"^[a-zA-Z0-9_.\-:]{1,1024}$")
_BUCKET_RE = re.compile(r"^[0-9A-Za-z.\-_]{3,255}$")
MAX_VIDEO_NAME_CHARS = 1024
DEFAULT_FACE_MATCH_THRESHOLD = 80.0  # Rekognition's own default for StartFaceSearch


def is_video(name: str) -> bool:
    return name.lower().endswith(VIDEO_SUFFIXES)


@dataclass(frozen=True, slots=True)
class Video:
    bucket: str
    name: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.name}"


def parse_s3_url(text: str) -> tuple[str, str]:
    """``s3://bucket/prefix-or-key`` -> (bucket, rest); the rest may be empty (a whole bucket)."""
    raw = text.strip()
    if not raw.startswith("s3://"):
        raise InvalidInput(f"{raw[:200]!r} is not an s3://bucket/key URL")
    bucket, _, rest = raw[len("s3://"):].partition("/")
    if not _BUCKET_RE.fullmatch(bucket):
        raise InvalidInput(f"{raw[:200]!r}: {bucket[:80]!r} is not an S3 bucket name")
    if len(rest) > MAX_VIDEO_NAME_CHARS:
        raise InvalidInput(f"{raw[:200]}...: the key is longer than {MAX_VIDEO_NAME_CHARS} characters")
    return bucket, rest


@dataclass(frozen=True, slots=True)
class StartOptions:
    """The Start* parameters a submission is started with (besides the video and the notification channel)."""

    api: Api
    collection_id: str | None = None
    face_match_threshold: float | None = None
    face_attributes: str | None = None
    job_tag: str | None = None

    @classmethod
    def create(cls, api: Api, *, collection_id: str | None = None, face_match_threshold: float | None = None,
               face_attributes: str | None = None, job_tag: str | None = None) -> StartOptions:
        """Validated, with Rekognition's defaults written out (so that leaving an option out and giving its
        default are the same submission)."""
        if job_tag is not None and not _JOB_TAG_RE.fullmatch(job_tag):
            raise InvalidInput(f"--job-tag {job_tag[:80]!r} must be 1..1024 characters of [a-zA-Z0-9_.-:]")
        if api is Api.FACE_DETECTION:
            if collection_id is not None or face_match_threshold is not None:
                raise InvalidInput("--collection-id and --face-match-threshold are for FACE_SEARCH; "
                                   "FACE_DETECTION takes --face-attributes")
            attributes = (face_attributes or "DEFAULT").upper()
            if attributes not in ("DEFAULT", "ALL"):
                raise InvalidInput(f"--face-attributes must be DEFAULT or ALL (got {face_attributes!r})")
            return cls(api, face_attributes=attributes, job_tag=job_tag)
        if face_attributes is not None:
            raise InvalidInput("--face-attributes is for FACE_DETECTION (face search returns the default attributes)")
        if collection_id is None:
            raise InvalidInput("FACE_SEARCH needs --collection-id: the face collection to search")
        if not _COLLECTION_ID_RE.fullmatch(collection_id):
            raise InvalidInput(f"--collection-id {collection_id[:80]!r} must be 1..255 characters of [a-zA-Z0-9_.-]")
        threshold = DEFAULT_FACE_MATCH_THRESHOLD if face_match_threshold is None else float(face_match_threshold)
        if not 0.0 <= threshold <= 100.0:
            raise InvalidInput(f"--face-match-threshold must be within 0..100 (got {face_match_threshold})")
        return cls(api, collection_id=collection_id, face_match_threshold=threshold, job_tag=job_tag)

    def as_json(self) -> dict[str, Any]:
        """What the submissions row stores (``options``); :meth:`from_json` reads it back."""
        out: dict[str, Any] = {}
        if self.face_attributes is not None:
            out["face_attributes"] = self.face_attributes
        if self.collection_id is not None:
            out["collection_id"] = self.collection_id
        if self.face_match_threshold is not None:
            out["face_match_threshold"] = self.face_match_threshold
        if self.job_tag is not None:
            out["job_tag"] = self.job_tag
        return out

    @classmethod
    def from_json(cls, api: Api, data: dict[str, Any]) -> StartOptions:
        return cls(api, collection_id=data.get("collection_id"), face_match_threshold=data.get("face_match_threshold"),
                   face_attributes=data.get("face_attributes"), job_tag=data.get("job_tag"))

    @property
    def key(self) -> str:
        """Identifies the options among a video's submissions (part of the table's unique key)."""
        canonical = orjson.dumps({"api": self.api.value, **self.as_json()}, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canonical).hexdigest()[:32]

    def start_request(self, video: Video, token: str, notification_channel: dict[str, str] | None
                      ) -> dict[str, Any]:
        """The keyword arguments of StartFaceDetection / StartFaceSearch."""
        params: dict[str, Any] = {"Video": {"S3Object": {"Bucket": video.bucket, "Name": video.name}},
                                  "ClientRequestToken": token}
        if notification_channel is not None:
            params["NotificationChannel"] = notification_channel
        if self.job_tag is not None:
            params["JobTag"] = self.job_tag
        if self.api is Api.FACE_DETECTION:
            params["FaceAttributes"] = self.face_attributes or "DEFAULT"
        else:
            params["CollectionId"] = self.collection_id
            params["FaceMatchThreshold"] = self.face_match_threshold
        return params


def client_request_token(video: Video, options: StartOptions, generation: int) -> str:
    """64 hex characters (the member's maximum length), the same for the same video, options and generation.

    Two deployments in one account that submit the same video with the same options share its job: the one
    that started it second gets no notification of its own, and its sweep probe collects the job instead.
    """
    material = "\x00".join((video.bucket, video.name, options.key, str(generation)))
    return hashlib.sha256(material.encode()).hexdigest()
