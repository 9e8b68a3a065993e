"""Deterministic synthetic Rekognition Video results, in the exact GetFaceDetection / GetFaceSearch shape.

Pure: no I/O and no global random state. The same job id, seed and arguments always give the same output,
so tests can assert on exact values and benchmarks replay the same workload.

The scene model is deliberately simple but shaped like real footage: a handful of people walk through the
frame, enter and leave, and are sampled every 200-500 ms (Rekognition samples frames, so several faces
share one Timestamp). Bounding boxes drift smoothly and landmarks follow the box and the head pose.
Numbers are float32 values widened to float64, which is what the service's JSON carries
(``99.99998474121094``), so consumers meet realistic long decimals.
"""

from __future__ import annotations

import math
import random
import re
import struct
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args

Api = Literal["GetFaceDetection", "GetFaceSearch"]
JobStatus = Literal["IN_PROGRESS", "SUCCEEDED", "FAILED"]
# A status no published model lists: what a later service version might answer (see FUTURE_VALUES).
FutureJobStatus = Literal["SUSPENDED"]
Attributes = Literal["DEFAULT", "ALL"]
Json = dict[str, Any]

API_NAMES: tuple[str, ...] = get_args(Api)
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
FUTURE_JOB_STATUSES: tuple[str, ...] = get_args(FutureJobStatus)
RESULTS_KEY: dict[str, str] = {"GetFaceDetection": "Faces", "GetFaceSearch": "Persons"}
JOB_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

# All 30 landmark types in the API's enum order, with a canonical position inside a frontal face box
# (x, y as fractions of the box). Pose then shifts and rotates them.
_LANDMARK_LAYOUT: dict[str, tuple[float, float]] = {
    "eyeLeft": (0.32, 0.40),
    "eyeRight": (0.68, 0.40),
    "nose": (0.50, 0.58),
    "mouthLeft": (0.36, 0.76),
    "mouthRight": (0.64, 0.76),
    "leftEyeBrowLeft": (0.20, 0.30),
    "leftEyeBrowRight": (0.42, 0.29),
    "leftEyeBrowUp": (0.31, 0.26),
    "rightEyeBrowLeft": (0.58, 0.29),
    "rightEyeBrowRight": (0.80, 0.30),
    "rightEyeBrowUp": (0.69, 0.26),
    "leftEyeLeft": (0.24, 0.40),
    "leftEyeRight": (0.40, 0.41),
    "leftEyeUp": (0.32, 0.38),
    "leftEyeDown": (0.32, 0.42),
    "rightEyeLeft": (0.60, 0.41),
    "rightEyeRight": (0.76, 0.40),
    "rightEyeUp": (0.68, 0.38),
    "rightEyeDown": (0.68, 0.42),
    "noseLeft": (0.43, 0.62),
    "noseRight": (0.57, 0.62),
    "mouthUp": (0.50, 0.72),
    "mouthDown": (0.50, 0.82),
    "leftPupil": (0.32, 0.40),
    "rightPupil": (0.68, 0.40),
    "upperJawlineLeft": (0.06, 0.42),
    "midJawlineLeft": (0.15, 0.76),
    "chinBottom": (0.50, 0.99),
    "midJawlineRight": (0.85, 0.76),
    "upperJawlineRight": (0.94, 0.42),
}
LANDMARK_TYPES: tuple[str, ...] = tuple(_LANDMARK_LAYOUT)
DEFAULT_LANDMARK_TYPES: tuple[str, ...] = ("eyeLeft", "eyeRight", "mouthLeft", "mouthRight", "nose")
# UNKNOWN is in the enum but the service reports these eight, each with a confidence.
EMOTION_TYPES: tuple[str, ...] = (
    "HAPPY",
    "SAD",
    "ANGRY",
    "CONFUSED",
    "DISGUSTED",
    "SURPRISED",
    "CALM",
    "FEAR",
)

# Enumeration values that no published model lists, by member: what a later service version might send
# (Rekognition has added landmark types and emotions before). See :func:`with_future_values`.
FUTURE_VALUES: dict[str, tuple[str, ...]] = {
    "landmark_type": ("earLeft", "earRight"),
    "emotion_type": ("CONTEMPT",),
    "gender": ("Nonbinary",),
    "color_range": ("HDR_PQ",),
    "job_status": FUTURE_JOB_STATUSES,
}

