"""One pass from a result page's bytes to what PostgreSQL is sent: binary COPY streams, one per table.

The fast path decodes the page with msgspec straight into typed Structs (worker/pagemodel.py) and packs
each row with one precompiled ``struct`` call: no dict per JSON object, no row tuple, no per-element
encoding later. It proves what the model leaves open (NUL characters, key lengths, required members,
element counts, enumeration values) as it goes, and hands any page it cannot prove well-typed to the old
normalizer (worker/normalize.py), whose rows are then encoded column by column: the same bytes, or the
same MalformedPage naming the path. So the normalizer stays the one definition of what is stored, and
tests/test_pagecopy.py holds the two paths to identical output.

Enumeration values this version does not know are stored as sent and counted in ``unknown``, in the
normalizer's order and with its bounds. Members this version does not know are skipped (the raw archive
keeps them): msgspec checks their JSON syntax but not their numbers' range, so a page whose unknown member
holds a number beyond a double is stored, where orjson would refuse the whole page.

The streams list columns in the tables' physical order (``*_COPY_COLUMNS``, held to worker/db/schema.py
by tests/test_schema.py), so the writer names them in ``COPY table (columns) FROM STDIN (FORMAT binary)``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import msgspec
import orjson

from worker import pgcopy
from worker.errors import MalformedPage, PermanentJobError
from worker.messages import Api
from worker.normalize import (
    COLLECTION_FACE_COLUMNS,
    COLOR_RANGES,
    EMOTION_COLUMNS,
    EMOTION_TYPES,
    FACE_COLUMNS,
    GENDERS,
    JOB_STATUSES,
    LANDMARK_COLUMNS,
    LANDMARK_TYPES,
    MATCH_COLUMNS,
    MAX_ENUM_CHARS,
    MAX_UNKNOWN_PER_PAGE,
    OTHER,
    JobMeta,
    PageRows,
    UnknownValues,
    normalize_page,
    parse_meta,
)
from worker.pagemodel import (
    DETECTION,
    SEARCH,
    BoundingBox,
    FaceDetail,
    FaceMatch,
    Flag,
    Gender,
    _Page,
)
from worker.pgcopy import BOOL, FLOAT8, FLOAT8_ARRAY, INT2, INT4, INT8, TEXT, TEXT_ARRAY, RowPacker

# --- the streams' columns, in each table's physical order ------------------------------------------

FACE_COPY_COLUMNS: tuple[str, ...] = (
    "ingest_id", "face_seq", "timestamp_ms", "person_index", "age_low", "age_high",
    "person_bbox_width", "person_bbox_height", "person_bbox_left", "person_bbox_top",
    "bbox_width", "bbox_height", "bbox_left", "bbox_top", "confidence",
    "smile_confidence", "eyeglasses_confidence", "sunglasses_confidence", "gender_confidence",
    "beard_confidence", "mustache_confidence", "eyes_open_confidence", "mouth_open_confidence",
    "pose_roll", "pose_yaw", "pose_pitch", "quality_brightness", "quality_sharpness",
    "face_occluded_confidence", "eye_direction_yaw", "eye_direction_pitch", "eye_direction_confidence",
    "has_face", "smile_value", "eyeglasses_value", "sunglasses_value", "beard_value", "mustache_value",
    "eyes_open_value", "mouth_open_value", "face_occluded_value", "gender_value",
)
_FACE_FIXED = INT4 * 2 + INT8 * 4 + FLOAT8 * 26 + BOOL * 9  # every column but gender_value (text, last)
FACE_COPY_KINDS: tuple[str, ...] = (*_FACE_FIXED, TEXT)
# A face detection element has no Person: its faces stream leaves those columns out (NULL by default), so
# a full-attribute face is a row without NULLs, packed by one precompiled format.
_PERSON_COLUMNS = frozenset({"person_index", "person_bbox_width", "person_bbox_height", "person_bbox_left",
                             "person_bbox_top"})
DETECTION_FACE_COPY_COLUMNS = tuple(c for c in FACE_COPY_COLUMNS if c not in _PERSON_COLUMNS)
DETECTION_FACE_COPY_KINDS = tuple(k for c, k in zip(FACE_COPY_COLUMNS, FACE_COPY_KINDS, strict=True)
                                  if c not in _PERSON_COLUMNS)
LANDMARK_COPY_COLUMNS = ("ingest_id", "face_seq", "xs", "ys", "types")
LANDMARK_COPY_KINDS = (INT4, INT4, FLOAT8_ARRAY, FLOAT8_ARRAY, TEXT_ARRAY)
EMOTION_COPY_COLUMNS = ("ingest_id", "face_seq", "confidences", "types")
EMOTION_COPY_KINDS = (INT4, INT4, FLOAT8_ARRAY, TEXT_ARRAY)
MATCH_COPY_COLUMNS = ("ingest_id", "face_seq", "similarity", "ordinal", "face_id")
MATCH_COPY_KINDS = (INT4, INT4, FLOAT8, INT2, TEXT)
COLLECTION_FACE_COPY_COLUMNS = (
    "ingest_id", "bbox_width", "bbox_height", "bbox_left", "bbox_top", "confidence",
    "face_id", "image_id", "external_image_id", "user_id", "index_faces_model_version",
)
COLLECTION_FACE_COPY_KINDS = (INT4, *(FLOAT8,) * 5, *(TEXT,) * 5)

# The normalizer's limits (worker/normalize.py), proven here before a row is packed.
_MAX_SEQ = 2**31 - 1
_MAX_CHILDREN = 2**15
_MAX_KEY_CHARS = 512


@dataclass(slots=True)
class PageCopy:
    """One page's rows as complete binary COPY streams (b"" for a table with none).

    ``face_columns``: the columns of the faces stream (a detection page's leaves the person columns out).
    ``collection_faces``: FaceId -> its encoded tuple (the first on the page), for the writer, which keeps
    the first row of a FaceId across pages and streams only the new ones. ``fast``: the msgspec path made
    it (False: the normalizer did).
    """

    elements: int
    face_columns: tuple[str, ...] = FACE_COPY_COLUMNS
    faces: bytes = b""
    landmarks: bytes = b""
    emotions: bytes = b""
    matches: bytes = b""
    collection_faces: dict[str, bytes] = field(default_factory=dict)
    landmark_rows: int = 0
    landmark_elements: int = 0
    emotion_rows: int = 0
    emotion_elements: int = 0
    match_rows: int = 0
    unknown: UnknownValues = field(default_factory=dict)
    fast: bool = True

    @property
    def row_count(self) -> int:
        return (self.elements + self.landmark_rows + self.emotion_rows + self.match_rows
                + len(self.collection_faces))


class NotJson(MalformedPage):
    """The page's bytes are not JSON at all."""


class _Slow(Exception):
    """The fast path cannot prove this page well-typed."""


# What the fast path raises for a page it cannot prove well-typed.
DECLINED = (_Slow, msgspec.DecodeError, UnicodeDecodeError, struct.error, OverflowError)


def decode(raw: bytes | memoryview, api: Api, ingest_id: int, seq_start: int, *, any_status: bool = False,
           ascii_only: bool | None = None) -> tuple[JobMeta, PageCopy | None, UnknownValues]:
    """The page's job-level members, its rows as COPY streams and the enumeration values this version does
    not know; MalformedPage for anything the normalizer refuses (NotJson for bytes that are not JSON).

    The rows are None for a page without results (see :func:`has_results`), unless ``any_status``.
    ``ascii_only``: whether ``raw`` is all ASCII, when the caller knows (None: found out here).
    """
    try:
        return _fast(raw, api, ingest_id, seq_start, any_status, ascii_only)
    except DECLINED:
        return _slow(raw, api, ingest_id, seq_start, any_status)


def has_results(meta: JobMeta) -> bool:
    """SUCCEEDED, or a status newer than this version (stored as sent): the page's results are rows. A job
    still running, failed, or without a status has none to store."""
    return meta.job_status not in (None, "IN_PROGRESS", "FAILED")


def _slow(raw: bytes | memoryview, api: Api, ingest_id: int, seq_start: int,
          any_status: bool) -> tuple[JobMeta, PageCopy | None, UnknownValues]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise NotJson(f"malformed result page: not JSON: {exc}") from None
    unknown: UnknownValues = {}
    meta = parse_meta(body, unknown)
    if not (any_status or has_results(meta)):
        return meta, None, unknown
    rows = normalize_page(body, api, ingest_id, seq_start)
    del body
    # normalize_page parses the job-level members again and reports their values with the rows'.
    return meta, from_rows(rows, api), rows.unknown


# --- the slow path's encoder: the normalizer's tuples, column by column -----------------------------


def _order(copy_columns: Sequence[str], row_columns: Sequence[str]) -> tuple[int, ...]:
    return tuple(row_columns.index(c) for c in copy_columns)


_FACE_ORDER = _order(FACE_COPY_COLUMNS, FACE_COLUMNS)
_DETECTION_FACE_ORDER = _order(DETECTION_FACE_COPY_COLUMNS, FACE_COLUMNS)
_LANDMARK_ORDER = _order(LANDMARK_COPY_COLUMNS, LANDMARK_COLUMNS)
_EMOTION_ORDER = _order(EMOTION_COPY_COLUMNS, EMOTION_COLUMNS)
_MATCH_ORDER = _order(MATCH_COPY_COLUMNS, MATCH_COLUMNS)
_COLLECTION_FACE_ORDER = _order(COLLECTION_FACE_COPY_COLUMNS, COLLECTION_FACE_COLUMNS)


def _stream(kinds: Sequence[str], order: Sequence[int], rows: Sequence[Sequence[Any]]) -> bytes:
    if not rows:
        return b""
    return pgcopy.encode_rows(kinds, ([row[i] for i in order] for row in rows))


def from_rows(rows: PageRows, api: Api | None = None) -> PageCopy:
    """The normalizer's rows as COPY streams (all columns, unless ``api`` says face detection). A value no
    column can hold (a surrogate in text, an integer beyond its column) is UnstorableValue: the page's
    fault, the same on every try."""
    detection = api is Api.FACE_DETECTION
    try:
        return PageCopy(
            elements=rows.elements,
            face_columns=DETECTION_FACE_COPY_COLUMNS if detection else FACE_COPY_COLUMNS,
            faces=(_stream(DETECTION_FACE_COPY_KINDS, _DETECTION_FACE_ORDER, rows.faces) if detection
                   else _stream(FACE_COPY_KINDS, _FACE_ORDER, rows.faces)),
            landmarks=_stream(LANDMARK_COPY_KINDS, _LANDMARK_ORDER, rows.landmarks),
            emotions=_stream(EMOTION_COPY_KINDS, _EMOTION_ORDER, rows.emotions),
            matches=_stream(MATCH_COPY_KINDS, _MATCH_ORDER, rows.matches),
            collection_faces={
                face_id: pgcopy.encode_row(COLLECTION_FACE_COPY_KINDS, [row[i] for i in _COLLECTION_FACE_ORDER])
                for face_id, row in rows.collection_faces.items()},
            landmark_rows=len(rows.landmarks), landmark_elements=rows.landmark_elements,
            emotion_rows=len(rows.emotions), emotion_elements=rows.emotion_elements,
            match_rows=len(rows.matches), unknown=rows.unknown, fast=False,
        )
    except (OverflowError, ValueError, UnicodeEncodeError, struct.error, TypeError) as exc:
        raise PermanentJobError(f"rows of this page cannot be stored: {type(exc).__name__}: {str(exc)[:300]}",
                                code="UnstorableValue") from exc


# --- the fast path ------------------------------------------------------------------------------------

_FACE = RowPacker(_FACE_FIXED, fields=len(FACE_COPY_COLUMNS))
_DETECTION_FACE = RowPacker("".join(DETECTION_FACE_COPY_KINDS[:-1]), fields=len(DETECTION_FACE_COPY_COLUMNS))
_MATCH = RowPacker(INT4 + INT4 + FLOAT8 + INT2, fields=len(MATCH_COPY_COLUMNS))
_COLLECTION_FACE = RowPacker(INT4 + FLOAT8 * 5, fields=len(COLLECTION_FACE_COPY_COLUMNS))
_NO_BOX = BoundingBox()
_NO_FLAG = Flag()
_NO_GENDER = Gender()
_GENDER_FIELD: dict[str | None, bytes] = {g: pgcopy.text_field(g) for g in GENDERS} | {None: pgcopy.NULL}
_type, _x, _y, _confidence = attrgetter("type"), attrgetter("x"), attrgetter("y"), attrgetter("confidence")
_NO_UNKNOWN: tuple[str, ...] = ()
# Encoded text[] fields by the tuple of types they hold (a page repeats a handful of them) and the values
# among them this version does not know (counted at every use). Bounded: a hostile page of distinct
# tuples must not grow the decoding process without end.
_TYPES_CACHE_MAX = 1024
_types_cache: dict[tuple[str, ...], tuple[bytes, tuple[str, ...]]] = {}
# Compiled packers of a landmark (emotion) row by element count: (struct, argument template, first x/y slot).
_landmark_packers: dict[int, tuple[struct.Struct, list[Any], int, int]] = {}
_emotion_packers: dict[int, tuple[struct.Struct, list[Any], int]] = {}
_ARRAY_HEAD = (1, 0, pgcopy.FLOAT8_OID)  # ndim, no NULL, element type; then length and lower bound


def _landmark_packer(n: int) -> tuple[struct.Struct, list[Any], int, int]:
    packer = _landmark_packers.get(n)
    if packer is None:
        # Field count, ingest_id, face_seq, then xs and ys as float8[] without NULLs; types are appended.
        array = [20 + 12 * n, *_ARRAY_HEAD, n, 1, *[8, None] * n]
        template = [5, 4, None, 4, None, *array, *array]
        fmt = ">hiiii" + ("iiiiii" + "id" * n) * 2
        packer = _landmark_packers[n] = (struct.Struct(fmt), template, 11, 11 + 6 + 2 * n)
    return packer


def _emotion_packer(n: int) -> tuple[struct.Struct, list[Any], int]:
    packer = _emotion_packers.get(n)
    if packer is None:
        template = [4, 4, None, 4, None, 20 + 12 * n, *_ARRAY_HEAD, n, 1, *[8, None] * n]
        packer = _emotion_packers[n] = (struct.Struct(">hiiii" + "iiiiii" + "id" * n), template, 11)
    return packer


def _count(unknown: UnknownValues, member: str, value: str) -> None:
    """As normalize._new_value counts: per value, up to MAX_UNKNOWN_PER_PAGE distinct ones, then OTHER."""
    seen = unknown.setdefault(member, {})
    key = value if value in seen or len(seen) < MAX_UNKNOWN_PER_PAGE else OTHER
    seen[key] = seen.get(key, 0) + 1


def _new_value_ok(value: Any) -> bool:
    """An enumeration value this version does not know can be stored as sent (normalize._new_value)."""
    return type(value) is str and len(value) <= MAX_ENUM_CHARS and "\x00" not in value


def _text(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise _Slow
    return value


def _enum(value: str | None, known: frozenset[str], member: str, unknown: UnknownValues) -> str | None:
    if value is None or value in known:
        return value
    if not _new_value_ok(value):
        raise _Slow
    _count(unknown, member, value)
    return value


def _types_field(types: tuple[str, ...], known: frozenset[str], member: str, unknown: UnknownValues) -> bytes:
    cached = _types_cache.get(types)
    if cached is None:
        new = tuple(t for t in types if t not in known)
        if any(not _new_value_ok(t) for t in new):  # a missing Type (None) included
            raise _Slow
        cached = (pgcopy.text_array(types), new or _NO_UNKNOWN)
        if len(_types_cache) < _TYPES_CACHE_MAX:
            _types_cache[types] = cached
    for value in cached[1]:
        _count(unknown, member, value)
    return cached[0]


def _meta(page: _Page, unknown: UnknownValues) -> JobMeta:
    s3 = page.video.s3_object if page.video is not None else None
    vm = page.video_metadata
    return JobMeta(
        job_status=_enum(page.job_status, JOB_STATUSES, "job_status", unknown),
        status_message=_text(page.status_message),
        job_tag=_text(page.job_tag),
        video_bucket=_text(s3.bucket) if s3 is not None else None,
        video_name=_text(s3.name) if s3 is not None else None,
        video_version=_text(s3.version) if s3 is not None else None,
        codec=_text(vm.codec) if vm is not None else None,
        duration_ms=vm.duration_millis if vm is not None else None,
        video_format=_text(vm.format) if vm is not None else None,
        frame_rate=vm.frame_rate if vm is not None else None,
        frame_height=vm.frame_height if vm is not None else None,
        frame_width=vm.frame_width if vm is not None else None,
        color_range=_enum(vm.color_range, COLOR_RANGES, "color_range", unknown) if vm is not None else None,
        next_token=_text(page.next_token),
        response_job_id=_text(page.job_id),
    )


class _Encoder:
    """The streams of one page, filled element by element."""

    def __init__(self, ingest_id: int, unknown: UnknownValues, search: bool) -> None:
        self.ingest_id = ingest_id
        self.search = search
        self.unknown = unknown
        self.faces: list[bytes] = [pgcopy.HEADER]
        self.landmarks: list[bytes] = [pgcopy.HEADER]
        self.emotions: list[bytes] = [pgcopy.HEADER]
        self.matches: list[bytes] = [pgcopy.HEADER]
        self.collection_faces: dict[str, bytes] = {}
        self.landmark_rows = self.landmark_elements = self.emotion_rows = self.emotion_elements = self.match_rows = 0

    def face(self, seq: int, ts: int, index: int | None, pbox: BoundingBox, f: FaceDetail | None) -> None:
        """The faces row of one element, and its landmarks and emotions rows."""
        person = [index, pbox.width, pbox.height, pbox.left, pbox.top] if self.search else []
        packer = _FACE if self.search else _DETECTION_FACE
        if f is None:
            self.faces.append(packer.pack([self.ingest_id, seq, ts, *person[:1], None, None, *person[1:],
                                           *(None,) * 22, False, *(None,) * 8]))
            self.faces.append(pgcopy.NULL)
            return
        bb = f.bounding_box or _NO_BOX
        age = f.age_range
        sm, eg, sg, gd = f.smile or _NO_FLAG, f.eyeglasses or _NO_FLAG, f.sunglasses or _NO_FLAG, f.gender or _NO_GENDER
        be, mu, eo, mo = f.beard or _NO_FLAG, f.mustache or _NO_FLAG, f.eyes_open or _NO_FLAG, f.mouth_open or _NO_FLAG
        oc = f.face_occluded or _NO_FLAG
        pose, quality, eyes = f.pose, f.quality, f.eye_direction
        self.faces.append(packer.pack([
            self.ingest_id, seq, ts, *person[:1],
            age.low if age is not None else None, age.high if age is not None else None,
            *person[1:], bb.width, bb.height, bb.left, bb.top, f.confidence,
            sm.confidence, eg.confidence, sg.confidence, gd.confidence,
            be.confidence, mu.confidence, eo.confidence, mo.confidence,
            *((pose.roll, pose.yaw, pose.pitch) if pose is not None else (None, None, None)),
            *((quality.brightness, quality.sharpness) if quality is not None else (None, None)),
            oc.confidence,
            *((eyes.yaw, eyes.pitch, eyes.confidence) if eyes is not None else (None, None, None)),
            True, sm.value, eg.value, sg.value, be.value, mu.value, eo.value, mo.value, oc.value]))
        gender = _GENDER_FIELD.get(gd.value)
        if gender is None:
            gender = pgcopy.text_field(_enum(gd.value, GENDERS, "gender", self.unknown))
        self.faces.append(gender)
        if f.landmarks:
            self._landmarks(seq, f.landmarks)
        if f.emotions:
            self._emotions(seq, f.emotions)

    def _landmarks(self, seq: int, items: list[Any]) -> None:
        n = len(items)
        if n > _MAX_CHILDREN:
            raise _Slow
        types = _types_field(tuple(map(_type, items)), LANDMARK_TYPES, "landmark_type", self.unknown)
        xs, ys = list(map(_x, items)), list(map(_y, items))
        packer, template, x0, y0 = _landmark_packer(n)
        args = template.copy()
        args[2], args[4] = self.ingest_id, seq
        args[x0 + 1:x0 + 2 * n:2] = xs
        args[y0 + 1:y0 + 2 * n:2] = ys
        try:
            row = packer.pack(*args)
        except struct.error:  # a coordinate missing (None is no double): an array with NULLs, field by field
            row = pgcopy.encode_row(LANDMARK_COPY_KINDS[:4], (self.ingest_id, seq, xs, ys),
                                    fields=len(LANDMARK_COPY_KINDS))
        self.landmarks.append(row)
        self.landmarks.append(types)
        self.landmark_rows += 1
        self.landmark_elements += n

    def _emotions(self, seq: int, items: list[Any]) -> None:
        n = len(items)
        if n > _MAX_CHILDREN:
            raise _Slow
        types = _types_field(tuple(map(_type, items)), EMOTION_TYPES, "emotion_type", self.unknown)
        confidences = list(map(_confidence, items))
        packer, template, c0 = _emotion_packer(n)
        args = template.copy()
        args[2], args[4] = self.ingest_id, seq
        args[c0 + 1:c0 + 2 * n:2] = confidences
        try:
            row = packer.pack(*args)
        except struct.error:  # a confidence missing: an array with NULLs, field by field
            row = pgcopy.encode_row(EMOTION_COPY_KINDS[:3], (self.ingest_id, seq, confidences),
                                    fields=len(EMOTION_COPY_KINDS))
        self.emotions.append(row)
        self.emotions.append(types)
        self.emotion_rows += 1
        self.emotion_elements += n

    def matches_of(self, seq: int, matches: list[FaceMatch]) -> None:
        if len(matches) > _MAX_CHILDREN:
            raise _Slow
        for ordinal, match in enumerate(matches):
            face = match.face
            if face is None:
                raise _Slow
            face_id = face.face_id
            if not face_id or len(face_id) > _MAX_KEY_CHARS or "\x00" in face_id:
                raise _Slow
            # Every occurrence is checked (the normalizer does); the first on the page is kept.
            image_id, user_id = _text(face.image_id), _text(face.user_id)
            model_version, external = _text(face.index_faces_model_version), _text(face.external_image_id)
            if external is not None and len(external) > _MAX_KEY_CHARS:
                raise _Slow
            encoded_id = pgcopy.text_field(face_id)
            self.matches.append(_MATCH.pack([self.ingest_id, seq, match.similarity, ordinal]))
            self.matches.append(encoded_id)
            self.match_rows += 1
            if face_id not in self.collection_faces:
                bb = face.bounding_box or _NO_BOX
                self.collection_faces[face_id] = b"".join((
                    _COLLECTION_FACE.pack([self.ingest_id, bb.width, bb.height, bb.left, bb.top, face.confidence]),
                    encoded_id, pgcopy.text_field(image_id), pgcopy.text_field(external), pgcopy.text_field(user_id),
                    pgcopy.text_field(model_version)))

    def page(self, elements: int) -> PageCopy:
        def done(parts: list[bytes], rows: int) -> bytes:
            if not rows:
                return b""
            parts.append(pgcopy.TRAILER)
            return b"".join(parts)

        return PageCopy(
            elements=elements,
            face_columns=FACE_COPY_COLUMNS if self.search else DETECTION_FACE_COPY_COLUMNS,
            faces=done(self.faces, elements),
            landmarks=done(self.landmarks, self.landmark_rows),
            emotions=done(self.emotions, self.emotion_rows),
            matches=done(self.matches, self.match_rows),
            collection_faces=self.collection_faces,
            landmark_rows=self.landmark_rows, landmark_elements=self.landmark_elements,
            emotion_rows=self.emotion_rows, emotion_elements=self.emotion_elements,
            match_rows=self.match_rows, unknown=self.unknown,
        )


def _fast(raw: bytes | memoryview, api: Api, ingest_id: int, seq_start: int, any_status: bool,
          ascii_only: bool | None = None) -> tuple[JobMeta, PageCopy | None, UnknownValues]:
    # msgspec skips unknown members without checking their UTF-8; orjson (the normalizer's decoder) refuses
    # a page with invalid UTF-8 anywhere. A page of ASCII (every real one, almost) needs no look.
    if ascii_only is None:
        ascii_only = (raw if isinstance(raw, bytes) else bytes(raw)).isascii()
    if not ascii_only:
        bytes(raw).decode()
    search = api is Api.FACE_SEARCH
    page: Any = (SEARCH if search else DETECTION).decode(raw)
    unknown: UnknownValues = {}
    meta = _meta(page, unknown)
    if not (any_status or has_results(meta)):
        return meta, None, unknown
    elements: list[Any] = (page.persons if search else page.faces) or []
    if seq_start + len(elements) > _MAX_SEQ + 1:
        raise _Slow
    enc = _Encoder(ingest_id, unknown, search)
    for n, element in enumerate(elements):
        ts = element.timestamp
        if ts is None:
            raise _Slow
        if search:
            person = element.person
            if element.face_matches:
                enc.matches_of(seq_start + n, element.face_matches)
            if person is None:
                enc.face(seq_start + n, ts, None, _NO_BOX, None)
            else:
                enc.face(seq_start + n, ts, person.index, person.bounding_box or _NO_BOX, person.face)
        else:
            enc.face(seq_start + n, ts, None, _NO_BOX, element.face)
    return meta, enc.page(len(elements)), unknown
