"""Property-based tests of the normalizer against pages generated from botocore's Rekognition model.

Strategies are built by walking the output shapes of GetFaceDetection and GetFaceSearch in botocore's
service model, so a member the service adds shows up here without anyone writing it down. Three kinds
of page:
- ``wild``: anything the model's types allow, any subset of members, empty lists, unicode and very
  long strings, extreme numbers, unknown extra fields, now and then an enum value outside the model
  (of any length), a NUL character or an integer beyond 64 bits;
- ``conforming``: what the service can really send (and what the worker promises to store), including
  now and then an enum value no published model lists (the service adds values: they are stored as sent);
- ``violating``: a conforming page with one member of the wrong type (an enum value too long or with a
  NUL counts), or a Timestamp removed.

Properties: the normalizer returns rows or raises MalformedPage, nothing else; every row it returns can
be stored in its column (types, ranges, NUL, enum labels, read from the migrated schema itself);
conforming pages give exactly one faces row per element and one child row per child element;
violating pages are always refused. Then pages go through the emulator, the ingest and PostgreSQL:
the job ends ingested with every element stored, or failed with a recorded reason and nothing stored.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, cast

import asyncpg
import botocore.session
import orjson
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from tests.helpers import count_rows
from worker.config import Settings
from worker.errors import MalformedPage
from worker.local import synth
from worker.local.synth import JobFixture, page_body
from worker.messages import Api, JobRef
from worker.normalize import (
    COLLECTION_FACE_COLUMNS,
    EMOTION_COLUMNS,
    FACE_COLUMNS,
    LANDMARK_COLUMNS,
    MATCH_COLUMNS,
    PageRows,
    normalize_page,
)
from worker.runtime import Runtime, open_runtime

MODEL = botocore.session.get_session().get_service_model("rekognition")
OUTPUT_SHAPES = {
    Api.FACE_DETECTION: MODEL.operation_model("GetFaceDetection").output_shape,
    Api.FACE_SEARCH: MODEL.operation_model("GetFaceSearch").output_shape,
}
# Members the worker needs although the model marks nothing required: the stream position needs a
# Timestamp, a face match is stored under its FaceId, and a landmark or emotion row is its Type (the
# service always sends these; a page without them is refused, never stored half-described).
NEEDED = {("FaceDetection", "Timestamp"), ("PersonMatch", "Timestamp"), ("FaceMatch", "Face"), ("Face", "FaceId"),
          ("Landmark", "Type"), ("Emotion", "Type")}
# Indexed text columns: the normalizer bounds them (see normalize._MAX_KEY_CHARS).
KEY_MEMBERS = {("Face", "FaceId"), ("Face", "ExternalImageId")}
MAX_KEY_CHARS = 512
# Enum values this version does not know are stored as sent when PostgreSQL text can hold them and they
# are no longer than this (see normalize.MAX_ENUM_CHARS).
MAX_ENUM_CHARS = 256
I64 = 2**63
U64 = 2**64
FLOAT_MAX = 1.7976931348623157e308

PURE = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- leaves ---------------------------------------------------------------------------------------

# No surrogates: JSON text on the wire cannot carry them (orjson refuses to decode "\ud800").
SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
CHARS = st.characters(exclude_categories=SURROGATES)
SHORT_TEXT = st.text(CHARS, max_size=24)
# Long strings are built by repetition: cheap to generate, and just as long for the code under test.
LONG_TEXT = st.builds(lambda piece, n: piece * n, st.text(CHARS, min_size=1, max_size=4), st.integers(300, 5_000))
WITH_NUL = st.builds(lambda a, b: a + "\x00" + b, SHORT_TEXT, SHORT_TEXT)
NO_NUL = CHARS.filter(lambda c: c != "\x00")
# A value of an enumeration that a later service version could send: any text a column can hold.
NEW_ENUM_VALUE = st.one_of(st.text(NO_NUL, max_size=24),
                           st.builds(lambda c: c * MAX_ENUM_CHARS, NO_NUL))
EXTREME_INTS = st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**53 + 1, I64 - 1, -I64 + 1, I64, -I64, U64 - 1])
EXTREME_FLOATS = st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 1e-300, 100.0, 1e300, FLOAT_MAX, -FLOAT_MAX])
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-I64, U64 - 1),
                      st.floats(allow_nan=False, allow_infinity=False), SHORT_TEXT)
JSON_ANY = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SHORT_TEXT, inner,
                                                                                                   max_size=3),
                        max_leaves=6)


def _rarely(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], one_in: int = 15) -> st.SearchStrategy[Any]:
    """``common``, and ``rare`` about once in ``one_in`` draws (one_of alone would be half and half)."""
    return st.integers(1, one_in).flatmap(lambda n: rare if n == 1 else common)


class PageStrategies:
    """Strategies for one kind of page (see the module docstring), built from the service model."""

    def __init__(self, kind: str, *, wire: bool = False) -> None:
        assert kind in ("wild", "conforming")
        self.kind = kind
        self.wild = kind == "wild"
        # wire: only what a JSON encoder can send (orjson refuses ints beyond 64 bits).
        self.wire = wire

    def shape(self, shape: Any, owner: str = "", member: str = "") -> st.SearchStrategy[Any]:
        builder: Callable[[Any, str, str], st.SearchStrategy[Any]] = getattr(self, "_" + shape.type_name)
        return builder(shape, owner, member)

    def _structure(self, shape: Any, owner: str, member: str) -> st.SearchStrategy[Any]:
        needed, optional = {}, {}
        for name, sub in shape.members.items():
            strategy = self.shape(sub, shape.name, name)
            if (shape.name, name) in NEEDED and not self.wild:
                needed[name] = strategy
            else:
                optional[name] = strategy
        base = st.fixed_dictionaries(needed, optional=optional)
        # Unknown members (a newer API version): must be ignored, never fatal.
        unknown = st.dictionaries(SHORT_TEXT.filter(lambda k: k not in shape.members), JSON_ANY, max_size=2)
        return st.builds(lambda known, extra: {**extra, **known}, base, _rarely(st.just({}), unknown, 4))

    def _list(self, shape: Any, owner: str, member: str) -> st.SearchStrategy[Any]:
        top = owner in ("GetFaceDetectionResponse", "GetFaceSearchResponse")
        return st.lists(self.shape(shape.member, owner, member), max_size=6 if top else 4)

    def _string(self, shape: Any, owner: str, member: str) -> st.SearchStrategy[Any]:
        if shape.enum:
            valid = st.sampled_from(list(shape.enum))
            if self.wild:
                return _rarely(valid, st.one_of(SHORT_TEXT, LONG_TEXT))
            return _rarely(valid, NEW_ENUM_VALUE)
        uuids = owner == "Face" and member in ("FaceId", "ImageId")
        real = st.uuids().map(str) if uuids else SHORT_TEXT.filter(bool)
        if (owner, member) in KEY_MEMBERS:
            anything = st.text(CHARS.filter(lambda c: c != "\x00"), min_size=1, max_size=MAX_KEY_CHARS)
            if self.wild:
                return st.one_of(real, anything, LONG_TEXT, WITH_NUL)
            # The service never sends NUL in an identifier (ExternalImageId is [a-zA-Z0-9_.\-:]+).
            return st.one_of(real.filter(lambda s: "\x00" not in s), anything)
        strings = st.one_of(real, SHORT_TEXT, LONG_TEXT)
        if self.wild:
            return _rarely(strings, WITH_NUL)
        return strings.filter(lambda s: "\x00" not in s)

    def _integer(self, shape: Any, owner: str, member: str) -> st.SearchStrategy[Any]:
        if member == "Timestamp" and not self.wild:
            return st.one_of(st.integers(0, I64 - 1), st.sampled_from([0, I64 - 1]))
        if self.wild and self.wire:
            return st.one_of(st.integers(-I64 + 1, I64 - 1), EXTREME_INTS)
        if self.wild:
            # Beyond 64 bits too: JSON itself has no limit, only a decoder does.
            return st.one_of(st.integers(-I64 + 1, I64 - 1), EXTREME_INTS, st.integers(min_value=U64),
                             st.integers(max_value=-I64 - 1))
        return st.one_of(st.integers(-I64 + 1, I64 - 1), EXTREME_INTS.filter(lambda v: abs(v) < I64))

    _long = _integer

    def _float(self, shape: Any, owner: str, member: str) -> st.SearchStrategy[Any]:
        # No NaN or infinity: JSON cannot carry them (orjson refuses 1e400 rather than return inf).
        floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False), EXTREME_FLOATS,
                           st.integers(-I64, U64 - 1))  # a whole number may arrive as a JSON int
        if self.wild and not self.wire:
            return st.one_of(floats, st.integers(min_value=U64), st.just(10**400))
        return floats

    def _boolean(self, shape: Any, owner: str, member: str) -> st.SearchStrategy[Any]:
        return st.booleans()

    def page(self, api: Api) -> st.SearchStrategy[dict[str, Any]]:
        return self.shape(OUTPUT_SHAPES[api])


WILD = PageStrategies("wild")
WILD_WIRE = PageStrategies("wild", wire=True)
CONFORMING = PageStrategies("conforming")
APIS = st.sampled_from(list(Api))


# --- violations -----------------------------------------------------------------------------------

WRONG_TYPES: dict[str, list[Any]] = {
    "structure": ["a string", 7, [], True, 1.5],
    "list": ["a string", 7, {}, True],
    "string": [7, 1.5, [], {}, True],
    "integer": ["7", 1.5, [], {}, True, I64, -I64, U64 + 5],
    "long": ["7", 1.5, [], {}, True, I64, -I64, U64 + 5],
    "float": ["1.5", [], {}, True, False, 10**400],
    "boolean": [1, 0, "true", [], {}],
}


def _present_members(value: Any, shape: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """(path, shape) of every model member present (not null) in ``value``."""
    found: list[tuple[tuple[Any, ...], Any]] = []
    if shape.type_name == "structure" and type(value) is dict:
        for name, sub in shape.members.items():
            if value.get(name) is not None:
                found.append(((*path, name), sub))
                found.extend(_present_members(value[name], sub, (*path, name)))
    elif shape.type_name == "list" and type(value) is list:
        for i, item in enumerate(value):
            if item is not None:
                found.append(((*path, i), shape.member))
                found.extend(_present_members(item, shape.member, (*path, i)))
    return found


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for step in path[:-1]:
        doc = doc[step]
    doc[path[-1]] = value


@st.composite
def violating_pages(draw: st.DrawFn, *, wire: bool = False) -> tuple[Api, dict[str, Any], str]:
    """A conforming page with exactly one violation; returns (api, page, what was done).

    ``wire``: only violations JSON can carry (no ints beyond 64 bits).
    """
    api = draw(APIS)
    page = draw(CONFORMING.page(api))
    shape = OUTPUT_SHAPES[api]
    elements = page.get(api.results_key) or []
    choices = ["wrong type"] + (["drop timestamp", "element not an object"] if elements else [])
    how = draw(st.sampled_from(choices))
    if how == "drop timestamp":
        i = draw(st.integers(0, len(elements) - 1))
        if draw(st.booleans()):
            del elements[i]["Timestamp"]
        else:
            elements[i]["Timestamp"] = None
        return api, page, f"{api.results_key}[{i}] without Timestamp"
    if how == "element not an object":
        i = draw(st.integers(0, len(elements) - 1))
        elements[i] = draw(st.sampled_from(["x", 1, [], None, True]))
        return api, page, f"{api.results_key}[{i}] = {elements[i]!r}"
    present = _present_members(page, shape)
    if not present:  # an empty page: the results member itself gets the wrong type
        page[api.results_key] = draw(st.sampled_from(WRONG_TYPES["list"]))
        return api, page, f"{api.results_key} = {page[api.results_key]!r}"
    path, sub = draw(st.sampled_from(present))
    kind = sub.type_name
    options = list(WRONG_TYPES[kind])
    if kind == "string" and sub.enum:
        options.append("N" * (MAX_ENUM_CHARS + 1))  # other values are accepted, too long ones are not
    if kind == "string" and path[-1] != "JobStatus":
        options.append("with a \x00 inside")
    if kind == "list":
        options.append([None])  # an element that is not an object
    if wire:
        options = [o for o in options if not (type(o) is int and not -I64 <= o < U64)]
    bad = draw(st.sampled_from(options))
    _set(page, path, bad)
    return api, page, f"{'.'.join(map(str, path))} = {bad!r:.40}"


# --- what PostgreSQL can store --------------------------------------------------------------------

TABLE_COLUMNS = {"faces": FACE_COLUMNS, "landmarks": LANDMARK_COLUMNS, "emotions": EMOTION_COLUMNS,
                 "face_matches": MATCH_COLUMNS, "collection_faces": COLLECTION_FACE_COLUMNS}
INT_RANGES = {"smallint": 2**15, "integer": 2**31, "bigint": 2**63}


@pytest.fixture(scope="module")
def column_types(pg_server_url: str, template_db: str) -> dict[str, dict[str, tuple[str, bool, frozenset[str]]]]:
    """table -> column -> (data type, nullable, enum labels), read from the migrated schema."""
    import asyncio

    from tests.conftest import with_database

    async def read() -> dict[str, dict[str, tuple[str, bool, frozenset[str]]]]:
        conn = await asyncpg.connect(with_database(pg_server_url, template_db))
        try:
            rows = await conn.fetch(
                "SELECT c.table_name, c.column_name, CASE WHEN c.data_type = 'ARRAY' THEN 'ARRAY:' || "
                "  (SELECT format_type(t.typelem, NULL) FROM pg_type t WHERE t.typname = c.udt_name "
                "   AND t.typnamespace = 'pg_catalog'::regnamespace) ELSE c.data_type END AS data_type, "
                "  c.is_nullable = 'YES' AS nullable, "
                "  coalesce((SELECT array_agg(e.enumlabel) FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid "
                "            WHERE t.typname = c.udt_name), '{}') AS labels "
                "FROM information_schema.columns c WHERE c.table_schema = 'rekognition' AND c.table_name = ANY($1)",
                list(TABLE_COLUMNS))
        finally:
            await conn.close()
        out: dict[str, dict[str, tuple[str, bool, frozenset[str]]]] = {}
        for r in rows:
            out.setdefault(r["table_name"], {})[r["column_name"]] = (r["data_type"], r["nullable"],
                                                                     frozenset(r["labels"]))
        return out

    return asyncio.run(read())


def unstorable(rows: PageRows, types: dict[str, dict[str, tuple[str, bool, frozenset[str]]]]) -> list[str]:
    """Why some row value would be refused by its column (empty: everything can be copied)."""
    problems: list[str] = []
    batches = {"faces": rows.faces, "landmarks": rows.landmarks, "emotions": rows.emotions,
               "face_matches": rows.matches, "collection_faces": list(rows.collection_faces.values())}
    for table, batch in batches.items():
        columns = TABLE_COLUMNS[table]
        for row in batch:
            assert len(row) == len(columns), (table, row)
            for column, value in zip(columns, row, strict=True):
                problem = _refused(types[table][column], value)
                if problem:
                    problems.append(f"{table}.{column}: {problem}: {value!r:.60}")
    return problems


def _refused(column: tuple[str, bool, frozenset[str]], value: Any) -> str | None:
    data_type, nullable, labels = column
    if value is None:
        return None if nullable else "NULL in a NOT NULL column"
    if data_type.startswith("ARRAY:"):
        # landmarks and emotions: a face's elements; a coordinate or confidence may be missing, a type may not.
        element = data_type.removeprefix("ARRAY:")
        if type(value) is not list:
            return "not a list"
        problems = [_refused((element, element != "text", labels), v) for v in value]
        return next((p for p in problems if p), None)
    if data_type == "text":
        return None if type(value) is str and "\x00" not in value else "not text"
    if data_type in INT_RANGES:
        bound = INT_RANGES[data_type]
        return None if type(value) is int and -bound <= value < bound else f"not a {data_type}"
    if data_type == "double precision":
        if type(value) is float and math.isfinite(value):
            return None
        return None if type(value) is int and abs(value) <= FLOAT_MAX else "not a double"
    if data_type == "boolean":
        return None if type(value) is bool else "not a boolean"
    if data_type == "USER-DEFINED":
        return None if value in labels else f"not one of the enum's {len(labels)} labels"
    return f"unexpected column type {data_type}"


def expected_counts(page: dict[str, Any], api: Api) -> dict[str, int]:
    """Rows a conforming page must produce, counted straight from the page."""
    elements = page.get(api.results_key) or []
    faces = [e.get("Person", {}).get("Face") if api is Api.FACE_SEARCH else e.get("Face") for e in elements]
    faces = [f for f in faces if f is not None]
    matches = [m for e in elements for m in (e.get("FaceMatches") or [])] if api is Api.FACE_SEARCH else []
    return {
        "faces": len(elements),
        "landmarks": sum(len(f.get("Landmarks") or []) for f in faces),
        "emotions": sum(len(f.get("Emotions") or []) for f in faces),
        "face_matches": len(matches),
        "collection_faces": len({m["Face"]["FaceId"] for m in matches}),
    }


def actual_counts(rows: PageRows) -> dict[str, int]:
    return {"faces": len(rows.faces), "landmarks": rows.landmark_elements, "emotions": rows.emotion_elements,
            "face_matches": len(rows.matches), "collection_faces": len(rows.collection_faces)}


def wire(page: dict[str, Any]) -> dict[str, Any]:
    """The page as the worker receives it: through JSON and orjson, as over HTTP."""
    decoded: dict[str, Any] = orjson.loads(orjson.dumps(page))
    return decoded


# --- the pure properties --------------------------------------------------------------------------


@PURE
@given(api=APIS, data=st.data(), seq_start=st.integers(0, 10**6))
def test_wild_pages_give_storable_rows_or_malformed_page(
    api: Api, data: st.DataObject, seq_start: int,
    column_types: dict[str, dict[str, tuple[str, bool, frozenset[str]]]],
) -> None:
    page = data.draw(WILD.page(api))
    try:
        rows = normalize_page(page, api, 1, seq_start)
    except MalformedPage as exc:
        assert str(exc).startswith("malformed result page: ") and len(str(exc)) < 400
        return
    elements = page.get(api.results_key) or []
    assert rows.elements == len(elements) == len(rows.faces)
    assert [r[1] for r in rows.faces] == list(range(seq_start, seq_start + len(elements)))
    assert unstorable(rows, column_types) == []


@PURE
@given(api=APIS, data=st.data())
def test_conforming_pages_store_every_element(
    api: Api, data: st.DataObject, column_types: dict[str, dict[str, tuple[str, bool, frozenset[str]]]],
) -> None:
    page = wire(data.draw(CONFORMING.page(api)))
    rows = normalize_page(page, api, 1, 0)
    assert actual_counts(rows) == expected_counts(page, api)
    elements = page.get(api.results_key) or []
    assert [r[2] for r in rows.faces] == [e["Timestamp"] for e in elements]
    # Enum values, known or not, are stored exactly as sent.
    faces = [e.get("Person", {}).get("Face") if api is Api.FACE_SEARCH else e.get("Face") for e in elements]
    faces = [f for f in faces if f is not None]
    assert [t for r in rows.landmarks for t in r[2]] == [lm["Type"] for f in faces for lm in f.get("Landmarks") or []]
    assert [t for r in rows.emotions for t in r[2]] == [em["Type"] for f in faces for em in f.get("Emotions") or []]
    assert rows.meta.job_status == page.get("JobStatus")
    assert unstorable(rows, column_types) == []


@PURE
@given(violating_pages())
def test_violating_pages_are_always_refused(case: tuple[Api, dict[str, Any], str]) -> None:
    api, page, what = case
    note(what)
    with pytest.raises(MalformedPage, match=r"^malformed result page: "):
        normalize_page(page, api, 1, 0)


@pytest.mark.parametrize("hostile", [
    pytest.param(lambda: {"Faces": [{"Timestamp": 1, "Face": {"Landmarks": [{"Type": "nose"}] * (2**15 + 1)}}]},
                 id="more landmarks than a smallint ordinal"),
    pytest.param(lambda: {"Faces": [_nested(990)]}, id="element nested 990 deep"),
    pytest.param(lambda: {"Faces": [{"Timestamp": 1, "Face": {"Confidence": _nested(990)}}]}, id="deep value"),
    pytest.param(lambda: {"Faces": [{"Timestamp": "1" * 1_000_000}]}, id="megabyte timestamp"),
    pytest.param(lambda: {"Faces": [{"Timestamp": 10**5000}]}, id="5000-digit timestamp"),
    pytest.param(lambda: {"Faces": [{"Timestamp": 1, "Face": {"Confidence": 10**400}}]}, id="int beyond a double"),
    pytest.param(lambda: {"JobTag": "tag\x00", "Faces": []}, id="NUL in JobTag"),
    pytest.param(lambda: {"Persons": [{"Timestamp": 1, "FaceMatches": [{"Face": {"FaceId": "f" * 513}}]}]},
                 id="FaceId too long for an index"),
    pytest.param(lambda: {"Persons": [{"Timestamp": 1, "FaceMatches": [
        {"Face": {"FaceId": "f", "ExternalImageId": "e" * 5000}}]}]}, id="ExternalImageId too long for an index"),
])
def test_hostile_pages_are_malformed_not_crashes(hostile: Callable[[], dict[str, Any]]) -> None:
    page = hostile()
    api = Api.FACE_SEARCH if "Persons" in page else Api.FACE_DETECTION
    with pytest.raises(MalformedPage) as err:
        normalize_page(page, api, 1, 0)
    assert len(str(err.value)) < 300


def test_limits_are_inclusive() -> None:
    """The largest values the columns hold are stored, not refused."""
    face_id = "\U0001f600" * MAX_KEY_CHARS  # 2048 bytes of UTF-8: still fits a btree entry
    page = {"Persons": [{"Timestamp": I64 - 1, "Person": {"Index": -(I64 - 1), "Face": {
        "Landmarks": [{"Type": "nose", "X": FLOAT_MAX, "Y": -(U64 - 1)}] * 2**15}},
        "FaceMatches": [{"Face": {"FaceId": face_id, "ExternalImageId": face_id}}]}]}
    rows = normalize_page(page, Api.FACE_SEARCH, 2**31 - 1, 2**31 - 1)
    assert rows.landmark_elements == len(rows.landmarks[0][2]) == 2**15 and rows.faces[0][1] == 2**31 - 1
    with pytest.raises(MalformedPage, match="elements in a job"):
        normalize_page(page, Api.FACE_SEARCH, 2**31 - 1, 2**31)


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


# --- through the emulator, the ingest and PostgreSQL ----------------------------------------------


@st.composite
def jobs(draw: st.DrawFn) -> tuple[Api, dict[str, Any], str]:
    """(api, a page whose members become one job's fixture, kind): conforming, wild or violating."""
    kind = draw(st.sampled_from(["conforming", "conforming", "wild", "violating"]))
    if kind == "violating":
        api, page, what = draw(violating_pages(wire=True))
        note(what)
    else:
        api = draw(APIS)
        page = draw((CONFORMING if kind == "conforming" else WILD_WIRE).page(api))
    return api, page, kind


def operation(api: Api) -> synth.Api:
    return cast("synth.Api", api.operation)


def fixture_from(job_id: str, api: Api, page: dict[str, Any]) -> JobFixture:
    """A job whose every page repeats the generated job-level members, with the generated elements."""
    results = page.get(api.results_key)
    video_metadata = page.get("VideoMetadata")
    return JobFixture(job_id=job_id, api=operation(api), job_status="SUCCEEDED",
                      status_message=page.get("StatusMessage"),
                      results=results if isinstance(results, list) else [],
                      video_metadata=video_metadata if video_metadata is not None else {},
                      video=page.get("Video"), job_tag=page.get("JobTag"))


def refused_by_normalizer(fixture: JobFixture, api: Api, page_size: int) -> str | None:
    """The MalformedPage reason for the pages the emulator will serve, or None if all are accepted."""
    n, seq = len(fixture.results), 0
    for start in range(0, max(n, 1), page_size):
        stop = min(n, start + page_size)
        body = wire(page_body(fixture, start, stop, "next" if stop < n else None))
        try:
            seq += normalize_page(body, api, 1, seq).elements
        except MalformedPage as exc:
            return str(exc)
    return None


@pytest.fixture
async def ingest_runtime(settings: Settings, rekognition_endpoint: Any) -> AsyncIterator[Runtime]:
    # Small pages: generated jobs of up to six elements span pages, so face_seq carries over.
    async with open_runtime(settings.with_(page_size=PAGE_SIZE)) as rt:
        yield rt


PAGE_SIZE = 3
RESULT_TABLES = ("faces", "landmarks", "emotions", "face_matches", "collection_faces", "persons", "raw_pages")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(case=jobs())
async def test_generated_jobs_are_stored_whole_or_failed_with_a_reason(
    case: tuple[Api, dict[str, Any], str], ingest_runtime: Runtime, emulator: Any, db: asyncpg.Connection,
) -> None:
    api, page, kind = case
    job_id = f"hyp-{uuid.uuid4().hex[:16]}"
    fixture = fixture_from(job_id, api, page)
    refused = refused_by_normalizer(fixture, api, PAGE_SIZE)
    emulator.add_job(fixture)
    try:
        outcome = await ingest_runtime.ingestor.ingest(JobRef.create(job_id, api))
    finally:
        emulator.remove_job(job_id)
    note(f"kind={kind} outcome={outcome.outcome} reason={outcome.reason}")
    event(f"{kind} page: {outcome.outcome}")
    assert outcome.outcome == ("failed" if refused else "ingested"), outcome
    assert kind != "conforming" or not refused
    counts = await count_rows(db, job_id)
    job = await db.fetchrow("SELECT ingest_state, failure_reason, faces FROM jobs WHERE job_id = $1", job_id)
    assert job is not None
    if outcome.outcome == "ingested":
        assert job["ingest_state"] == "ingested" and job["faces"] == len(fixture.results)
        assert counts["faces"] == len(fixture.results)
        served = wire({api.results_key: fixture.results})
        expected = expected_counts(served, api)
        assert {t: counts[t] for t in expected} == expected
        assert counts["raw_pages"] == max(1, math.ceil(len(fixture.results) / PAGE_SIZE))
    else:
        assert job["ingest_state"] == "failed" and job["failure_reason"] == outcome.reason, job
        assert refused is not None and (outcome.reason or "").startswith(refused), job
        # No row, but every page Rekognition served is kept (quarantined) for a reprocess after a fix.
        assert all(counts[t] == 0 for t in RESULT_TABLES if t != "raw_pages"), counts
        assert counts["raw_pages"] == max(1, math.ceil(len(fixture.results) / PAGE_SIZE)), counts


INCOMPRESSIBLE = random.Random(8).randbytes(1500).hex()


@pytest.mark.parametrize(("api", "elements", "why"), [
    (Api.FACE_DETECTION, [{"Timestamp": 1, "Face": {"Landmarks": [{"Type": "nose", "X": 0.5}] * (2**15 + 1)}}],
     "Landmarks: expected at most 32768 elements"),
    # Incompressible (PostgreSQL compresses a repetitive key until it fits): 3000 random hex digits.
    (Api.FACE_SEARCH, [{"Timestamp": 1, "FaceMatches": [{"Face": {"FaceId": INCOMPRESSIBLE}}]}], "FaceId"),
    (Api.FACE_SEARCH, [{"Timestamp": 1, "FaceMatches": [{"Face": {"FaceId": "f", "ExternalImageId": "x\x00"}}]}],
     "ExternalImageId: expected string of at most 512 characters without NUL"),
    (Api.FACE_DETECTION, [{"Timestamp": 1, "Face": {"Confidence": 2**64 - 1}}] * 2 + [{"Timestamp": -1}],
     "Timestamp: expected non-negative integer"),
])
async def test_values_postgresql_refuses_fail_the_job_instead_of_looping(
    api: Api, elements: list[dict[str, Any]], why: str, ingest_runtime: Runtime, emulator: Any,
    db: asyncpg.Connection,
) -> None:
    """Before the normalizer checked them, these reached COPY, PostgreSQL refused them, and the error
    (from asyncpg, like a lost connection) made the job ``transient``: retried forever, never stored."""
    job_id = f"hostile-{uuid.uuid4().hex[:12]}"
    emulator.add_job(JobFixture(job_id=job_id, api=operation(api), results=elements))
    try:
        outcome = await ingest_runtime.ingestor.ingest(JobRef.create(job_id, api))
    finally:
        emulator.remove_job(job_id)
    assert outcome.outcome == "failed" and why in (outcome.reason or ""), outcome
    assert all(n == 0 for n in (await count_rows(db, job_id)).values() if n != 1)
    assert await db.fetchval("SELECT ingest_state FROM jobs WHERE job_id = $1", job_id) == "failed"