_F32 = struct.Struct("<f")
_BUCKET = "acme-video-ingest"


def _f32(value: float) -> float:
    """Round to float32 and widen again: the service serializes float32 fields this way."""
    result: float = _F32.unpack(_F32.pack(value))[0]
    return result


def _clamp(value: float, low: float, high: float) -> float:
    return low if value < low else high if value > high else value


def _rng(job_id: str, seed: int, salt: bytes = b"") -> random.Random:
    return random.Random(seed ^ zlib.crc32(job_id.encode() + salt))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@dataclass
class JobFixture:
    """Everything the emulator needs to answer Get* calls for one job.

    ``results`` holds the ``Faces`` (detection) or ``Persons`` (search) elements in API shape; ``error``,
    when set (e.g. ``"AccessDeniedException"``), makes every call for this job answer that modeled error.
    """

    job_id: str
    api: Api
    job_status: JobStatus | FutureJobStatus = "SUCCEEDED"
    status_message: str | None = None
    results: list[Json] = field(default_factory=list)
    video_metadata: Json = field(default_factory=dict)
    video: Json | None = None
    job_tag: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if not JOB_ID_RE.fullmatch(self.job_id):
            raise ValueError(f"JobId must match ^[a-zA-Z0-9-_]{{1,64}}$ (got {self.job_id!r})")
        if self.api not in API_NAMES:
            raise ValueError(f"api must be one of {API_NAMES} (got {self.api!r})")
        if self.job_status not in JOB_STATUSES + FUTURE_JOB_STATUSES:
            raise ValueError(f"job_status must be one of {JOB_STATUSES + FUTURE_JOB_STATUSES} "
                             f"(got {self.job_status!r})")

    @property
    def results_key(self) -> str:
        """``Faces`` or ``Persons``: the response member that carries the results."""
        return RESULTS_KEY[self.api]

    def to_dict(self) -> Json:
        """Plain JSON-able form; :meth:`from_dict` reverses it (the emulator's job-upload format).

        Shallow on purpose: the values are already JSON-shaped, and a deep copy of a large job is slow.
        """
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobFixture:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown JobFixture fields: {sorted(unknown)}")
        return cls(**dict(data))


def page_body(
    fixture: JobFixture,
    start: int,
    stop: int,
    next_token: str | None,
    *,
    results: Sequence[Json] | None = None,
) -> Json:
    """One Get* response page: members in the API's order, optional ones only when set.

    ``results`` overrides ``fixture.results`` (the emulator passes the INDEX-sorted view for search).
    VideoMetadata goes on every page, as the service documents.
    """
    items = fixture.results if results is None else results
    body: Json = {"JobStatus": fixture.job_status}
    if fixture.status_message is not None:
        body["StatusMessage"] = fixture.status_message
    if fixture.video_metadata:
        body["VideoMetadata"] = fixture.video_metadata
    if next_token is not None:
        body["NextToken"] = next_token
    body[fixture.results_key] = list(items[start:stop])
    body["JobId"] = fixture.job_id
    if fixture.video is not None:
        body["Video"] = fixture.video
    if fixture.job_tag is not None:
        body["JobTag"] = fixture.job_tag
    return body


# --- the scene -------------------------------------------------------------------------------------------

_Detail = Literal["DEFAULT", "ALL", "EVERYTHING"]


@dataclass
class _Track:
    """One person walking through the frame; state advances one sample at a time."""

    index: int
    left: float
    top: float
    width: float
    height: float
    vx_per_s: float
    vy_per_s: float
    yaw: float
    roll: float
    pitch: float
    base_yaw: float
    brightness: float
    sharpness: float
    visible: bool
    toggle_at_s: float
    age: int
    male: bool
    beard: bool
    mustache: bool
    eyeglasses: bool
    sunglasses: bool
    mood: str


