"""Pure normalization: one Get* result page in, row batches out. No I/O.

Every value of the response syntax lands in a column; anything that violates the response
model (a missing Timestamp, a string where a number belongs) raises MalformedPage naming the path,
so the job fails with a clear reason and stores nothing. So does anything PostgreSQL would refuse
(a NUL character in text, an integer beyond its column, a FaceId too long for a btree index): a
value the database rejects at COPY time would look like a database fault and be retried forever,
so it is caught here, where it is a property of the page. An enumeration value this version does
not know (Rekognition adds landmark types, emotions and other values over time) is no violation:
it is stored as sent and reported in ``PageRows.unknown`` for the worker process to count and log.
Rows are plain tuples in the column order of the tables below, ready for COPY.
"""

from __future__ import annotations

import reprlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.errors import MalformedPage
from worker.messages import Api

LANDMARK_TYPES = frozenset({
    "eyeLeft", "eyeRight", "nose", "mouthLeft", "mouthRight", "leftEyeBrowLeft", "leftEyeBrowRight",
    "leftEyeBrowUp", "rightEyeBrowLeft", "rightEyeBrowRight", "rightEyeBrowUp", "leftEyeLeft",
    "leftEyeRight", "leftEyeUp", "leftEyeDown", "rightEyeLeft", "rightEyeRight", "rightEyeUp",
    "rightEyeDown", "noseLeft", "noseRight", "mouthUp", "mouthDown", "leftPupil", "rightPupil",
    "upperJawlineLeft", "midJawlineLeft", "chinBottom", "midJawlineRight", "upperJawlineRight",
})
EMOTION_TYPES = frozenset({"HAPPY", "SAD", "ANGRY", "CONFUSED", "DISGUSTED", "SURPRISED", "CALM", "UNKNOWN", "FEAR"})
GENDERS = frozenset({"Male", "Female"})
COLOR_RANGES = frozenset({"FULL", "LIMITED"})
JOB_STATUSES = frozenset({"IN_PROGRESS", "SUCCEEDED", "FAILED"})

# Values outside the sets above, by member ("landmark_type", "emotion_type", "gender", "color_range",
# "job_status") -> value -> occurrences on the page.
UnknownValues = dict[str, dict[str, int]]
# An enumeration value is a short name; a longer one is not a value from the service.
MAX_ENUM_CHARS = 256
# Distinct unknown values carried back per member and page; further ones are counted under OTHER, so
# a hostile page of 30,000 distinct "landmark types" cannot flood the parent's metrics and log.
MAX_UNKNOWN_PER_PAGE = 32
OTHER = "(other)"

# Enumeration value -> one shared str object. A page carries 30,000 landmark type strings, each a
# fresh object from the JSON decoder; storing the shared one instead lets pickle send each type once
# per page (rows cross a process boundary, see pagecodec) and halves the cost of moving landmarks.
_LANDMARK_TYPE = {t: t for t in LANDMARK_TYPES}
_EMOTION_TYPE = {t: t for t in EMOTION_TYPES}

# The boolean attributes of FaceDetail, in column order: (response member, column prefix).
_BOOL_ATTRS = (
    ("Smile", "smile"), ("Eyeglasses", "eyeglasses"), ("Sunglasses", "sunglasses"),
    ("Beard", "beard"), ("Mustache", "mustache"), ("EyesOpen", "eyes_open"), ("MouthOpen", "mouth_open"),
)

