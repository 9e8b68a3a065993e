"""The one-pass decoder: page bytes -> binary COPY streams, identical to the normalizer's rows encoded.

The fast path (msgspec Structs, precompiled row packers) must give byte for byte the streams of the slow
path (orjson, worker/normalize.py, column-by-column encoding) on every page the normalizer accepts, and
hand every other page to it, so that MalformedPage says exactly what it said before. PostgreSQL reads the
streams back as the values sent.
"""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from tests.test_hypothesis_pages import APIS, CONFORMING, WILD_WIRE, violating_pages, wire
from worker import pagecopy, pgcopy
from worker.db import schema
from worker.errors import MalformedPage, PermanentJobError
from worker.local import synth
from worker.messages import Api, parse_api
from worker.normalize import FACE_COLUMNS, normalize_page
from worker.pagecopy import PageCopy

PURE = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _both(raw: bytes, api: Api, ingest_id: int = 7, seq_start: int = 0) -> tuple[Any, Any]:
    """(fast path's result or exception, slow path's result or exception); the fast path may decline (None)."""
    def run(path: Any) -> Any:
        try:
            return path(raw, api, ingest_id, seq_start, False)
        except MalformedPage as exc:
            return ("MalformedPage", str(exc))
        except pagecopy.DECLINED:
            return None
    return run(pagecopy._fast), run(pagecopy._slow)


def _same(fast: Any, slow: Any) -> None:
    assert fast is not None, "the fast path declined a page it should decode"
    f_meta, f_copy, f_unknown = fast
    s_meta, s_copy, s_unknown = slow
    assert f_meta == s_meta and f_unknown == s_unknown
    if s_copy is None:
        assert f_copy is None
        return
    assert f_copy.fast and not s_copy.fast
    s_copy.fast = True
    assert f_copy == s_copy


def _page(fixture: synth.JobFixture, start: int = 0, stop: int | None = None) -> bytes:
    stop = len(fixture.results) if stop is None else stop
    return orjson.dumps(synth.page_body(fixture, start, stop, "next"))


@pytest.mark.parametrize("fixture", [
    pytest.param(synth.detection_job("pc-all", faces=300, attributes="ALL"), id="detection ALL"),
    pytest.param(synth.detection_job("pc-default", faces=300, attributes="DEFAULT"), id="detection DEFAULT"),
    pytest.param(synth.detection_job("pc-opt", faces=300, attributes="ALL", all_optional=True), id="all optional"),
    pytest.param(synth.search_job("pc-search", persons_elements=300, all_optional=True), id="search"),
    pytest.param(synth.with_future_values(synth.detection_job("pc-future", faces=120, attributes="ALL")),
                 id="future values"),
    pytest.param(synth.with_future_values(synth.search_job("pc-future-s", persons_elements=120, all_optional=True)),
                 id="future values, search"),
])
def test_fast_path_gives_the_normalizers_streams_byte_for_byte(fixture: synth.JobFixture) -> None:
    api = parse_api(fixture.api)
    fast, slow = _both(_page(fixture), api, ingest_id=2**31 - 1, seq_start=12_345)
    _same(fast, slow)
    _, copy, unknown = fast
    assert copy.elements == len(fixture.results) and copy.faces.startswith(pgcopy.HEADER)
    assert copy.faces.endswith(pgcopy.TRAILER)
    if "future" in fixture.job_id:
        assert set(unknown) >= {"landmark_type", "color_range"}


def test_a_person_without_a_face_and_missing_coordinates_take_the_fast_path() -> None:
    page = {"JobStatus": "SUCCEEDED", "Persons": [
        {"Timestamp": 0},
        {"Timestamp": 5, "Person": {"Index": 3}},
        {"Timestamp": 9, "Person": {"Index": 4, "Face": {
            "Landmarks": [{"Type": "nose", "X": 0.5}, {"Type": "eyeLeft", "Y": 1}],
            "Emotions": [{"Type": "HAPPY"}, {"Type": "SAD", "Confidence": 3}],
            "Gender": {"Value": "Female"}}},
         "FaceMatches": [{"Similarity": 99, "Face": {"FaceId": "a"}}, {"Face": {"FaceId": "a", "UserId": "u"}}]},
    ]}
    fast, slow = _both(orjson.dumps(page), Api.FACE_SEARCH)
    _same(fast, slow)
    copy = fast[1]
    assert (copy.landmark_rows, copy.emotion_rows, copy.match_rows, list(copy.collection_faces)) == (1, 1, 2, ["a"])


@PURE
@given(api=APIS, data=st.data(), seq_start=st.integers(0, 10**6))
def test_conforming_pages_take_the_fast_path_and_match_the_normalizer(
        api: Api, data: st.DataObject, seq_start: int) -> None:
    raw = orjson.dumps(wire(data.draw(CONFORMING.page(api))))
    fast, slow = _both(raw, api, seq_start=seq_start)
    _same(fast, slow)