class _Scene:
    def __init__(self, rng: random.Random, persons: int, aspect: float) -> None:
        if persons < 1:
            raise ValueError("persons must be >= 1")
        self.rng = rng
        self.aspect = aspect
        self.tracks = [self._new_track(i) for i in range(persons)]

    def _new_track(self, index: int) -> _Track:
        rng = self.rng
        width = rng.uniform(0.05, 0.16)
        height = min(0.6, width * self.aspect * rng.uniform(1.15, 1.3))
        male = rng.random() < 0.5
        base_yaw = rng.gauss(0.0, 18.0)
        visible = rng.random() < 0.75
        return _Track(
            index=index,
            left=rng.uniform(0.0, 1.0 - width),
            top=rng.uniform(0.05, 0.95 - height),
            width=width,
            height=height,
            vx_per_s=rng.uniform(-0.03, 0.03),
            vy_per_s=rng.uniform(-0.01, 0.01),
            yaw=base_yaw,
            roll=rng.gauss(0.0, 5.0),
            pitch=rng.gauss(0.0, 8.0),
            base_yaw=base_yaw,
            brightness=rng.uniform(40.0, 85.0),
            sharpness=rng.uniform(20.0, 90.0),
            visible=visible,
            toggle_at_s=rng.uniform(1.0, 12.0) if visible else rng.uniform(0.3, 4.0),
            age=rng.randint(19, 68),
            male=male,
            beard=male and rng.random() < 0.35,
            mustache=male and rng.random() < 0.3,
            eyeglasses=rng.random() < 0.3,
            sunglasses=rng.random() < 0.08,
            mood=rng.choice(("CALM", "CALM", "HAPPY", "HAPPY", "SURPRISED", "CONFUSED", "SAD")),
        )

    def step(self, t_s: float, dt_s: float) -> list[_Track]:
        """Advance every track to time ``t_s`` and return the visible ones, by person index."""
        rng = self.rng
        shown: list[_Track] = []
        for tr in self.tracks:
            if t_s >= tr.toggle_at_s:
                tr.visible = not tr.visible
                if tr.visible:  # re-entering: from a side of the frame, heading inwards
                    tr.left = rng.choice((0.0, 1.0 - tr.width))
                    tr.vx_per_s = abs(tr.vx_per_s) if tr.left == 0.0 else -abs(tr.vx_per_s)
                    tr.toggle_at_s = t_s + rng.uniform(3.0, 15.0)
                else:
                    tr.toggle_at_s = t_s + rng.uniform(0.5, 5.0)
            if not tr.visible:
                continue
            tr.left += tr.vx_per_s * dt_s + rng.gauss(0.0, 0.002)
            tr.top += tr.vy_per_s * dt_s + rng.gauss(0.0, 0.0015)
            if not 0.0 <= tr.left <= 1.0 - tr.width:
                tr.vx_per_s = -tr.vx_per_s
                tr.left = _clamp(tr.left, 0.0, 1.0 - tr.width)
            if not 0.0 <= tr.top <= 1.0 - tr.height:
                tr.vy_per_s = -tr.vy_per_s
                tr.top = _clamp(tr.top, 0.0, 1.0 - tr.height)
            # Mean-reverting head motion: people glance around but face mostly one way.
            tr.yaw = _clamp(tr.yaw + (tr.base_yaw - tr.yaw) * 0.15 + rng.gauss(0.0, 4.0), -85.0, 85.0)
            tr.roll = _clamp(tr.roll * 0.9 + rng.gauss(0.0, 1.5), -40.0, 40.0)
            tr.pitch = _clamp(tr.pitch * 0.9 + rng.gauss(0.0, 2.0), -50.0, 50.0)
            tr.brightness = _clamp(tr.brightness + rng.gauss(0.0, 1.0), 5.0, 98.0)
            tr.sharpness = _clamp(tr.sharpness + rng.gauss(0.0, 2.0), 4.0, 98.0)
            shown.append(tr)
        return shown


def _bbox(left: float, top: float, width: float, height: float) -> Json:
    return {"Width": _f32(width), "Height": _f32(height), "Left": _f32(left), "Top": _f32(top)}


def _flag(value: bool, confidence: float) -> Json:
    return {"Value": value, "Confidence": _f32(confidence)}


