"""Enumeration values newer than this version: stored as sent, counted in a metric, logged once.

Rekognition has added landmark types, emotions and other values before; a page that carries one must
not fail its job. Jobs come from the emulator over HTTP (synth.with_future_values) and land in a real
PostgreSQL; the stored values are compared with the raw pages the worker archived, byte for byte what
the service sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import uuid
from collections import Counter
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import structlog
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from tests.conftest import unique_job_id
from tests.helpers import runtime
from worker.config import Settings
from worker.db.store import ArchivedPage
from worker.local import synth
from worker.messages import JobRef
from worker.normalize import EMOTION_TYPES, GENDERS, LANDMARK_TYPES
from worker.unknown_values import MAX_LOGGED_CHARS, Reporter

FIRST_SEEN = "enumeration value unknown to this version, stored as sent"
METRIC = "rekognition_worker_unknown_enum_values_total"


def _count(member: str) -> float:
    """Counted by member only: the value comes from AWS and is logged instead (a label per value is unbounded)."""
    return REGISTRY.get_sample_value(METRIC, {"member": member}) or 0.0


def _values(tag: str) -> dict[str, tuple[str, ...]]:
    """Future values unique to one test, so "logged once per process" holds whatever ran before."""
    return {"landmark_type": (f"earLeft{tag}", f"earRight{tag}"), "emotion_type": (f"CONTEMPT_{tag}",),
            "gender": (f"Nonbinary{tag}",), "color_range": (f"HDR_{tag}",)}


def _sent(pages: list[dict[str, Any]], key: str) -> tuple[dict[str, Any], Counter[tuple[str, str]]]:
    """What the pages carry, by where it is stored, and how often each value outside the model occurs."""
    sent: dict[str, Any] = {"job": (pages[-1]["JobStatus"], pages[-1]["VideoMetadata"].get("ColorRange")),
                            "landmarks": {}, "emotions": {}, "gender": {}}
    unknown: Counter[tuple[str, str]] = Counter()
    for page in pages:
        if page["VideoMetadata"].get("ColorRange") not in ("FULL", "LIMITED", None):
            unknown["color_range", page["VideoMetadata"]["ColorRange"]] += 1
    seq = 0
    for page in pages:
        for element in page[key]:
            face = element["Person"]["Face"] if key == "Persons" else element["Face"]
            for i, lm in enumerate(face.get("Landmarks", [])):
                sent["landmarks"][seq, i] = lm["Type"]
                if lm["Type"] not in LANDMARK_TYPES:
                    unknown["landmark_type", lm["Type"]] += 1
            for i, em in enumerate(face.get("Emotions", [])):
                sent["emotions"][seq, i] = em["Type"]
                if em["Type"] not in EMOTION_TYPES:
                    unknown["emotion_type", em["Type"]] += 1
            gender = face.get("Gender", {}).get("Value")
            sent["gender"][seq] = gender
            if gender is not None and gender not in GENDERS:
                unknown["gender", gender] += 1
            seq += 1
    return sent, unknown


@pytest.mark.usefixtures("rekognition_endpoint")
@pytest.mark.parametrize(("kind", "processes"), [("detection", 1), ("search", 0)])
async def test_future_values_are_stored_as_sent_counted_and_logged_once(
    kind: str, processes: int, emulator: Any, settings: Settings, db: asyncpg.Connection,
) -> None:
    tag = uuid.uuid4().hex[:8]
    job_id = unique_job_id(f"future-{kind}")
    if kind == "detection":
        base = synth.detection_job(job_id, faces=1100, attributes="ALL", all_optional=True)
    else:
        base = synth.search_job(job_id, persons_elements=1100, all_optional=True)
    fx = synth.with_future_values(base, every=3, values=_values(tag))
    emulator.add_job(fx)
    ref = JobRef.create(job_id, fx.api)
    counted = {member: _count(member) for member in ("landmark_type", "emotion_type", "gender", "color_range")}
    try:
        # processes=1: rows and the values they carry come back from a decoding process.
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
            async with asyncio.timeout(60), runtime(settings.with_(decode_processes=processes)) as rt:
                first = await rt.ingestor.ingest(ref)
                again = await rt.ingestor.ingest(ref)
    finally:
        emulator.remove_job(job_id)
    assert (first.outcome, again.outcome, first.pages, first.faces) == ("ingested", "ingested", 2, 1100), first

    archived = await db.fetch("SELECT encoding, body, body_bytes FROM raw_pages WHERE "
                              "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1) ORDER BY page_no",
                              job_id)
    pages = [orjson.loads(ArchivedPage(bytes(r["body"]), r["body_bytes"], r["encoding"]).decompress())
             for r in archived]
    sent, unknown = _sent(pages, fx.results_key)
    assert {member for member, _ in unknown} == {"landmark_type", "emotion_type", "gender", "color_range"}
    assert unknown["landmark_type", f"earLeft{tag}"] == len(range(0, 1100, 3))

    job = await db.fetchrow("SELECT job_status, color_range FROM jobs WHERE job_id = $1", job_id)
    assert (job["job_status"], job["color_range"]) == sent["job"] == ("SUCCEEDED", f"HDR_{tag}")
    landmarks = await db.fetch("SELECT face_seq, u.n - 1 AS ordinal, u.type FROM landmarks, "
                               "unnest(types) WITH ORDINALITY u(type, n) WHERE "
                               "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1)", job_id)
    assert {(r["face_seq"], r["ordinal"]): r["type"] for r in landmarks} == sent["landmarks"]
    emotions = await db.fetch("SELECT face_seq, u.n - 1 AS ordinal, u.type FROM emotions, "
                              "unnest(types) WITH ORDINALITY u(type, n) WHERE "
                              "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1)", job_id)
    assert {(r["face_seq"], r["ordinal"]): r["type"] for r in emotions} == sent["emotions"]
    genders = await db.fetch("SELECT face_seq, gender_value FROM faces WHERE "
                             "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1)", job_id)
    assert {r["face_seq"]: r["gender_value"] for r in genders} == sent["gender"]
    # The reporting surface shows them too.
    assert await db.fetchval("SELECT color_range FROM reporting.job_summary WHERE job_id = $1", job_id) == f"HDR_{tag}"

    # Counted per occurrence and member, on both ingests; logged once per value, with the job that first
    # carried it.
    for member, before in counted.items():
        n = sum(count for (m, _), count in unknown.items() if m == member)
        assert _count(member) - before == 2 * n, member
    logged = [(e["member"], e["value"], e["job_id"]) for e in events if e["event"] == FIRST_SEEN]
    assert sorted(logged) == sorted((member, value, job_id) for member, value in unknown)


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_unknown_job_status_is_stored_and_the_job_ingested_with_its_results(
    emulator: Any, settings: Settings, db: asyncpg.Connection,
) -> None:
    """A JobStatus newer than this version is an enumeration value like any other: stored as sent, counted,
    and never a reason to fail the job; the results the pages carry are ingested (NextToken followed)."""
    status = synth.FUTURE_JOB_STATUSES[0]
    fx = dataclasses.replace(synth.search_job(unique_job_id("future-status"), persons_elements=30, persons=3),
                             job_status=status)
    emulator.add_job(fx)
    counted = _count("job_status")
    try:
        async with asyncio.timeout(30), runtime(settings.with_(page_size=10)) as rt:
            outcome = await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))
    finally:
        emulator.remove_job(fx.job_id)
    assert outcome.outcome == "ingested" and outcome.faces == 30 and outcome.pages == 3, outcome
    job = await db.fetchrow("SELECT job_status, ingest_state, failure_code, faces FROM jobs WHERE job_id = $1",
                            fx.job_id)
    assert dict(job) == {"job_status": status, "ingest_state": "ingested", "failure_code": None, "faces": 30}
    assert _count("job_status") >= counted + 1


def test_reporter_counts_by_member_and_logs_each_value_once() -> None:
    tag = uuid.uuid4().hex[:8]
    long_value = f"long{tag}" + "x" * 200
    reporter = Reporter(max_distinct=3)
    landmarks, genders = _count("landmark_type"), _count("gender")
    with capture_logs() as events:
        reporter.report({"landmark_type": {f"a{tag}": 2, long_value: 1}})
        reporter.report({"landmark_type": {f"a{tag}": 5}, "gender": {f"b{tag}": 1}})
        reporter.report({"gender": {f"c{tag}": 4, f"d{tag}": 1}})  # beyond three values: counted, not logged
    assert (_count("landmark_type") - landmarks, _count("gender") - genders) == (8, 6)
    # No series per value: the value never becomes a label.
    labels = {tuple(sorted(sample.labels)) for family in REGISTRY.collect() if family.name == METRIC.removesuffix(
        "_total") for sample in family.samples}
    assert labels == {("member",)}, labels
    first = [(e["member"], e["value"], e["truncated"]) for e in events if e["event"] == FIRST_SEEN]
    assert first == [("landmark_type", f"a{tag}", False), ("landmark_type", long_value[:MAX_LOGGED_CHARS], True),
                     ("gender", f"b{tag}", False)]
    assert [e["member"] for e in events if e["event"] != FIRST_SEEN] == ["gender"]  # the notice, once


async def test_emulator_command_serves_future_values_for_outside_checks() -> None:
    """``python -m worker.local.emulator --demo-jobs --future-values``: any client can check itself."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.local.emulator", "--no-auth", "--demo-jobs", "--future-values",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(30):
            assert proc.stdout is not None
            url = (await proc.stdout.readline()).decode().removeprefix("READY ").strip()
            async with aiohttp.ClientSession() as http:
                answer = await http.post(url, data=orjson.dumps({"JobId": "demo-det-lobby-0001"}), headers={
                    "X-Amz-Target": "RekognitionService.GetFaceDetection",
                    "Content-Type": "application/x-amz-json-1.1"})
                page = orjson.loads(await answer.read())
    finally:
        proc.terminate()
        await proc.wait()
    assert page["VideoMetadata"]["ColorRange"] == synth.FUTURE_VALUES["color_range"][0]
    face = page["Faces"][0]["Face"]
    assert [lm["Type"] for lm in face["Landmarks"][-2:]] == list(synth.FUTURE_VALUES["landmark_type"])
    assert face["Emotions"][-1]["Type"] == synth.FUTURE_VALUES["emotion_type"][0]
    assert face["Gender"]["Value"] == synth.FUTURE_VALUES["gender"][0]