@PURE
@given(api=APIS, data=st.data())
def test_wild_pages_give_what_the_normalizer_gives(api: Api, data: st.DataObject) -> None:
    raw = orjson.dumps(data.draw(WILD_WIRE.page(api)))
    fast, slow = _both(raw, api)
    event("fast path" if fast is not None else "handed to the normalizer")
    if fast is not None:
        _same(fast, slow)
    # Whichever path decodes it, decode() gives the normalizer's answer.
    try:
        result: Any = pagecopy.decode(raw, api, 7, 0)
    except MalformedPage as exc:
        result = ("MalformedPage", str(exc))
    if isinstance(slow, tuple) and slow and slow[0] == "MalformedPage":
        assert result == slow
    else:
        assert result[0] == slow[0] and result[2] == slow[2]
        assert (result[1] is None) == (slow[1] is None)
        if slow[1] is not None:
            slow[1].fast = result[1].fast
            assert result[1] == slow[1]


@PURE
@given(violating_pages(wire=True))
def test_violating_pages_are_refused_with_the_normalizers_reason(case: tuple[Api, dict[str, Any], str]) -> None:
    api, page, what = case
    note(what)
    page.setdefault("JobStatus", "SUCCEEDED")
    if page["JobStatus"] in ("IN_PROGRESS", "FAILED"):
        page["JobStatus"] = "SUCCEEDED"
    raw = orjson.dumps(page)
    with pytest.raises(MalformedPage) as expected:
        normalize_page(orjson.loads(raw), api, 7, 0)
    with pytest.raises(MalformedPage) as got:
        pagecopy.decode(raw, api, 7, 0)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize(("raw", "why"), [
    (b'{"JobStatus": "SUCCEEDED", "Faces": [], "Unknown": "\xff"}', "not JSON"),
    (b'{"JobStatus": "SUCCEEDED", "JobTag": "a\\u0000b", "Faces": []}', "JobTag: expected string without NUL"),
    (b'{"JobStatus": "SUCCEEDED", "Faces": [{"Timestamp": 1, "Face": {"Gender": {"Value": "x\\u0000"}}}]}',
     "Gender.Value"),
    (b'{"JobStatus": "SUCCEEDED", "Faces": [{"Timestamp": 1, "Face": {"Landmarks": [{"X": 1}]}}]}',
     r"Landmarks\[0\]\.Type"),
    (b'{"JobStatus": "SUCCEEDED", "Faces": [{"Timestamp": 1, "Face": {"AgeRange": {"Low": 9223372036854775808}}}]}',
     "AgeRange.Low: expected integer"),
    (b'{"JobStatus": "SUCCEEDED", "Faces": [{"Timestamp": 1, "Face": {"Confidence": 1e400}}]}', "not JSON"),
    (b'{"JobStatus": "SUCCEEDED", "Persons": [{"Timestamp": 1, "FaceMatches": [{"Face": {"FaceId": ""}}]}]}',
     "FaceId: expected non-empty string"),
    (b'[1, 2]', "page: expected object"),
])
def test_pages_the_fast_path_declines_fail_as_the_normalizer_says(raw: bytes, why: str) -> None:
    api = Api.FACE_SEARCH if b"Persons" in raw else Api.FACE_DETECTION
    with pytest.raises(pagecopy._Slow):
        try:
            pagecopy._fast(raw, api, 7, 0, False)
        except Exception as exc:
            if isinstance(exc, pagecopy._Slow):
                raise
            raise pagecopy._Slow from exc  # msgspec or UTF-8 errors: declined the same way
    with pytest.raises(MalformedPage, match=why):
        pagecopy.decode(raw, api, 7, 0)


def test_a_number_beyond_a_double_in_an_unknown_member_is_tolerated() -> None:
    """The documented difference: msgspec skips members it does not know without converting their numbers."""
    raw = b'{"JobStatus": "SUCCEEDED", "Faces": [{"Timestamp": 1, "NewMember": 1e400}]}'
    _, copy, _ = pagecopy.decode(raw, Api.FACE_DETECTION, 7, 0)
    assert copy is not None and copy.elements == 1 and copy.fast


def test_values_no_column_can_hold_are_unstorable_not_a_crash() -> None:
    # Rows built by hand (the normalizer would refuse both values): an int beyond a bigint, a lone surrogate.
    page = {"Faces": [{"Timestamp": 1, "Face": {"Gender": {"Value": "Male"}}}]}
    rows = normalize_page(page, Api.FACE_DETECTION, 7, 0)
    good = rows.faces[0]
    for column, bad in (("age_low", 2**70), ("gender_value", "\ud800")):
        i = FACE_COLUMNS.index(column)
        rows.faces[0] = (*good[:i], bad, *good[i + 1:])
        with pytest.raises(PermanentJobError, match="cannot be stored") as err:
            pagecopy.from_rows(rows)
        assert err.value.code == "UnstorableValue"