def _landmarks(rng: random.Random, tr: _Track, types: Sequence[str]) -> list[Json]:
    cx, cy = tr.left + tr.width / 2, tr.top + tr.height / 2
    yaw_shift = tr.yaw / 90.0 * 0.12
    pitch_shift = tr.pitch / 90.0 * 0.08
    cos_r, sin_r = math.cos(math.radians(tr.roll)), math.sin(math.radians(tr.roll))
    out: list[Json] = []
    for kind in types:
        rx, ry = _LANDMARK_LAYOUT[kind]
        dx = (rx - 0.5 + yaw_shift) * tr.width
        dy = (ry - 0.5 + pitch_shift) * tr.height
        x = cx + dx * cos_r - dy * sin_r + rng.gauss(0.0, 0.003 * tr.width)
        y = cy + dx * sin_r + dy * cos_r + rng.gauss(0.0, 0.003 * tr.height)
        out.append({"Type": kind, "X": _f32(x), "Y": _f32(y)})
    return out


def _emotions(rng: random.Random, mood: str) -> list[Json]:
    weights = {kind: rng.random() * 2.0 for kind in EMOTION_TYPES}
    weights[mood] += rng.uniform(30.0, 95.0)
    total = sum(weights.values())
    ranked = sorted(weights.items(), key=lambda kv: -kv[1])
    return [{"Type": kind, "Confidence": _f32(w / total * 100.0)} for kind, w in ranked]


def _face_detail(rng: random.Random, tr: _Track, detail: _Detail) -> Json:
    """A FaceDetail with members in the API's order; ``detail`` picks DEFAULT, ALL or every member."""
    face: Json = {"BoundingBox": _bbox(tr.left, tr.top, tr.width, tr.height)}
    if detail != "DEFAULT":
        low = max(0, tr.age - rng.randint(2, 6))
        smiling = tr.mood == "HAPPY" and rng.random() < 0.85
        face["AgeRange"] = {"Low": low, "High": low + rng.randint(5, 12)}
        face["Smile"] = _flag(smiling, rng.uniform(80.0, 99.9))
        face["Eyeglasses"] = _flag(tr.eyeglasses, rng.uniform(85.0, 99.99))
        face["Sunglasses"] = _flag(tr.sunglasses, rng.uniform(85.0, 99.99))
        face["Gender"] = {
            "Value": "Male" if tr.male else "Female",
            "Confidence": _f32(rng.uniform(88.0, 99.9)),
        }
        face["Beard"] = _flag(tr.beard, rng.uniform(70.0, 99.5))
        face["Mustache"] = _flag(tr.mustache, rng.uniform(70.0, 99.5))
        face["EyesOpen"] = _flag(rng.random() > 0.06, rng.uniform(75.0, 99.9))  # the odd blink
        face["MouthOpen"] = _flag(smiling and rng.random() < 0.4, rng.uniform(75.0, 99.9))
        face["Emotions"] = _emotions(rng, tr.mood)
        face["Landmarks"] = _landmarks(rng, tr, LANDMARK_TYPES)
    else:
        face["Landmarks"] = _landmarks(rng, tr, DEFAULT_LANDMARK_TYPES)
    face["Pose"] = {"Roll": _f32(tr.roll), "Yaw": _f32(tr.yaw), "Pitch": _f32(tr.pitch)}
    face["Quality"] = {"Brightness": _f32(tr.brightness), "Sharpness": _f32(tr.sharpness)}
    # Detection confidence drops a little for faces turned away from the camera.
    face["Confidence"] = _f32(_clamp(99.999 - abs(tr.yaw) / 90.0 * 4.0 - rng.random() * 0.4, 80.0, 100.0))
    if detail == "EVERYTHING":
        face["FaceOccluded"] = _flag(tr.sunglasses, rng.uniform(85.0, 99.9))
        face["EyeDirection"] = {
            "Yaw": _f32(rng.gauss(tr.yaw * 0.3, 5.0)),
            "Pitch": _f32(rng.gauss(tr.pitch * 0.3, 4.0)),
            "Confidence": _f32(rng.uniform(70.0, 99.5)),
        }
    return face


@dataclass
class _Video:
    fps: float
    width_px: int
    height_px: int
    step_frames: int


def _pick_video(rng: random.Random) -> _Video:
    fps = rng.choice((30000 / 1001, 25.0, 30.0, 24000 / 1001))
    width_px, height_px = rng.choice(((1920, 1080), (1280, 720), (3840, 2160)))
    # Rekognition samples frames, not every frame: one sample every 200-500 ms.
    step_frames = rng.randint(math.ceil(0.2 * fps), math.floor(0.5 * fps))
    return _Video(fps=fps, width_px=width_px, height_px=height_px, step_frames=step_frames)


