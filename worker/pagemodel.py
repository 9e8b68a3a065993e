"""The Get* response model as msgspec Structs: what the fast decoder reads, typed, in one C pass.

Only the members worker/normalize.py reads are declared (PascalCase on the wire, snake_case here); any
other member is skipped, as the normalizer ignores it (the raw archive keeps the page as sent). The
types are the normalizer's where msgspec can check them: a value of the wrong type, an integer beyond
a bigint, a negative Timestamp or a number beyond a double fails the decode, and the page goes to the
normalizer, which names the path. What msgspec cannot check here (NUL characters, lengths of keys,
enumeration values, required members) the decoder checks itself (worker/pagecopy.py).

``gc=False``: a full page decodes to ~45,000 of these; none can be part of a reference cycle.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta, Struct

MAX_BIGINT = 2**63 - 1
# A bigint column, as the normalizer bounds it (-MAX_BIGINT .. MAX_BIGINT).
BigInt = Annotated[int, Meta(ge=-MAX_BIGINT, le=MAX_BIGINT)]
# Milliseconds from the start of the video: never negative.
Millis = Annotated[int, Meta(ge=0, le=MAX_BIGINT)]


class _Model(Struct, rename="pascal", gc=False):
    """Every member optional: a missing member is None, like ``dict.get``."""


class BoundingBox(_Model):
    width: float | None = None
    height: float | None = None
    left: float | None = None
    top: float | None = None


class AgeRange(_Model):
    low: BigInt | None = None
    high: BigInt | None = None


class Flag(_Model):
    """Smile, Eyeglasses, Sunglasses, Beard, Mustache, EyesOpen, MouthOpen, FaceOccluded."""

    value: bool | None = None
    confidence: float | None = None


class Gender(_Model):
    value: str | None = None
    confidence: float | None = None


class Landmark(_Model):
    type: str | None = None
    x: float | None = None
    y: float | None = None


class Emotion(_Model):
    type: str | None = None
    confidence: float | None = None


class Pose(_Model):
    roll: float | None = None
    yaw: float | None = None
    pitch: float | None = None


class ImageQuality(_Model):
    brightness: float | None = None
    sharpness: float | None = None


class EyeDirection(_Model):
    yaw: float | None = None
    pitch: float | None = None
    confidence: float | None = None


class FaceDetail(_Model):
    bounding_box: BoundingBox | None = None
    age_range: AgeRange | None = None
    smile: Flag | None = None
    eyeglasses: Flag | None = None
    sunglasses: Flag | None = None
    gender: Gender | None = None
    beard: Flag | None = None
    mustache: Flag | None = None
    eyes_open: Flag | None = None
    mouth_open: Flag | None = None
    emotions: list[Emotion] | None = None
    landmarks: list[Landmark] | None = None
    pose: Pose | None = None
    quality: ImageQuality | None = None
    confidence: float | None = None
    face_occluded: Flag | None = None
    eye_direction: EyeDirection | None = None


class FaceDetection(_Model):
    timestamp: Millis | None = None
    face: FaceDetail | None = None


class CollectionFace(_Model):
    """FaceMatch.Face: a face of the collection searched."""

    face_id: str | None = None
    bounding_box: BoundingBox | None = None
    image_id: str | None = None
    external_image_id: str | None = None
    confidence: float | None = None
    index_faces_model_version: str | None = None
    user_id: str | None = None


class FaceMatch(_Model):
    similarity: float | None = None
    face: CollectionFace | None = None


class PersonDetail(_Model):
    index: BigInt | None = None
    bounding_box: BoundingBox | None = None
    face: FaceDetail | None = None


class PersonMatch(_Model):
    timestamp: Millis | None = None
    person: PersonDetail | None = None
    face_matches: list[FaceMatch] | None = None


class S3Object(_Model):
    bucket: str | None = None
    name: str | None = None
    version: str | None = None


class Video(_Model):
    s3_object: S3Object | None = None


class VideoMetadata(_Model):
    codec: str | None = None
    duration_millis: BigInt | None = None
    format: str | None = None
    frame_rate: float | None = None
    frame_height: BigInt | None = None
    frame_width: BigInt | None = None
    color_range: str | None = None


class _Page(_Model):
    job_status: str | None = None
    status_message: str | None = None
    job_tag: str | None = None
    video: Video | None = None
    video_metadata: VideoMetadata | None = None
    next_token: str | None = None
    job_id: str | None = None


class FaceDetectionPage(_Page):
    faces: list[FaceDetection] | None = None


class FaceSearchPage(_Page):
    persons: list[PersonMatch] | None = None


DETECTION = msgspec.json.Decoder(FaceDetectionPage)
SEARCH = msgspec.json.Decoder(FaceSearchPage)