def test_types_cache_stays_bounded() -> None:
    faces = [{"Timestamp": i, "Face": {"Landmarks": [{"Type": f"new{i}", "X": 0.1, "Y": 0.2}]}} for i in range(1500)]
    raw = orjson.dumps({"JobStatus": "SUCCEEDED", "Faces": faces})
    _, copy, unknown = pagecopy.decode(raw, Api.FACE_DETECTION, 7, 0)
    assert copy is not None and copy.fast and copy.landmark_elements == 1500
    assert len(pagecopy._types_cache) <= pagecopy._TYPES_CACHE_MAX
    assert sum(unknown["landmark_type"].values()) == 1500 and len(unknown["landmark_type"]) == 33  # 32 + OTHER


def test_copy_columns_are_the_tables_physical_order() -> None:
    for table, columns, kinds in (
            ("faces", pagecopy.FACE_COPY_COLUMNS, pagecopy.FACE_COPY_KINDS),
            ("landmarks", pagecopy.LANDMARK_COPY_COLUMNS, pagecopy.LANDMARK_COPY_KINDS),
            ("emotions", pagecopy.EMOTION_COPY_COLUMNS, pagecopy.EMOTION_COPY_KINDS),
            ("face_matches", pagecopy.MATCH_COPY_COLUMNS, pagecopy.MATCH_COPY_KINDS),
            ("collection_faces", pagecopy.COLLECTION_FACE_COPY_COLUMNS, pagecopy.COLLECTION_FACE_COPY_KINDS)):
        table_obj = schema.metadata.tables[f"rekognition.{table}"]
        assert columns == schema.columns(table_obj), table
        assert len(kinds) == len(columns), table
    assert set(pagecopy.DETECTION_FACE_COPY_COLUMNS) < set(pagecopy.FACE_COPY_COLUMNS)
    assert len(pagecopy.DETECTION_FACE_COPY_KINDS) == len(pagecopy.DETECTION_FACE_COPY_COLUMNS)


def test_the_decoding_modules_import_no_database_driver_and_no_event_loop() -> None:
    # They run in the decoding process: every module it imports is start-up time.
    code = ("import sys, worker.pagecodec; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'sqlalchemy', 'asyncpg', 'aiobotocore', 'asyncio'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# --- PostgreSQL reads the streams back as the values sent -----------------------------------------------


async def _copy_in(db: asyncpg.Connection, copy: PageCopy) -> None:
    await db.execute("INSERT INTO ingests (ingest_id, job_id) VALUES (7, 'pc-round-trip')")
    for table, columns, data in (
            ("faces", copy.face_columns, copy.faces),
            ("landmarks", pagecopy.LANDMARK_COPY_COLUMNS, copy.landmarks),
            ("emotions", pagecopy.EMOTION_COPY_COLUMNS, copy.emotions),
            ("face_matches", pagecopy.MATCH_COPY_COLUMNS, copy.matches),
            ("collection_faces", pagecopy.COLLECTION_FACE_COPY_COLUMNS,
             pgcopy.stream(copy.collection_faces.values()))):
        if data:
            await db.copy_to_table(table, source=memoryview(data), columns=columns, format="binary")


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and (float(a) == float(b) or (math.isnan(a) and math.isnan(b)))
    return bool(a == b)


async def test_postgresql_reads_back_every_value_sent(db: asyncpg.Connection) -> None:
    fixture = synth.with_future_values(synth.search_job("pc-pg", persons_elements=200, all_optional=True))
    raw = _page(fixture)
    _, copy, _ = pagecopy.decode(raw, Api.FACE_SEARCH, 7, 0)
    assert copy is not None and copy.fast
    await _copy_in(db, copy)
    rows = normalize_page(orjson.loads(raw), Api.FACE_SEARCH, 7, 0)
    for table, columns, expected in (
            ("faces", FACE_COLUMNS, rows.faces),
            ("landmarks", ("ingest_id", "face_seq", "types", "xs", "ys"), rows.landmarks),
            ("emotions", ("ingest_id", "face_seq", "types", "confidences"), rows.emotions),
            ("face_matches", ("ingest_id", "face_seq", "ordinal", "face_id", "similarity"), rows.matches)):
        order = "face_seq, ordinal" if table == "face_matches" else "face_seq"
        stored = await db.fetch(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}")
        assert len(stored) == len(expected) > 0, table
        for got, want in zip(stored, expected, strict=True):
            assert all(_equal(g, w) for g, w in zip(tuple(got), want, strict=True)), (table, tuple(got), want)
    faces = {r["face_id"]: tuple(r) for r in await db.fetch(
        "SELECT ingest_id, face_id, image_id, external_image_id, user_id, index_faces_model_version, "
        "bbox_width, bbox_height, bbox_left, bbox_top, confidence FROM collection_faces")}
    assert faces.keys() == rows.collection_faces.keys()
    for face_id, want in rows.collection_faces.items():
        assert all(_equal(g, w) for g, w in zip(faces[face_id], want, strict=True))