def _timestamps_ms(samples: int, video: _Video, duration_ms: int | None) -> tuple[list[int], int]:
    """Timestamp of each sample number, and the video duration; compressed to fit ``duration_ms``."""
    frame_ms = 1000.0 / video.fps
    step_ms = video.step_frames * frame_ms
    if duration_ms is not None and samples and (samples - 1) * step_ms >= duration_ms:
        step_ms = (duration_ms - 1) / samples
        if step_ms < frame_ms:
            raise ValueError(
                f"{samples} samples do not fit in duration_ms={duration_ms}: raise it or lower the count"
            )
    stamps = [round(n * step_ms) for n in range(samples)]
    if duration_ms is None:
        duration_ms = (stamps[-1] if stamps else 0) + round(frame_ms * video.step_frames) + 1000
    return stamps, duration_ms


def _video_metadata(video: _Video, duration_ms: int, all_optional: bool) -> Json:
    meta: Json = {
        "Codec": "h264",
        "DurationMillis": duration_ms,
        "Format": "QuickTime / MOV",
        "FrameRate": _f32(video.fps),
        "FrameHeight": video.height_px,
        "FrameWidth": video.width_px,
    }
    if all_optional:
        meta["ColorRange"] = "LIMITED"
    return meta


def _video_location(rng: random.Random, job_id: str, all_optional: bool) -> Json:
    s3: Json = {"Bucket": _BUCKET, "Name": f"incoming/{rng.randint(2023, 2026)}/{job_id[:24]}.mp4"}
    if all_optional:
        s3["Version"] = "".join(rng.choice("0123456789abcdefghijklmnopqrstuvwxyzABCDEF") for _ in range(32))
    return {"S3Object": s3}


def _observe(
    rng: random.Random, video: _Video, persons: int, wanted: int, aspect: float
) -> list[tuple[int, _Track]]:
    """Run the scene until ``wanted`` observations exist: (sample number, track copy) in time order."""
    scene = _Scene(rng, persons, aspect)
    dt_s = video.step_frames / video.fps
    seen: list[tuple[int, _Track]] = []
    sample = 0
    while len(seen) < wanted:
        for tr in scene.step(sample * dt_s, dt_s):
            if len(seen) == wanted:
                break
            seen.append((sample, _Track(**tr.__dict__)))
        sample += 1
    return seen


def detection_job(
    job_id: str,
    *,
    faces: int = 600,
    attributes: Attributes = "ALL",
    persons: int = 5,
    seed: int = 0,
    all_optional: bool = False,
    duration_ms: int | None = None,
) -> JobFixture:
    """A SUCCEEDED GetFaceDetection job with exactly ``faces`` elements, sorted by Timestamp.

    ``all_optional`` also fills what the real service leaves out (FaceOccluded, EyeDirection, S3 Version,
    JobTag, StatusMessage, ColorRange), so consumers can be tested against every documented member.
    """
    if faces < 0:
        raise ValueError("faces must be >= 0")
    rng = _rng(job_id, seed)
    video = _pick_video(rng)
    aspect = video.width_px / video.height_px
    observed = _observe(rng, video, persons, faces, aspect)
    samples = observed[-1][0] + 1 if observed else 0
    stamps, duration_ms = _timestamps_ms(samples, video, duration_ms)
    detail: _Detail = "EVERYTHING" if all_optional else attributes
    results = [
        {"Timestamp": stamps[sample], "Face": _face_detail(rng, tr, detail)} for sample, tr in observed
    ]
    return JobFixture(
        job_id=job_id,
        api="GetFaceDetection",
        job_status="SUCCEEDED",
        status_message="Completed" if all_optional else None,
        results=results,
        video_metadata=_video_metadata(video, duration_ms, all_optional),
        video=_video_location(rng, job_id, all_optional),
        job_tag=f"ingest-{job_id[:16]}" if all_optional else None,
    )