FACE_COLUMNS: tuple[str, ...] = (
    "ingest_id", "face_seq", "timestamp_ms", "person_index",
    "person_bbox_width", "person_bbox_height", "person_bbox_left", "person_bbox_top",
    "has_face", "bbox_width", "bbox_height", "bbox_left", "bbox_top", "confidence",
    "age_low", "age_high",
    "smile_value", "smile_confidence", "eyeglasses_value", "eyeglasses_confidence",
    "sunglasses_value", "sunglasses_confidence", "gender_value", "gender_confidence",
    "beard_value", "beard_confidence", "mustache_value", "mustache_confidence",
    "eyes_open_value", "eyes_open_confidence", "mouth_open_value", "mouth_open_confidence",
    "pose_roll", "pose_yaw", "pose_pitch", "quality_brightness", "quality_sharpness",
    "face_occluded_value", "face_occluded_confidence",
    "eye_direction_yaw", "eye_direction_pitch", "eye_direction_confidence",
)
# One row per face with its landmarks (emotions) as arrays: element i of each array is Landmarks[i]
# (Emotions[i]). Rows per landmark cost a tuple header, an index entry and a WAL record each.
LANDMARK_COLUMNS = ("ingest_id", "face_seq", "types", "xs", "ys")
EMOTION_COLUMNS = ("ingest_id", "face_seq", "types", "confidences")
MATCH_COLUMNS = ("ingest_id", "face_seq", "ordinal", "face_id", "similarity")
COLLECTION_FACE_COLUMNS = (
    "ingest_id", "face_id", "image_id", "external_image_id", "user_id", "index_faces_model_version",
    "bbox_width", "bbox_height", "bbox_left", "bbox_top", "confidence",
)

_NO_FACE = (None,) * (len(FACE_COLUMNS) - 9)
_NO_BOX = (None, None, None, None)
_MAX_BIGINT = 2**63 - 1
# face_seq is an integer column; face_matches are keyed by a smallint ordinal (0..32767), and landmarks and
# emotions (array elements) are held to the same bound: one face holds at most 2**15 of each.
_MAX_SEQ = 2**31 - 1
_MAX_CHILDREN = 2**15
# An int in a double precision column must convert to a float (JSON ints beyond ~1.8e308 cannot).
_MAX_FLOAT_INT = int(sys.float_info.max)
# FaceId and ExternalImageId are indexed; a btree entry must stay under ~2700 bytes. 512 characters
# (at most 2048 bytes of UTF-8) is twice anything the service model allows (UUIDs, <= 255).
_MAX_KEY_CHARS = 512

# Error messages quote the offending value: bounded in length and nesting, so a hostile page (a
# 10 MB string, a list nested 1000 deep) cannot make building the message itself slow or crash.
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel = 3
_QUOTE.maxstring = 60
_QUOTE.maxother = 60
_QUOTE.maxlong = 40


@dataclass(frozen=True, slots=True)
class JobMeta:
    """The job-level members of a page (repeated on every page)."""

    job_status: str | None
    status_message: str | None
    job_tag: str | None
    video_bucket: str | None
    video_name: str | None
    video_version: str | None
    codec: str | None
    duration_ms: int | None
    video_format: str | None
    frame_rate: float | None
    frame_height: int | None
    frame_width: int | None
    color_range: str | None
    next_token: str | None
    response_job_id: str | None


@dataclass(slots=True)
class PageRows:
    """Rows produced from one page."""

    meta: JobMeta
    elements: int = 0
    faces: list[tuple[Any, ...]] = field(default_factory=list)
    # One row per face that has any, with arrays; *_elements count the landmarks (emotions) themselves.
    landmarks: list[tuple[Any, ...]] = field(default_factory=list)
    emotions: list[tuple[Any, ...]] = field(default_factory=list)
    landmark_elements: int = 0
    emotion_elements: int = 0
    matches: list[tuple[Any, ...]] = field(default_factory=list)
    # FaceId -> row: a collection face appears once per job however often it matched.
    collection_faces: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    # Enumeration values this version does not know, stored as sent (job-level ones included).
    unknown: UnknownValues = field(default_factory=dict)

    @property
    def row_count(self) -> int:
        return (len(self.faces) + len(self.landmarks) + len(self.emotions) + len(self.matches)
                + len(self.collection_faces))


def _bad(path: str, expected: str, value: object) -> MalformedPage:
    if type(value) is int and value.bit_length() > 128:
        shown = f"an integer of {value.bit_length()} bits"
    else:
        try:
            shown = _QUOTE.repr(value)
        except ValueError:  # an int too long to print, inside a container (sys.get_int_max_str_digits)
            shown = f"a {type(value).__name__}"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return MalformedPage(f"malformed result page: {path}: expected {expected}, got {shown}")


