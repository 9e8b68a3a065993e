"""The reporting surface against the raw result pages.

Jobs go through the whole path (emulator over HTTP -> aiobotocore -> normalizer -> store), then every
row of every view is compared with values computed here, independently, from the elements the
emulator served (``fixture.results``): nothing below reads the base tables to build an expectation.
docs/queries.md is parsed and each of its queries is run and checked the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from rich.console import Console

from tests.conftest import create_database, unique_job_id, with_database
from tests.helpers import runtime
from worker.config import Settings
from worker.errors import InvalidInput, NotFound
from worker.local import synth
from worker.messages import Api, JobRef
from worker.normalize import normalize_page, parse_meta
from worker.report import run_report

ROOT = Path(__file__).resolve().parents[1]
PAGE_SIZE = 400
FAILED_MESSAGE = "Unsupported codec: the video could not be decoded"
Row = tuple[Any, ...]


# --- expectations, from the raw elements only --------------------------------------------------------------

def _search(fx: synth.JobFixture) -> bool:
    return fx.api == "GetFaceSearch"


def _person_index(element: dict[str, Any]) -> int | None:
    return (element.get("Person") or {}).get("Index")


def _face(fx: synth.JobFixture, element: dict[str, Any]) -> dict[str, Any] | None:
    return (element.get("Person") or {}).get("Face") if _search(fx) else element.get("Face")


def _max(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _matches(fx: synth.JobFixture) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(element, FaceMatch) pairs in stream order."""
    if not _search(fx):
        return []
    return [(e, m) for e in fx.results for m in e.get("FaceMatches") or []]


def _collection_meta(fx: synth.JobFixture) -> dict[str, dict[str, Any]]:
    """FaceId -> the Face object of its first FaceMatch in the stream (what the store keeps)."""
    meta: dict[str, dict[str, Any]] = {}
    for _, m in _matches(fx):
        meta.setdefault(m["Face"]["FaceId"], m["Face"])
    return meta


def expected_summary(fx: synth.JobFixture, page_size: int = PAGE_SIZE) -> dict[str, Any]:
    s3 = (fx.video or {}).get("S3Object", {})
    vm = fx.video_metadata
    common = {
        "job_id": fx.job_id, "api": "FACE_SEARCH" if _search(fx) else "FACE_DETECTION", "job_status": fx.job_status,
        "status_message": fx.status_message, "job_tag": fx.job_tag, "video_bucket": s3.get("Bucket"),
        "video_name": s3.get("Name"), "video_version": s3.get("Version"),
        "video_uri": f"s3://{s3['Bucket']}/{s3['Name']}" if s3.get("Bucket") and s3.get("Name") else None,
        "duration_ms": vm.get("DurationMillis"), "frame_rate": vm.get("FrameRate"),
        "frame_width": vm.get("FrameWidth"), "frame_height": vm.get("FrameHeight"),
    }
    if fx.job_status == "FAILED":
        return {**common, "ingest_state": "failed", "failure_code": "JobFailed", "failure_reason": fx.status_message,
                "pages": 0, "faces": 0, "persons": 0, "collection_matches": 0, "distinct_collection_faces": 0}
    matches = _matches(fx)
    return {
        **common, "ingest_state": "ingested", "failure_code": None, "failure_reason": None,
        "pages": max(1, math.ceil(len(fx.results) / page_size)),
        "faces": len(fx.results),
        "persons": len({_person_index(e) for e in fx.results} - {None}) if _search(fx) else 0,
        "collection_matches": len(matches),
        "distinct_collection_faces": len({m["Face"]["FaceId"] for _, m in matches}),
    }