def collection_faces(*, size: int = 8, seed: int = 0, all_optional: bool = False) -> list[Json]:
    """The stored faces of the synthetic collection: the ``Face`` objects that FaceMatches carry.

    Depends only on the seed (and ``all_optional``, which adds UserId and so yields other FaceIds): the same
    collection backs every search job with that seed, and a FaceId always carries the same metadata.
    """
    if size < 1:
        raise ValueError("collection size must be >= 1")
    rng = random.Random(seed ^ zlib.crc32(b"collection" + (b"+users" if all_optional else b"")))
    stored: list[Json] = []
    for n in range(size):
        width = rng.uniform(0.25, 0.5)
        face: Json = {
            "FaceId": _uuid(rng),
            "BoundingBox": _bbox(rng.uniform(0.1, 0.9 - width), rng.uniform(0.05, 0.3), width, width * 1.3),
            "ImageId": _uuid(rng),
            "ExternalImageId": f"employee-{n + 1:02d}",
            "Confidence": _f32(rng.uniform(99.5, 99.9999)),
            "IndexFacesModelVersion": "7.0",
        }
        if all_optional:
            face["UserId"] = f"user-{n + 1:02d}"
        stored.append(face)
    return stored


def _match_plan(
    rng: random.Random, persons: int, collection: list[Json]
) -> dict[int, list[tuple[Json, float]]]:
    """Which stored faces each person index matches, with a base similarity per match.

    One person matches nothing, one matches two stored faces (the same employee enrolled twice), the rest
    one each; with five or more people a second stranger appears.
    """
    order = list(range(persons))
    rng.shuffle(order)
    stock = list(collection)
    rng.shuffle(stock)
    nxt = 0

    def take() -> Json:
        nonlocal nxt
        face = stock[nxt % len(stock)]  # a small collection is reused: several people resemble one face
        nxt += 1
        return face

    plan: dict[int, list[tuple[Json, float]]] = {}
    for rank, index in enumerate(order):
        if rank == 0 or (rank == 4 and persons >= 5):
            plan[index] = []
        elif rank == 1:
            plan[index] = [(take(), rng.uniform(96.0, 99.6)), (take(), rng.uniform(82.0, 92.0))]
        else:
            plan[index] = [(take(), rng.uniform(88.0, 99.8))]
    return plan


def _body_box(tr: _Track) -> Json:
    width = min(1.0, tr.width * 2.8)
    height = min(1.0, tr.height * 4.5)
    left = _clamp(tr.left - (width - tr.width) / 2, 0.0, 1.0 - width)
    top = _clamp(tr.top - tr.height * 0.25, 0.0, 1.0 - height)
    return _bbox(left, top, width, height)


def search_job(
    job_id: str,
    *,
    persons_elements: int = 400,
    persons: int = 6,
    collection_size: int = 8,
    seed: int = 0,
    all_optional: bool = False,
    attributes: Attributes = "DEFAULT",
) -> JobFixture:
    """A SUCCEEDED GetFaceSearch job with exactly ``persons_elements`` PersonMatch elements, by Timestamp.

    Person indexes recur across timestamps; FaceMatches are sorted by Similarity, highest first.
    """
    if persons_elements < 0:
        raise ValueError("persons_elements must be >= 0")
    rng = _rng(job_id, seed)
    video = _pick_video(rng)
    aspect = video.width_px / video.height_px
    collection = collection_faces(size=collection_size, seed=seed, all_optional=all_optional)
    plan = _match_plan(rng, persons, collection)
    observed = _observe(rng, video, persons, persons_elements, aspect)
    samples = observed[-1][0] + 1 if observed else 0
    stamps, duration_ms = _timestamps_ms(samples, video, None)
    detail: _Detail = "EVERYTHING" if all_optional else attributes
    results: list[Json] = []
    for sample, tr in observed:
        scored = [
            (stored, _clamp(base + rng.gauss(0.0, 0.8), 70.0, 99.99)) for stored, base in plan[tr.index]
        ]
        scored.sort(key=lambda pair: -pair[1])
        results.append(
            {
                "Timestamp": stamps[sample],
                "Person": {
                    "Index": tr.index,
                    "BoundingBox": _body_box(tr),
                    "Face": _face_detail(rng, tr, detail),
                },
                "FaceMatches": [{"Similarity": _f32(sim), "Face": stored} for stored, sim in scored],
            }
        )
    return JobFixture(
        job_id=job_id,
        api="GetFaceSearch",
        job_status="SUCCEEDED",
        status_message="Completed" if all_optional else None,
        results=results,
        video_metadata=_video_metadata(video, duration_ms, all_optional),
        video=_video_location(rng, job_id, all_optional),
        job_tag=f"search-{job_id[:16]}" if all_optional else None,
    )