def _obj(value: object, path: str) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if type(value) is not dict:
        raise _bad(path, "object", value)
    return value


def _num(value: object, path: str) -> float | int | None:
    t = type(value)
    if t is float or value is None:
        return value  # type: ignore[return-value]
    if t is int and -_MAX_FLOAT_INT <= value <= _MAX_FLOAT_INT:  # type: ignore[operator]
        return value  # type: ignore[return-value]
    raise _bad(path, "number", value)


def _int(value: object, path: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not -_MAX_BIGINT <= value <= _MAX_BIGINT:
        raise _bad(path, "integer", value)
    return value


def _str(value: object, path: str) -> str | None:
    # PostgreSQL text cannot hold NUL; JSON can ("\u0000").
    if value is None or (type(value) is str and "\x00" not in value):
        return value
    raise _bad(path, "string without NUL characters", value)


def _key(value: object, path: str) -> str | None:
    """A string that is also an index key: bounded length (see _MAX_KEY_CHARS)."""
    if value is None or (type(value) is str and len(value) <= _MAX_KEY_CHARS and "\x00" not in value):
        return value
    raise _bad(path, f"string of at most {_MAX_KEY_CHARS} characters without NUL", value)


def _bool(value: object, path: str) -> bool | None:
    if value is None or type(value) is bool:
        return value
    raise _bad(path, "boolean", value)


def _enum(value: object, allowed: frozenset[str], member: str, unknown: UnknownValues | None,
          path: str) -> str | None:
    if value is None:
        return None
    if type(value) is str and value in allowed:
        return value
    return _new_value(value, member, unknown, path)


def _new_value(value: object, member: str, unknown: UnknownValues | None, path: str) -> str:
    """A value of enumeration ``member`` that this version does not know: kept as sent, counted in ``unknown``.

    Only its type and what PostgreSQL can store are checked (a string, no NUL, at most MAX_ENUM_CHARS).
    """
    if type(value) is not str or len(value) > MAX_ENUM_CHARS or "\x00" in value:
        raise _bad(path, f"string of at most {MAX_ENUM_CHARS} characters without NUL", value)
    if unknown is not None:
        seen = unknown.setdefault(member, {})
        key = value if value in seen or len(seen) < MAX_UNKNOWN_PER_PAGE else OTHER
        seen[key] = seen.get(key, 0) + 1
    return value


def _box(value: object, path: str) -> tuple[Any, Any, Any, Any]:
    box = _obj(value, path)
    if box is None:
        return _NO_BOX
    return (
        _num(box.get("Width"), path + ".Width"),
        _num(box.get("Height"), path + ".Height"),
        _num(box.get("Left"), path + ".Left"),
        _num(box.get("Top"), path + ".Top"),
    )


def _list(value: object, path: str) -> list[Any]:
    if value is None:
        return []
    if type(value) is not list:
        raise _bad(path, "list", value)
    return value


def _too_many(path: str, items: list[Any]) -> MalformedPage:
    """Landmarks, emotions and face matches are keyed by a smallint ordinal."""
    return _bad(path, f"at most {_MAX_CHILDREN} elements", f"{len(items)} elements")


def parse_meta(page: Mapping[str, Any], unknown: UnknownValues | None = None) -> JobMeta:
    """The job-level members of a page, validated; values it does not know are added to ``unknown``."""
    if type(page) is not dict:
        raise _bad("page", "object", page)
    video = _obj(page.get("Video"), "Video") or {}
    s3 = _obj(video.get("S3Object"), "Video.S3Object") or {}
    vm = _obj(page.get("VideoMetadata"), "VideoMetadata") or {}
    return JobMeta(
        job_status=_enum(page.get("JobStatus"), JOB_STATUSES, "job_status", unknown, "JobStatus"),
        status_message=_str(page.get("StatusMessage"), "StatusMessage"),
        job_tag=_str(page.get("JobTag"), "JobTag"),
        video_bucket=_str(s3.get("Bucket"), "Video.S3Object.Bucket"),
        video_name=_str(s3.get("Name"), "Video.S3Object.Name"),
        video_version=_str(s3.get("Version"), "Video.S3Object.Version"),
        codec=_str(vm.get("Codec"), "VideoMetadata.Codec"),
        duration_ms=_int(vm.get("DurationMillis"), "VideoMetadata.DurationMillis"),
        video_format=_str(vm.get("Format"), "VideoMetadata.Format"),
        frame_rate=_num(vm.get("FrameRate"), "VideoMetadata.FrameRate"),
        frame_height=_int(vm.get("FrameHeight"), "VideoMetadata.FrameHeight"),
        frame_width=_int(vm.get("FrameWidth"), "VideoMetadata.FrameWidth"),
        color_range=_enum(vm.get("ColorRange"), COLOR_RANGES, "color_range", unknown, "VideoMetadata.ColorRange"),
        next_token=_str(page.get("NextToken"), "NextToken"),
        response_job_id=_str(page.get("JobId"), "JobId"),
    )


_EMPTY: Mapping[str, Any] = {}
# FaceDetail's attribute members in column order (value, confidence each), Gender fourth.
_ATTR_MEMBERS = ("Smile", "Eyeglasses", "Sunglasses", "Gender", "Beard", "Mustache", "EyesOpen", "MouthOpen")


def _face_columns_fast(face: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """:func:`_face_columns` for the common case, without building a path per member: every member of its
    type (objects, floats, booleans, bounded ints, a known gender). None when anything is not: the full
    checks then run, member by member, and name what is wrong."""
    g = face.get
    bb, age, pose, quality, occluded, eyes = (g("BoundingBox"), g("AgeRange"), g("Pose"), g("Quality"),
                                              g("FaceOccluded"), g("EyeDirection"))
    attrs = [g(m) for m in _ATTR_MEMBERS]
    for o in (bb, age, pose, quality, occluded, eyes, *attrs):
        if o is not None and type(o) is not dict:
            return None
    bb, age, pose, quality, occluded, eyes = (bb or _EMPTY, age or _EMPTY, pose or _EMPTY, quality or _EMPTY,
                                              occluded or _EMPTY, eyes or _EMPTY)
    values = [a.get("Value") if a is not None else None for a in attrs]
    confidences = [a.get("Confidence") if a is not None else None for a in attrs]
    gender = values.pop(3)
    if not (gender is None or (type(gender) is str and gender in GENDERS)):
        return None
    bools = [*values, occluded.get("Value")]
    if any(v is not None and type(v) is not bool for v in bools):
        return None
    floats = [bb.get("Width"), bb.get("Height"), bb.get("Left"), bb.get("Top"), g("Confidence"), *confidences,
              pose.get("Roll"), pose.get("Yaw"), pose.get("Pitch"), quality.get("Brightness"),
              quality.get("Sharpness"), occluded.get("Confidence"), eyes.get("Yaw"), eyes.get("Pitch"),
              eyes.get("Confidence")]
    if any(v is not None and type(v) is not float for v in floats):
        return None
    low, high = age.get("Low"), age.get("High")
    for v in (low, high):
        if v is not None and (type(v) is not int or not -_MAX_BIGINT <= v <= _MAX_BIGINT):
            return None
    c = confidences
    return (True, *floats[:5], low, high,
            values[0], c[0], values[1], c[1], values[2], c[2], gender, c[3],
            values[3], c[4], values[4], c[5], values[5], c[6], values[6], c[7],
            *floats[13:18], bools[7], floats[18], *floats[19:22])


def _face_columns(face: Mapping[str, Any], path: str, unknown: UnknownValues) -> tuple[Any, ...]:
    """Columns has_face .. eye_direction_confidence of FACE_COLUMNS for one FaceDetail."""
    fast = _face_columns_fast(face)
    if fast is not None:
        return fast
    cols: list[Any] = [True, *_box(face.get("BoundingBox"), path + ".BoundingBox"),
                       _num(face.get("Confidence"), path + ".Confidence")]
    age = _obj(face.get("AgeRange"), path + ".AgeRange") or {}
    cols.append(_int(age.get("Low"), path + ".AgeRange.Low"))
    cols.append(_int(age.get("High"), path + ".AgeRange.High"))
    for member, _ in _BOOL_ATTRS[:3]:
        attr = _obj(face.get(member), f"{path}.{member}") or {}
        cols.append(_bool(attr.get("Value"), f"{path}.{member}.Value"))
        cols.append(_num(attr.get("Confidence"), f"{path}.{member}.Confidence"))
    gender = _obj(face.get("Gender"), path + ".Gender") or {}
    cols.append(_enum(gender.get("Value"), GENDERS, "gender", unknown, path + ".Gender.Value"))
    cols.append(_num(gender.get("Confidence"), path + ".Gender.Confidence"))
    for member, _ in _BOOL_ATTRS[3:]:
        attr = _obj(face.get(member), f"{path}.{member}") or {}
        cols.append(_bool(attr.get("Value"), f"{path}.{member}.Value"))
        cols.append(_num(attr.get("Confidence"), f"{path}.{member}.Confidence"))
    pose = _obj(face.get("Pose"), path + ".Pose") or {}
    cols.append(_num(pose.get("Roll"), path + ".Pose.Roll"))
    cols.append(_num(pose.get("Yaw"), path + ".Pose.Yaw"))
    cols.append(_num(pose.get("Pitch"), path + ".Pose.Pitch"))
    quality = _obj(face.get("Quality"), path + ".Quality") or {}
    cols.append(_num(quality.get("Brightness"), path + ".Quality.Brightness"))
    cols.append(_num(quality.get("Sharpness"), path + ".Quality.Sharpness"))
    occluded = _obj(face.get("FaceOccluded"), path + ".FaceOccluded") or {}
    cols.append(_bool(occluded.get("Value"), path + ".FaceOccluded.Value"))
    cols.append(_num(occluded.get("Confidence"), path + ".FaceOccluded.Confidence"))
    eyes = _obj(face.get("EyeDirection"), path + ".EyeDirection") or {}
    cols.append(_num(eyes.get("Yaw"), path + ".EyeDirection.Yaw"))
    cols.append(_num(eyes.get("Pitch"), path + ".EyeDirection.Pitch"))
    cols.append(_num(eyes.get("Confidence"), path + ".EyeDirection.Confidence"))
    return tuple(cols)


def _face_children(rows: PageRows, ingest_id: int, seq: int, face: Mapping[str, Any], path: str) -> None:
    items = _list(face.get("Landmarks"), path + ".Landmarks")
    if len(items) > _MAX_CHILDREN:
        raise _too_many(path + ".Landmarks", items)
    types: list[str] = []
    xs: list[Any] = []
    ys: list[Any] = []
    for i, lm in enumerate(items):
        if type(lm) is not dict:
            raise _bad(f"{path}.Landmarks[{i}]", "object", lm)
        raw = lm.get("Type")
        kind = _LANDMARK_TYPE.get(raw) if type(raw) is str else None
        if kind is None:  # the rare path: a value this version does not know, or not a string
            kind = _new_value(raw, "landmark_type", rows.unknown, f"{path}.Landmarks[{i}].Type")
        x, y = lm.get("X"), lm.get("Y")
        if not ((type(x) is float or x is None) and (type(y) is float or y is None)):
            # The rare path (ints, wrong types): full checks, one at a time.
            x = _num(x, f"{path}.Landmarks[{i}].X")
            y = _num(y, f"{path}.Landmarks[{i}].Y")
        types.append(kind)
        xs.append(x)
        ys.append(y)
    if types:
        rows.landmarks.append((ingest_id, seq, types, xs, ys))
        rows.landmark_elements += len(types)
    items = _list(face.get("Emotions"), path + ".Emotions")
    if len(items) > _MAX_CHILDREN:
        raise _too_many(path + ".Emotions", items)
    types = []
    confidences: list[Any] = []
    for i, em in enumerate(items):
        if type(em) is not dict:
            raise _bad(f"{path}.Emotions[{i}]", "object", em)
        raw = em.get("Type")
        kind = _EMOTION_TYPE.get(raw) if type(raw) is str else None
        if kind is None:
            kind = _new_value(raw, "emotion_type", rows.unknown, f"{path}.Emotions[{i}].Type")
        types.append(kind)
        confidences.append(_num(em.get("Confidence"), f"{path}.Emotions[{i}].Confidence"))
    if types:
        rows.emotions.append((ingest_id, seq, types, confidences))
        rows.emotion_elements += len(types)


def _matches(rows: PageRows, ingest_id: int, seq: int, matches: list[Any], path: str) -> None:
    if len(matches) > _MAX_CHILDREN:
        raise _too_many(path, matches)
    for i, match in enumerate(matches):
        mpath = f"{path}[{i}]"
        if type(match) is not dict:
            raise _bad(mpath, "object", match)
        face = _obj(match.get("Face"), mpath + ".Face")
        if face is None:
            raise _bad(mpath + ".Face", "object with FaceId", None)
        face_id = face.get("FaceId")
        if type(face_id) is not str or not face_id or len(face_id) > _MAX_KEY_CHARS or "\x00" in face_id:
            raise _bad(mpath + ".Face.FaceId", f"non-empty string of at most {_MAX_KEY_CHARS} characters without NUL",
                       face_id)
        rows.matches.append((ingest_id, seq, i, face_id, _num(match.get("Similarity"), mpath + ".Similarity")))
        # Every occurrence is validated; the first in the stream wins, as the store keeps the first
        # row of a FaceId across pages.
        rows.collection_faces.setdefault(face_id, (
            ingest_id, face_id,
            _str(face.get("ImageId"), mpath + ".Face.ImageId"),
            _key(face.get("ExternalImageId"), mpath + ".Face.ExternalImageId"),
            _str(face.get("UserId"), mpath + ".Face.UserId"),
            _str(face.get("IndexFacesModelVersion"), mpath + ".Face.IndexFacesModelVersion"),
            *_box(face.get("BoundingBox"), mpath + ".Face.BoundingBox"),
            _num(face.get("Confidence"), mpath + ".Face.Confidence"),
        ))


def normalize_page(page: Mapping[str, Any], api: Api, ingest_id: int, seq_start: int) -> PageRows:
    """Rows for one page. ``seq_start`` is the stream position of the page's first element."""
    unknown: UnknownValues = {}
    rows = PageRows(meta=parse_meta(page, unknown), unknown=unknown)
    key = api.results_key
    elements = _list(page.get(key), key)
    if seq_start + len(elements) > _MAX_SEQ + 1:
        raise _bad(key, f"at most {_MAX_SEQ + 1} elements in a job", f"{seq_start + len(elements)} elements")
    search = api is Api.FACE_SEARCH
    faces = rows.faces
    for n, element in enumerate(elements):
        seq = seq_start + n
        path = f"{key}[{seq}]"
        if type(element) is not dict:
            raise _bad(path, "object", element)
        ts = element.get("Timestamp")
        if type(ts) is not int or not 0 <= ts <= _MAX_BIGINT:
            raise _bad(path + ".Timestamp", "non-negative integer (milliseconds)", ts)
        if search:
            person = _obj(element.get("Person"), path + ".Person") or {}
            index = _int(person.get("Index"), path + ".Person.Index")
            pbox = _box(person.get("BoundingBox"), path + ".Person.BoundingBox")
            face = _obj(person.get("Face"), path + ".Person.Face")
            fpath = path + ".Person.Face"
            _matches(rows, ingest_id, seq, _list(element.get("FaceMatches"), path + ".FaceMatches"),
                     path + ".FaceMatches")
        else:
            index, pbox = None, _NO_BOX
            face = _obj(element.get("Face"), path + ".Face")
            fpath = path + ".Face"
        if face is None:
            faces.append((ingest_id, seq, ts, index, *pbox, False, *_NO_FACE))
            continue
        faces.append((ingest_id, seq, ts, index, *pbox, *_face_columns(face, fpath, unknown)))
        _face_children(rows, ingest_id, seq, face, fpath)
    rows.elements = len(elements)
    return rows