def expected_appearances(fx: synth.JobFixture) -> dict[Row, Row]:
    stamps: dict[int, list[int]] = defaultdict(list)
    for e in fx.results:
        if _search(fx) and _person_index(e) is not None:
            stamps[_person_index(e)].append(e["Timestamp"])  # type: ignore[index]
    return {(fx.job_id, p): (min(ts), max(ts), len(ts), max(ts) - min(ts), len({t // 1000 for t in ts}))
            for p, ts in stamps.items()}


def expected_sightings(fx: synth.JobFixture) -> dict[Row, Row]:
    meta = _collection_meta(fx)
    hits: dict[str, list[tuple[int, float | None, int | None]]] = defaultdict(list)
    for e, m in _matches(fx):
        hits[m["Face"]["FaceId"]].append((e["Timestamp"], m.get("Similarity"), _person_index(e)))
    out: dict[Row, Row] = {}
    for face_id, h in hits.items():
        face = meta[face_id]
        out[(fx.job_id, face_id)] = (
            face.get("ExternalImageId"), face.get("ImageId"), face.get("UserId"),
            min(t for t, _, _ in h), max(t for t, _, _ in h), len(h), _max(s for _, s, _ in h),
            len({p for _, _, p in h} - {None}),
        )
    return out


def expected_identities(fx: synth.JobFixture) -> dict[Row, Row]:
    meta = _collection_meta(fx)
    hits: dict[tuple[int, str], list[tuple[int, float | None]]] = defaultdict(list)
    for e, m in _matches(fx):
        if _person_index(e) is not None:
            hits[(_person_index(e), m["Face"]["FaceId"])].append((e["Timestamp"], m.get("Similarity")))  # type: ignore[index]
    rows = {key: (meta[key[1]].get("ExternalImageId"), len(h), _max(s for _, s in h),
                  min(t for t, _ in h), max(t for t, _ in h)) for key, h in hits.items()}
    out: dict[Row, Row] = {}
    for person in {p for p, _ in rows}:
        mine = sorted(((fid, r) for (p, fid), r in rows.items() if p == person),
                      key=lambda fr: (-fr[1][1], fr[1][2] is None, -(fr[1][2] or 0.0), fr[0]))
        for rank, (face_id, r) in enumerate(mine, start=1):
            out[(fx.job_id, person, face_id)] = (*r, rank)
    return out


def expected_seconds(fx: synth.JobFixture) -> dict[Row, Row]:
    per_frame: dict[tuple[int | None, int], list[float | None]] = defaultdict(list)
    for e in fx.results:
        face = _face(fx, e)
        per_frame[(_person_index(e), e["Timestamp"])].append(None if face is None else face.get("Confidence"))
    seconds: dict[tuple[int | None, int], list[tuple[int, list[float | None]]]] = defaultdict(list)
    for (person, ts), confidences in per_frame.items():
        seconds[(person, ts // 1000)].append((ts, confidences))
    return {
        (fx.job_id, person, second): (
            sum(len(c) for _, c in frames), len(frames), max(len(c) for _, c in frames),
            _max(v for _, c in frames for v in c), min(t for t, _ in frames), max(t for t, _ in frames),
        )
        for (person, second), frames in seconds.items()
    }


def expected_segments(fx: synth.JobFixture, max_gap_ms: int) -> list[Row]:
    stamps: dict[int | None, list[int]] = defaultdict(list)
    for e in fx.results:
        stamps[_person_index(e)].append(e["Timestamp"])
    out: list[Row] = []
    for person in sorted(stamps, key=lambda p: (p is not None, p or 0)):
        ts = sorted(stamps[person])
        start, count, segment = ts[0], 0, 1
        for prev, cur in zip([ts[0], *ts], ts, strict=False):
            if cur - prev > max_gap_ms:
                out.append((person, segment, start, prev, count))
                start, count, segment = cur, 0, segment + 1
            count += 1
        out.append((person, segment, start, ts[-1], count))
    return out


def identity_of(fx: synth.JobFixture, person: int) -> tuple[str | None, str | None, float | None]:
    """(face_id, external_image_id, max_similarity) of the person's rank-1 match, Nones for a stranger."""
    for (_, p, face_id), r in expected_identities(fx).items():
        if p == person and r[-1] == 1:
            return face_id, r[0], r[2]
    return None, None, None


@dataclass
class Expected:
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    appearances: dict[Row, Row] = field(default_factory=dict)
    sightings: dict[Row, Row] = field(default_factory=dict)
    identities: dict[Row, Row] = field(default_factory=dict)
    seconds: dict[Row, Row] = field(default_factory=dict)
    observations: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, fixtures: Iterable[synth.JobFixture], page_size: int = PAGE_SIZE) -> Expected:
        out = cls()
        for fx in fixtures:
            out.summaries[fx.job_id] = expected_summary(fx, page_size)
            if fx.job_status == "FAILED":
                continue  # in job_summary only
            out.appearances |= expected_appearances(fx)
            out.sightings |= expected_sightings(fx)
            out.identities |= expected_identities(fx)
            out.seconds |= expected_seconds(fx)
            out.observations[fx.job_id] = len(fx.results)
        return out


# --- what the views say ------------------------------------------------------------------------------------

_VIEW_SQL = {
    "appearances": ("SELECT job_id, person_index, first_seen_ms, last_seen_ms, detections, span_ms, seconds_present "
                    "FROM reporting.person_appearances", 2),
    "sightings": ("SELECT job_id, face_id, external_image_id, image_id, user_id, first_seen_ms, last_seen_ms, "
                  "matches, max_similarity, persons FROM reporting.collection_face_sightings", 2),
    "identities": ("SELECT job_id, person_index, face_id, external_image_id, matches, max_similarity, "
                   "first_matched_ms, last_matched_ms, match_rank FROM reporting.person_identities", 3),
    "seconds": ("SELECT job_id, person_index, second, detections, samples, max_at_once, max_confidence, first_ms, "
                "last_ms FROM reporting.person_seconds", 3),
}


async def _keyed(conn: asyncpg.Connection, sql: str, key_len: int, job_ids: Sequence[str] | None) -> dict[Row, Row]:
    if job_ids is not None:
        rows = await conn.fetch(f"{sql} WHERE job_id = ANY($1::text[])", list(job_ids))
    else:
        rows = await conn.fetch(sql)
    out = {tuple(r.values())[:key_len]: tuple(r.values())[key_len:] for r in rows}
    assert len(out) == len(rows), "duplicate keys in a view"
    return out


async def actual(conn: asyncpg.Connection, job_ids: Sequence[str] | None = None) -> Expected:
    """Every row of every view (for ``job_ids`` only, when given), in the shape of :class:`Expected`."""
    out = Expected()
    summaries = await conn.fetch("SELECT * FROM reporting.job_summary" +
                                 (" WHERE job_id = ANY($1::text[])" if job_ids is not None else ""),
                                 *([list(job_ids)] if job_ids is not None else []))
    out.summaries = {r["job_id"]: dict(r) for r in summaries}
    for name, (sql, key_len) in _VIEW_SQL.items():
        setattr(out, name, await _keyed(conn, sql, key_len, job_ids))
    obs = await conn.fetch("SELECT job_id, count(*) AS n FROM reporting.face_observations GROUP BY job_id")
    out.observations = Counter({r["job_id"]: r["n"] for r in obs if job_ids is None or r["job_id"] in job_ids})
    return out


def assert_views_equal(got: Expected, want: Expected) -> None:
    assert set(got.summaries) == set(want.summaries)
    for job_id, expected in want.summaries.items():
        row = got.summaries[job_id]
        assert {k: row[k] for k in expected} == expected, job_id
    for name in ("appearances", "sightings", "identities", "seconds"):
        assert getattr(got, name) == getattr(want, name), name
    assert got.observations == want.observations


# --- the corpus: jobs of both kinds, awkward ones, a failed one, ingested once for the module ---------------

def messy_search_job(job_id: str) -> synth.JobFixture:
    """A face search job with what a service we have not seen might send, on several pages."""
    fx = synth.search_job(job_id, persons_elements=1300, persons=7, collection_size=6, seed=11, all_optional=True)
    res = fx.results
    for i in (5, 401, 977):  # a person seen without a face still counts as a detection
        res[i]["Person"].pop("Face", None)
    # A FaceId that comes back later with other metadata: the first occurrence is the one kept.
    early = next(m["Face"] for e in res[:PAGE_SIZE] for m in e["FaceMatches"])
    later = next(e for e in res[2 * PAGE_SIZE:]
                 if any(m["Face"]["FaceId"] == early["FaceId"] for m in e["FaceMatches"]))
    later["FaceMatches"] = [{**m, "Face": {**m["Face"], "ExternalImageId": "renamed-later", "ImageId": "other"}}
                            if m["Face"]["FaceId"] == early["FaceId"] else m for m in later["FaceMatches"]]
    # A match without Similarity, of a collection face indexed without ExternalImageId.
    res[650]["FaceMatches"].append({"Face": {"FaceId": "0b9e7c1e-3a52-4b7a-9d55-58f0f3c8a001",
                                             "ImageId": "9f0c5a3e-6a44-4d61-8a2f-2d6f9c1b7e01"}})
    res[950]["FaceMatches"].append({"Similarity": 71.5, "Face": {"FaceId": "0b9e7c1e-3a52-4b7a-9d55-58f0f3c8a001"}})
    res.insert(301, copy.deepcopy(res[300]))  # the same person twice in one frame
    res[100], res[101] = res[101], res[100]  # not in time order
    res[1200]["Person"]["Index"] = 2**40  # a person index beyond 32 bits
    return fx


@dataclass
class Corpus:
    db_url: str
    settings: Settings
    fixtures: dict[str, synth.JobFixture]  # every job stored, failed ones included, in ingest order
    expected: Expected

    def fx(self, job_id: str) -> synth.JobFixture:
        return self.fixtures[job_id]


def _aws_env(mp: pytest.MonkeyPatch, endpoint: str) -> None:
    # The autouse scrub in conftest is function-scoped; a module fixture has to do its own.
    for name in list(os.environ):
        if name.startswith("AWS_"):
            mp.delenv(name)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
                        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
                        "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL_REKOGNITION": endpoint}.items():
        mp.setenv(name, value)


def _settings(db_url: str) -> Settings:
    return Settings(database_url=db_url, rekognition_tps=1000.0, max_concurrent_jobs=4, retry_base_s=0.01,
                    retry_cap_s=0.05, max_call_attempts=4, log_format="json", page_size=PAGE_SIZE)


@pytest.fixture(scope="module")
async def corpus(pg_server_url: str, template_db: str, emulator: Any) -> AsyncIterator[Corpus]:
    name = f"t_reporting_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_server_url)
    await create_database(admin, name, template_db)
    db_url = with_database(pg_server_url, name)
    # The demo's jobs (docs/queries.md names them), then the awkward ones.
    demo = synth.demo_jobs()
    jobs = [*demo, messy_search_job("rep-messy-search-0007"),
            synth.detection_job("rep-empty-detection-0008", faces=0),
            synth.search_job("rep-empty-search-0009", persons_elements=0)]
    emulator.configure(quota_tps=None, fault_rate=0.0, latency_s=0.0)
    emulator.add_jobs(jobs)
    settings = _settings(db_url)
    try:
        with pytest.MonkeyPatch.context() as mp:
            _aws_env(mp, emulator.url)
            async with runtime(settings) as rt:
                # One at a time: docs query 4 orders videos by when their ingest committed.
                outcomes = {fx.job_id: (await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))).outcome
                            for fx in jobs}
        stored = {fx.job_id: fx for fx in jobs if fx.job_status != "IN_PROGRESS"}
        assert outcomes == {fx.job_id: {"SUCCEEDED": "ingested", "FAILED": "failed", "IN_PROGRESS": "not_ready"}
                            [fx.job_status] for fx in jobs}
        yield Corpus(db_url, settings, stored, Expected.of(stored.values()))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def corpus_db(corpus: Corpus) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(corpus.db_url)
    yield conn
    await conn.close()


# --- every row of every view equals the raw pages -----------------------------------------------------------

async def test_job_summary_counts_both_kinds_and_failed_jobs(corpus: Corpus, corpus_db: asyncpg.Connection) -> None:
    got = await actual(corpus_db)
    assert set(got.summaries) == set(corpus.expected.summaries)  # the IN_PROGRESS job is nowhere
    for job_id, want in corpus.expected.summaries.items():
        row = got.summaries[job_id]
        assert {k: row[k] for k in want} == want, job_id
    # The cases the counters are easy to get wrong on, spelled out.
    det, search = got.summaries["demo-det-lobby-0001"], got.summaries["rep-messy-search-0007"]
    assert (det["faces"], det["persons"], det["collection_matches"]) == (2500, 0, 0)
    assert search["faces"] == 1301 and search["persons"] == 8 and search["pages"] == 4
    failed = got.summaries["demo-search-failed-0006"]
    assert failed["ingest_state"] == "failed" and failed["job_status"] == "FAILED"
    assert failed["failure_reason"] == FAILED_MESSAGE and failed["ingested_at"] is None
    assert got.summaries["rep-empty-detection-0008"]["faces"] == 0


async def test_every_view_row_equals_the_raw_pages(corpus: Corpus, corpus_db: asyncpg.Connection) -> None:
    got = await actual(corpus_db)
    assert_views_equal(got, corpus.expected)
    # And the corpus exercised what it was built for.
    messy = {k: v for k, v in got.sightings.items() if k[0] == "rep-messy-search-0007"}
    assert any(v[0] is None and v[6] == 71.5 for v in messy.values())  # no ExternalImageId, one Similarity missing
    assert not any(v[0] == "renamed-later" for v in messy.values())
    assert ("rep-messy-search-0007", 2**40) in got.appearances
    assert any(v[2] == 2 for k, v in got.seconds.items() if k[0] == "rep-messy-search-0007")  # two in one frame
    assert any(k[1] is None for k in got.seconds)  # detection jobs: person_index NULL
    assert not any(k[0].startswith("demo-det") for k in got.appearances)
    assert "demo-search-failed-0006" not in got.observations


async def test_person_segments_follow_the_gaps(corpus: Corpus, corpus_db: asyncpg.Connection) -> None:
    for job_id, gap_ms in (("demo-search-office-0004", 1000), ("rep-messy-search-0007", 700),
                           ("demo-det-garage-0002", 400), ("rep-empty-search-0009", 1000)):
        rows = await corpus_db.fetch("SELECT * FROM reporting.person_segments($1, $2)", job_id, gap_ms)
        got = [tuple(r.values()) for r in rows]
        want = expected_segments(corpus.fx(job_id), gap_ms) if corpus.fx(job_id).results else []
        assert got == want, job_id
    assert await corpus_db.fetch("SELECT * FROM reporting.person_segments('demo-search-failed-0006')") == []


# --- docs/queries.md: every query runs against real data and answers what it says ---------------------------

def _doc_queries() -> dict[int, tuple[str, str]]:
    text = (ROOT / "docs" / "queries.md").read_text()
    found = re.findall(r"^## (\d+)\. (.+?)$(.*?)```sql\n(.*?)```", text, re.S | re.M)
    return {int(n): (title, sql) for n, title, _, sql in found}


DOC_QUERIES = _doc_queries()


def _named(fx: synth.JobFixture, person: int) -> str:
    face_id, external, _ = identity_of(fx, person)
    return external or face_id or "(no match)"


def _search_jobs(c: Corpus) -> list[synth.JobFixture]:
    return [fx for fx in c.fixtures.values() if _search(fx) and fx.job_status == "SUCCEEDED"]


def check_1(c: Corpus, rows: list[asyncpg.Record]) -> None:
    assert len(rows) == len(c.expected.appearances)
    for r in rows:
        fx = c.fx(r["job_id"])
        face_id, external, similarity = identity_of(fx, r["person_index"])
        assert r["who"] == (external or face_id or "(no match)") and r["similarity"] == similarity
        assert (r["first_seen_ms"], r["last_seen_ms"], r["detections"]) == \
            c.expected.appearances[(r["job_id"], r["person_index"])][:3]
        assert r["video_uri"] == expected_summary(fx)["video_uri"]


def check_2(c: Corpus, rows: list[asyncpg.Record]) -> None:
    want: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    videos: dict[str, set[str]] = defaultdict(set)
    for (job_id, person), v in c.expected.appearances.items():
        who = _named(c.fx(job_id), person)
        want[who][0] += v[4]
        want[who][1] += v[2]
        videos[who].add(job_id)
    assert {r["who"]: [r["seconds_on_screen"], r["detections"]] for r in rows} == want
    assert {r["who"]: r["videos"] for r in rows} == {k: len(v) for k, v in videos.items()}
    assert [r["seconds_on_screen"] for r in rows] == sorted((r["seconds_on_screen"] for r in rows), reverse=True)


def check_3(c: Corpus, rows: list[asyncpg.Record]) -> None:
    fx = c.fx("demo-search-office-0004")
    present: dict[int, set[int]] = defaultdict(set)
    for e in fx.results:
        present[e["Person"]["Index"]].add(e["Timestamp"] // 1000)
    want = {(a, b): len(present[a] & present[b]) for a in present for b in present if a < b}
    assert {(r["person_a"], r["person_b"]): r["seconds_together"] for r in rows} == \
        {k: v for k, v in want.items() if v}
    assert all(r["who_b"] == _named(fx, r["person_b"]) for r in rows)


def check_4(c: Corpus, rows: list[asyncpg.Record]) -> None:
    first: dict[str, tuple[str, int]] = {}
    for fx in _search_jobs(c):  # in ingest order
        for (job_id, face_id), v in expected_sightings(fx).items():
            first.setdefault(face_id, (job_id, v[3]))
    assert {r["face_id"]: (r["first_job"], r["first_seen_ms"]) for r in rows} == first
    # The demo's two search videos share a collection: faces seen in both belong to the earlier video.
    entrance, office = (
        {face_id for _, face_id in expected_sightings(c.fx(j))}
        for j in ("demo-search-entrance-0003", "demo-search-office-0004")
    )
    assert entrance & office and all(first[f][0] == "demo-search-entrance-0003" for f in entrance & office)


def check_5(c: Corpus, rows: list[asyncpg.Record]) -> None:
    want = sorted(
        (k[0], v[3], v[4], v[5], v[7], v[6])
        for fx in _search_jobs(c) for k, v in expected_sightings(fx).items() if v[0] == "employee-03"
    )
    got = sorted((r["job_id"], r["first_seen_ms"], r["last_seen_ms"], r["matches"], r["persons"], r["max_similarity"])
                 for r in rows)
    assert got == want and len(got) >= 1


def check_6(c: Corpus, rows: list[asyncpg.Record]) -> None:
    want: dict[Row, list[int]] = defaultdict(lambda: [0, 0, 0])
    for s in c.expected.summaries.values():
        acc = want[(s["api"], s["ingest_state"], s["job_status"])]
        acc[0] += 1
        acc[1] += s["faces"]
        acc[2] += s["collection_matches"]
    assert {(r["api"], r["ingest_state"], r["job_status"]): [r["jobs"], r["faces"], r["collection_matches"]]
            for r in rows} == want


def check_7(c: Corpus, rows: list[asyncpg.Record]) -> None:
    assert [(r["job_id"], r["failure_code"], r["failure_reason"]) for r in rows] == \
        [("demo-search-failed-0006", "JobFailed", FAILED_MESSAGE)]


def check_8(c: Corpus, rows: list[asyncpg.Record]) -> None:
    fx = c.fx("demo-search-entrance-0003")
    seen: dict[int, list[int]] = defaultdict(list)
    for e in fx.results:
        if 20 <= e["Timestamp"] // 1000 <= 29:
            seen[e["Person"]["Index"]].append(e["Timestamp"])
    assert {r["person_index"]: (r["who"], r["seconds_in_window"], r["first_ms"], r["last_ms"]) for r in rows} == {
        p: (_named(fx, p), len({t // 1000 for t in ts}), min(ts), max(ts)) for p, ts in seen.items()}


def check_9(c: Corpus, rows: list[asyncpg.Record]) -> None:
    want = expected_segments(c.fx("demo-search-office-0004"), 1000)
    assert [(r["person_index"], r["segment_no"], r["start_ms"], r["end_ms"], r["detections"]) for r in rows] == want
    assert all(r["length_ms"] == r["end_ms"] - r["start_ms"] for r in rows)


def check_10(c: Corpus, rows: list[asyncpg.Record]) -> None:
    want = sorted((job_id, p) for job_id, p in c.expected.appearances if identity_of(c.fx(job_id), p)[0] is None)
    assert [(r["job_id"], r["person_index"]) for r in rows] == want and want


def check_11(c: Corpus, rows: list[asyncpg.Record]) -> None:
    candidates: dict[tuple[str, int], list[tuple[int, str]]] = defaultdict(list)
    for (job_id, person, face_id), v in c.expected.identities.items():
        candidates[(job_id, person)].append((v[-1], v[0] or face_id))
    want = {k: ", ".join(name for _, name in sorted(v)) for k, v in candidates.items() if len(v) > 1}
    assert {(r["job_id"], r["person_index"]): r["candidates"] for r in rows} == want and want


def check_12(c: Corpus, rows: list[asyncpg.Record]) -> None:
    want = {k: v[6] for k, v in c.expected.sightings.items() if v[6] is not None and v[6] < 90}
    assert {(r["job_id"], r["face_id"]): r["max_similarity"] for r in rows} == want and want


def check_13(c: Corpus, rows: list[asyncpg.Record]) -> None:
    per_second = {k[2]: v for k, v in c.expected.seconds.items() if k[0] == "demo-det-lobby-0001"}
    ranked = sorted(per_second.items(), key=lambda sv: (-sv[1][2], sv[0]))[:5]
    assert [(r["second"], r["faces_in_one_frame"], r["detections"], r["samples"]) for r in rows] == \
        [(s, v[2], v[0], v[1]) for s, v in ranked]


def check_14(c: Corpus, rows: list[asyncpg.Record]) -> None:
    ingested = [s for s in c.expected.summaries.values() if s["ingest_state"] == "ingested"]
    assert sum(r["jobs"] for r in rows) == len(ingested)
    assert sum(r["faces"] for r in rows) == sum(s["faces"] for s in ingested)
    assert sum(r["pages"] for r in rows) == sum(s["pages"] for s in ingested)
    assert sum(r["attempts"] for r in rows) == len(ingested)


CHECKS: dict[int, Callable[[Corpus, list[asyncpg.Record]], None]] = {
    n: globals()[f"check_{n}"] for n in range(1, 15)
}


def test_every_documented_query_has_a_check() -> None:
    assert len(DOC_QUERIES) >= 12
    assert set(DOC_QUERIES) == set(CHECKS)


@pytest.mark.parametrize("number", sorted(DOC_QUERIES))
async def test_documented_query(number: int, corpus: Corpus, corpus_db: asyncpg.Connection) -> None:
    _title, sql = DOC_QUERIES[number]
    rows = await corpus_db.fetch(sql)
    CHECKS[number](corpus, rows)


# --- re-ingest, failure: what readers see ------------------------------------------------------------------

def _pages(fx: synth.JobFixture, page_size: int) -> list[dict[str, Any]]:
    n = len(fx.results)
    return [synth.page_body(fx, start, min(start + page_size, n), None) for start in range(0, max(n, 1), page_size)]


class _Abandon(Exception):
    """Raised to roll a writer's transaction back."""


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_a_reingest_in_flight_shows_the_previous_complete_rows(emulator: Any, settings: Settings,
                                                                     db: asyncpg.Connection) -> None:
    job_id = unique_job_id("reingest")
    old = synth.search_job(job_id, persons_elements=500, persons=4, seed=1)
    new = synth.search_job(job_id, persons_elements=900, persons=6, collection_size=5, seed=2)
    fresh = synth.detection_job(unique_job_id("firsttime"), faces=300)
    emulator.add_job(old)
    before, after = Expected.of([old], settings.page_size), Expected.of([new], 300)
    watched = [job_id, fresh.job_id]
    async with runtime(settings) as rt:
        assert (await rt.ingestor.ingest(JobRef.create(job_id, old.api))).outcome == "ingested"
        assert_views_equal(await actual(db, watched), before)
        # Two writers mid-job, their pages committed under new keys: a re-ingest, and the first ingest of another job.
        async with rt.store.job_writer(JobRef.create(job_id, new.api)) as writer:
            with contextlib.suppress(_Abandon):
                async with rt.store.job_writer(JobRef.create(fresh.job_id, fresh.api)) as first_writer:
                    page = _pages(fresh, 200)[0]
                    await first_writer.write_page(
                        normalize_page(page, Api.FACE_DETECTION, first_writer.ingest_id, 0))
                    seq = 0
                    for page in _pages(new, 300):
                        rows = normalize_page(page, Api.FACE_SEARCH, writer.ingest_id, seq)
                        await writer.write_page(rows)
                        seq += rows.elements
                        assert_views_equal(await actual(db, watched), before)
                    await writer.finish(parse_meta(page))
                    # Persons derived under the new key, the job not switched to it yet: readers keep the old ingest.
                    assert_views_equal(await actual(db, watched), before)
                    raise _Abandon  # the other job's first ingest never commits
            assert_views_equal(await actual(db, watched), before)
        assert_views_equal(await actual(db, watched), after)
    assert before.summaries[job_id]["faces"] == 500 and after.summaries[job_id]["faces"] == 900


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_readers_polling_during_a_reingest_see_one_ingest_or_the_other(
        emulator: Any, settings: Settings, db_url: str, db: asyncpg.Connection) -> None:
    job_id = unique_job_id("poll")
    old = synth.search_job(job_id, persons_elements=1200, persons=5, seed=3)
    new = synth.search_job(job_id, persons_elements=2100, persons=7, seed=4)
    emulator.add_job(old)
    small_pages = settings.with_(page_size=300)
    async with runtime(small_pages) as rt:
        await rt.ingestor.ingest(JobRef.create(job_id, old.api))
    before, after = Expected.of([old], 300), Expected.of([new], 300)
    emulator.add_job(new)
    emulator.configure(latency_s=0.05)
    seen: list[str] = []
    done = asyncio.Event()

    async def watch() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            while not done.is_set():
                # One snapshot for all the views, as a report reader would take it.
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    got = await actual(conn, [job_id])
                new_rows = got.summaries[job_id]["faces"] == 2100
                assert_views_equal(got, after if new_rows else before)
                seen.append("new" if new_rows else "old")
        finally:
            await conn.close()

    watcher = asyncio.create_task(watch())
    try:
        async with runtime(small_pages) as rt:
            assert (await rt.ingestor.ingest(JobRef.create(job_id, new.api))).outcome == "ingested"
    finally:
        emulator.configure(latency_s=0.0)
        done.set()
        await watcher
    assert_views_equal(await actual(db, [job_id]), after)
    # Seven pages at 50 ms each: the readers polled while the writer held its transaction open.
    assert seen.count("old") >= 3
    assert seen == sorted(seen, key=lambda s: s == "new")  # never back from the new rows to the old


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_failed_jobs_appear_in_job_summary_only(emulator: Any, settings: Settings,
                                                      db: asyncpg.Connection) -> None:
    failed = synth.failed_job(unique_job_id("failed"), "GetFaceDetection", FAILED_MESSAGE)
    kept = synth.search_job(unique_job_id("kept"), persons_elements=300, seed=5)
    dropped = synth.search_job(unique_job_id("dropped"), persons_elements=300, seed=6)
    emulator.add_jobs([failed, kept, dropped])
    ids = [failed.job_id, kept.job_id, dropped.job_id]
    async with runtime(settings) as rt:
        for fx in (failed, kept, dropped):
            await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))
        assert_views_equal(await actual(db, ids), Expected.of([failed, kept, dropped], settings.page_size))
        # Results expired before a re-run: the complete earlier ingest stays visible, the failure is noted.
        emulator.remove_job(kept.job_id)
        assert (await rt.ingestor.ingest(JobRef.create(kept.job_id, kept.api))).outcome == "failed"
        # Rekognition itself now says FAILED: the job leaves every view but job_summary.
        refailed = synth.failed_job(dropped.job_id, "GetFaceSearch", FAILED_MESSAGE)
        emulator.add_job(refailed)
        assert (await rt.ingestor.ingest(JobRef.create(dropped.job_id, dropped.api))).outcome == "failed"
    got = await actual(db, ids)
    # A failure without VideoMetadata keeps what the earlier ingest knew about the video.
    want = Expected.of([failed, kept, dataclasses.replace(refailed, video_metadata=dropped.video_metadata)],
                       settings.page_size)
    reason = got.summaries[kept.job_id]["failure_reason"]
    assert "ResourceNotFoundException" in reason
    want.summaries[kept.job_id] |= {"failure_code": "ResourceNotFoundException", "failure_reason": reason}
    assert_views_equal(got, want)
    assert got.summaries[dropped.job_id]["ingest_state"] == "failed"
    assert got.summaries[failed.job_id]["video_uri"] is not None


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_conflicting_metadata_within_one_page_keeps_the_first(emulator: Any, settings: Settings,
                                                                    db: asyncpg.Connection) -> None:
    fx = synth.search_job(unique_job_id("meta"), persons_elements=60, persons=3, seed=8)
    hits = [(e, m) for e in fx.results for m in e["FaceMatches"]]
    first_face = hits[0][1]["Face"]
    later = [e for e, m in hits[1:] if m["Face"]["FaceId"] == first_face["FaceId"]][-1]
    later["FaceMatches"] = [{**m, "Face": {**m["Face"], "ExternalImageId": "renamed"}} for m in later["FaceMatches"]]
    emulator.add_job(fx)
    async with runtime(settings) as rt:
        await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))
    got = await db.fetchval("SELECT external_image_id FROM reporting.collection_face_sightings "
                            "WHERE job_id = $1 AND face_id = $2", fx.job_id, first_face["FaceId"])
    assert got == first_face["ExternalImageId"]


# --- the report command --------------------------------------------------------------------------------------

async def _report(c: Corpus, job_id: str, fmt: str, chart: str | None = None) -> str:
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert await run_report(c.settings, job_id, fmt=fmt, chart=chart, console=console) == 0
    return buf.getvalue() + out.getvalue()


async def test_report_json_equals_the_raw_pages(corpus: Corpus) -> None:
    fx = corpus.fx("demo-search-entrance-0003")
    report = json.loads(await _report(corpus, fx.job_id, "json"))
    want = expected_summary(fx)
    assert {k: report["job"][k] for k in want} == want
    persons = {p["person_index"]: p for p in report["persons"]}
    for (_, person), v in expected_appearances(fx).items():
        p = persons[person]
        assert (p["first_seen_ms"], p["last_seen_ms"], p["detections"], p["seconds_present"]) == (*v[:3], v[4])
        assert (p["face_id"], p["external_image_id"], p["similarity"]) == identity_of(fx, person)
    assert [p["seconds_present"] for p in report["persons"]] == \
        sorted((p["seconds_present"] for p in report["persons"]), reverse=True)
    assert {(s["face_id"], s["external_image_id"], s["matches"], s["max_similarity"])
            for s in report["collection_faces"]} == \
        {(k[1], v[0], v[5], v[6]) for k, v in expected_sightings(fx).items()}
    per_frame = Counter(e["Timestamp"] for e in fx.results)
    assert report["presence"]["max_faces_at_once"] == max(per_frame.values())
    assert report["presence"]["seconds_with_faces"] == len({t // 1000 for t in per_frame})
    detection = json.loads(await _report(corpus, "demo-det-garage-0002", "json"))
    assert detection["job"]["faces"] == 2100 and detection["persons"] == [] == detection["collection_faces"]


async def test_report_text_is_readable(corpus: Corpus) -> None:
    text = await _report(corpus, "demo-search-entrance-0003", "text")
    for needle in ("job demo-search-entrance-0003", "s3://acme-video-ingest/", "persons by screen time",
                   "collection faces seen", "employee-", "no collection match", "1:11.560"):
        assert needle in text, needle
    det = await _report(corpus, "demo-det-lobby-0001", "text")
    assert "face detection has no person index" in det and "most faces in one frame" in det
    failed = await _report(corpus, "demo-search-failed-0006", "text")
    assert "JobFailed" in failed and FAILED_MESSAGE in failed and "failed" in failed


async def test_report_errors_are_input_errors(corpus: Corpus, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    console = Console(file=io.StringIO())
    with pytest.raises(NotFound, match="has not been ingested"):  # in flight, never stored, or unknown
        await run_report(corpus.settings, "demo-det-running-0005", fmt="text", chart=None, console=console)
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with pytest.raises(InvalidInput, match="cannot write the chart"):
        await run_report(corpus.settings, "demo-search-office-0004", fmt="json",
                         chart=str(not_a_directory / "chart.png"), console=console)
    assert capsys.readouterr().out == ""


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


async def test_report_command_writes_a_timeline(corpus: Corpus, tmp_path: Path) -> None:
    """The real command in a subprocess: DATABASE_URL from the environment, JSON on stdout, a PNG."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"DATABASE_URL": corpus.db_url, "LOG_FORMAT": "json", "MPLBACKEND": "Agg"})
    charts = {job_id: tmp_path / f"{job_id}.png" for job_id in
              ("demo-search-entrance-0003", "demo-det-lobby-0001", "demo-search-failed-0006")}

    def run(job_id: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "worker", "report", job_id, "--format", "json", "--chart",
                               str(charts[job_id])], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120, check=False)

    results = await asyncio.gather(*(asyncio.to_thread(run, j) for j in charts))
    for job_id, result in zip(charts, results, strict=True):
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["job"]["job_id"] == job_id
        width, height = _png_size(charts[job_id])
        assert width > 1000 and height > 250
    # One lane per person: the search chart grows with the number of persons.
    assert _png_size(charts["demo-search-entrance-0003"])[1] > _png_size(charts["demo-search-failed-0006"])[1]