def with_future_values(fixture: JobFixture, *, every: int = 3,
                       values: Mapping[str, Sequence[str]] = FUTURE_VALUES) -> JobFixture:
    """A copy of ``fixture`` whose results carry enumeration values no published model lists.

    Every ``every``-th face (from the first) gains the FUTURE_VALUES landmark types (at its ears) after
    its Landmarks and a future emotion after its Emotions (when it has any), and its Gender (when it has
    one) takes a future value; the video's ColorRange becomes a future one. Everything else is as in
    ``fixture``, which is not changed. For tests and outside checks of a consumer's forward compatibility;
    ``values`` replaces FUTURE_VALUES (e.g. values unique to one test).
    """
    if every < 1:
        raise ValueError("every must be >= 1")
    search = fixture.api == "GetFaceSearch"
    results: list[Json] = []
    for n, element in enumerate(fixture.results):
        holder = element.get("Person") if search else element
        if n % every or not isinstance(holder, dict) or not isinstance(holder.get("Face"), dict):
            results.append(element)
            continue
        face = holder["Face"]
        ears = _ears(face.get("BoundingBox"), values["landmark_type"])
        face = {**face, "Landmarks": [*(face.get("Landmarks") or []), *ears]}
        if face.get("Emotions"):
            new = [{"Type": kind, "Confidence": _f32(0.25)} for kind in values["emotion_type"]]
            face["Emotions"] = [*face["Emotions"], *new]
        if isinstance(face.get("Gender"), dict):
            face["Gender"] = {**face["Gender"], "Value": values["gender"][0]}
        # New dicts along the path to the face: the fixture (and a collection shared by jobs) stay as they were.
        results.append({**element, "Person": {**holder, "Face": face}} if search else {**element, "Face": face})
    metadata = {**fixture.video_metadata, "ColorRange": values["color_range"][0]}
    return replace(fixture, results=results, video_metadata=metadata)


def _ears(box: Json | None, kinds: Sequence[str]) -> list[Json]:
    """Landmarks of ``kinds``, on the left and right edge of the face box by turns, half way down."""
    box = box or {"Width": 0.1, "Height": 0.1, "Left": 0.45, "Top": 0.45}
    return [{"Type": kind, "X": _f32(box["Left"] + box["Width"] * (i % 2)), "Y": _f32(box["Top"] + box["Height"] / 2)}
            for i, kind in enumerate(kinds)]


def in_progress_job(job_id: str, api: Api) -> JobFixture:
    """A job the service is still working on: no results yet."""
    return JobFixture(
        job_id=job_id,
        api=api,
        job_status="IN_PROGRESS",
        video=_video_location(_rng(job_id, 0), job_id, False),
    )


def failed_job(job_id: str, api: Api, message: str) -> JobFixture:
    """A job that ended FAILED with ``message`` as its StatusMessage."""
    return JobFixture(
        job_id=job_id,
        api=api,
        job_status="FAILED",
        status_message=message,
        video=_video_location(_rng(job_id, 0), job_id, False),
    )


def demo_jobs(seed: int = 0) -> list[JobFixture]:
    """A small realistic mix for the demo: multi-page detection, search, one running, one failed job."""
    return [
        detection_job("demo-det-lobby-0001", faces=2500, attributes="ALL", persons=5, seed=seed),
        detection_job(
            "demo-det-garage-0002", faces=2100, attributes="ALL", persons=4, seed=seed, all_optional=True
        ),
        search_job("demo-search-entrance-0003", persons_elements=1200, persons=6, seed=seed),
        search_job("demo-search-office-0004", persons_elements=450, persons=5, seed=seed),
        in_progress_job("demo-det-running-0005", "GetFaceDetection"),
        failed_job(
            "demo-search-failed-0006", "GetFaceSearch", "Unsupported codec: the video could not be decoded"
        ),
    ]
