"""Ingestion end to end: emulator over HTTP -> aiobotocore -> normalizer -> real PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from typing import Any

import asyncpg
import pytest

from tests.conftest import unique_job_id
from tests.helpers import count_rows, dump_job, job_rows_sql, runtime
from worker.config import Settings
from worker.local import synth
from worker.messages import Api, JobRef

pytestmark = pytest.mark.usefixtures("rekognition_endpoint")


def _ref(fx: synth.JobFixture) -> JobRef:
    return JobRef.create(fx.job_id, fx.api)


# --- field coverage ------------------------------------------------------------------------------

# Where each member of the response syntax lives, stated independently of the normalizer.
_FACE_DETAIL = {
    "BoundingBox.Width": "bbox_width", "BoundingBox.Height": "bbox_height", "BoundingBox.Left": "bbox_left",
    "BoundingBox.Top": "bbox_top", "Confidence": "confidence", "AgeRange.Low": "age_low",
    "AgeRange.High": "age_high", "Gender.Value": "gender_value", "Gender.Confidence": "gender_confidence",
    "Pose.Roll": "pose_roll", "Pose.Yaw": "pose_yaw", "Pose.Pitch": "pose_pitch",
    "Quality.Brightness": "quality_brightness", "Quality.Sharpness": "quality_sharpness",
    "EyeDirection.Yaw": "eye_direction_yaw", "EyeDirection.Pitch": "eye_direction_pitch",
    "EyeDirection.Confidence": "eye_direction_confidence",
    **{f"{m}.{f}": f"{c}_{f.lower()}" for m, c in (
        ("Smile", "smile"), ("Eyeglasses", "eyeglasses"), ("Sunglasses", "sunglasses"), ("Beard", "beard"),
        ("Mustache", "mustache"), ("EyesOpen", "eyes_open"), ("MouthOpen", "mouth_open"),
        ("FaceOccluded", "face_occluded")) for f in ("Value", "Confidence")},
}
_JOB = {
    "JobStatus": "job_status", "StatusMessage": "status_message", "JobTag": "job_tag", "JobId": "job_id",
    "Video.S3Object.Bucket": "video_bucket", "Video.S3Object.Name": "video_name",
    "Video.S3Object.Version": "video_version", "VideoMetadata.Codec": "video_codec",
    "VideoMetadata.DurationMillis": "duration_ms", "VideoMetadata.Format": "video_format",
    "VideoMetadata.FrameRate": "frame_rate", "VideoMetadata.FrameHeight": "frame_height",
    "VideoMetadata.FrameWidth": "frame_width", "VideoMetadata.ColorRange": "color_range",
}
_COLLECTION = {
    "ImageId": "image_id", "ExternalImageId": "external_image_id", "UserId": "user_id",
    "IndexFacesModelVersion": "index_faces_model_version", "Confidence": "confidence",
    "BoundingBox.Width": "bbox_width", "BoundingBox.Height": "bbox_height", "BoundingBox.Left": "bbox_left",
    "BoundingBox.Top": "bbox_top",
}


def _leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{path}.{k}" if path else k)]
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, value)]


class _Db:
    """Looks up stored values by what the response member is."""

    def __init__(self, tables: dict[str, list[dict[str, Any]]]) -> None:
        self.job = tables["jobs"][0]
        self.faces = {r["face_seq"]: r for r in tables["faces"]}
        # One row per face, the elements as arrays: element i is Landmarks[i] (Emotions[i]).
        self.landmarks = {(r["face_seq"], i): {"type": t, "x": x, "y": y} for r in tables["landmarks"]
                          for i, (t, x, y) in enumerate(zip(r["types"], r["xs"], r["ys"], strict=True))}
        self.emotions = {(r["face_seq"], i): {"type": t, "confidence": c} for r in tables["emotions"]
                         for i, (t, c) in enumerate(zip(r["types"], r["confidences"], strict=True))}
        self.matches = {(r["face_seq"], r["ordinal"]): r for r in tables["face_matches"]}
        self.collection = {r["face_id"]: r for r in tables["collection_faces"]}

    def stored(self, key: str, path: str, seq: int | None, element: dict[str, Any]) -> Any:
        if seq is None:
            return self.job[_JOB[path]]
        face = self.faces[seq]
        if path == "Timestamp":
            return face["timestamp_ms"]
        if path == "Person.Index":
            return face["person_index"]
        if m := re.fullmatch(r"Person\.BoundingBox\.(\w+)", path):
            return face[f"person_bbox_{m[1].lower()}"]
        detail = re.sub(r"^(Person\.)?Face\.", "", path)
        if m := re.fullmatch(r"Landmarks\[(\d+)\]\.(Type|X|Y)", detail):
            return self.landmarks[(seq, int(m[1]))][m[2].lower()]
        if m := re.fullmatch(r"Emotions\[(\d+)\]\.(Type|Confidence)", detail):
            return self.emotions[(seq, int(m[1]))][m[2].lower()]
        if m := re.fullmatch(r"FaceMatches\[(\d+)\]\.Similarity", path):
            return self.matches[(seq, int(m[1]))]["similarity"]
        if m := re.fullmatch(r"FaceMatches\[(\d+)\]\.Face\.FaceId", path):
            return self.matches[(seq, int(m[1]))]["face_id"]
        if m := re.fullmatch(r"FaceMatches\[(\d+)\]\.Face\.(.+)", path):
            face_id = element["FaceMatches"][int(m[1])]["Face"]["FaceId"]
            return self.collection[face_id][_COLLECTION[m[2]]]
        return face[_FACE_DETAIL[detail]]


async def _tables(conn: asyncpg.Connection, job_id: str) -> dict[str, list[dict[str, Any]]]:
    return {t: [{k: v for k, v in dict(r).items() if k != "ingest_id"}
                for r in await conn.fetch(job_rows_sql(t), job_id)]
            for t in ("jobs", "faces", "landmarks", "emotions", "face_matches", "collection_faces")}


@pytest.mark.parametrize("kind", ["detection", "search"])
async def test_every_value_of_every_page_is_stored(kind: str, emulator: Any, settings: Settings,
                                                   db: asyncpg.Connection) -> None:
    job_id = unique_job_id(kind)
    if kind == "detection":
        fx = synth.detection_job(job_id, faces=2300, attributes="ALL", all_optional=True)
    else:
        fx = synth.search_job(job_id, persons_elements=2300, all_optional=True)
    emulator.add_job(fx)
    async with runtime(settings) as rt:
        outcome = await rt.ingestor.ingest(_ref(fx))
    assert outcome.outcome == "ingested" and outcome.pages == 3 and outcome.faces == 2300
    stored = _Db(await _tables(db, job_id))
    checked = 0
    page_meta = synth.page_body(fx, 0, 0, None)
    page_meta.pop(fx.results_key)
    for path, value in _leaves(page_meta):
        assert stored.stored(fx.results_key, path, None, {}) == value, path
        checked += 1
    for seq, element in enumerate(fx.results):
        for path, value in _leaves(element):
            assert stored.stored(fx.results_key, path, seq, element) == value, (seq, path)
            checked += 1
    assert checked > 2300 * 40
    # Every documented member occurred at least once in the data checked above.
    paths = {re.sub(r"\[\d+\]", "[]", p) for e in fx.results for p, _ in _leaves(e)}
    if kind == "detection":
        assert {"Face.FaceOccluded.Value", "Face.EyeDirection.Yaw", "Face.Emotions[].Type"} <= paths
    else:
        assert {"FaceMatches[].Face.UserId", "Person.Face.EyeDirection.Pitch", "Person.BoundingBox.Top"} <= paths


async def test_reingest_changes_no_row(emulator: Any, settings: Settings, db: asyncpg.Connection) -> None:
    fx = synth.search_job(unique_job_id("again"), persons_elements=1500)
    emulator.add_job(fx)
    async with runtime(settings) as rt:
        first = await rt.ingestor.ingest(_ref(fx))
        before = await dump_job(db, fx.job_id)
        second = await rt.ingestor.ingest(_ref(fx))
    after = await dump_job(db, fx.job_id)
    assert first.outcome == second.outcome == "ingested"
    assert before == after
    assert len(after["faces"]) == 1500 and len(after["raw_pages"]) == 2
    assert await db.fetchval("SELECT attempts FROM jobs WHERE job_id = $1", fx.job_id) == 2


async def test_job_that_shrinks_leaves_no_leftovers(emulator: Any, settings: Settings, db: asyncpg.Connection) -> None:
    job_id = unique_job_id("shrink")
    emulator.add_job(synth.detection_job(job_id, faces=2500, attributes="ALL"))
    async with runtime(settings) as rt:
        assert (await rt.ingestor.ingest(JobRef(job_id, Api.FACE_DETECTION))).faces == 2500
        emulator.add_job(synth.detection_job(job_id, faces=700, attributes="DEFAULT", seed=7))
        assert (await rt.ingestor.ingest(JobRef(job_id, Api.FACE_DETECTION))).faces == 700
    counts = await count_rows(db, job_id)
    assert counts["faces"] == 700 and counts["landmarks"] == 700 * 5 and counts["emotions"] == 0
    assert counts["raw_pages"] == 1
    assert await db.fetchval(job_rows_sql("faces", "max(face_seq)"), job_id) == 699


async def test_concurrent_duplicate_ingest_ends_with_one_ingest(emulator: Any, settings: Settings,
                                                                db: asyncpg.Connection) -> None:
    fx = synth.detection_job(unique_job_id("twice"), faces=3000, attributes="ALL")
    emulator.add_job(fx)
    async with runtime(settings) as a, runtime(settings) as b:
        outcomes = await asyncio.gather(a.ingestor.ingest(_ref(fx)), b.ingestor.ingest(_ref(fx)))
    kinds = sorted(o.outcome for o in outcomes)
    assert "ingested" in kinds and set(kinds) <= {"ingested", "busy"}
    counts = await count_rows(db, fx.job_id)
    assert counts["faces"] == 3000 and counts["landmarks"] == 3000 * 30 and counts["raw_pages"] == 3
    async with runtime(settings) as c:  # and a clean re-ingest agrees
        before = await dump_job(db, fx.job_id)
        await c.ingestor.ingest(_ref(fx))
    assert await dump_job(db, fx.job_id) == before


async def test_failure_mid_job_leaves_no_rows_only_its_quarantined_pages(emulator: Any, settings: Settings,
                                                                         db: asyncpg.Connection) -> None:
    fx = synth.detection_job(unique_job_id("midfail"), faces=2500, attributes="ALL")
    fx.results[2100]["Timestamp"] = "later"  # third page violates the model
    emulator.add_job(fx)
    async with runtime(settings) as rt:
        outcome = await rt.ingestor.ingest(_ref(fx))
    assert outcome.outcome == "failed"
    assert "Faces[2100].Timestamp" in (outcome.reason or "")
    counts = await count_rows(db, fx.job_id)
    # No row of the failed ingest; what Rekognition returned is kept (tests/test_quarantine.py).
    assert counts == {**{t: 0 for t in counts}, "jobs": 1, "raw_pages": 3}
    job = await db.fetchrow("SELECT ingest_state, failure_code, failure_reason FROM jobs WHERE job_id = $1", fx.job_id)
    assert job["ingest_state"] == "failed" and job["failure_code"] == "MalformedPage"


async def test_failed_reingest_keeps_the_previous_complete_rows(emulator: Any, settings: Settings,
                                                                db: asyncpg.Connection) -> None:
    fx = synth.detection_job(unique_job_id("keep"), faces=1200, attributes="ALL")
    emulator.add_job(fx)
    async with runtime(settings) as rt:
        await rt.ingestor.ingest(_ref(fx))
        before = await dump_job(db, fx.job_id)
        emulator.remove_job(fx.job_id)  # results expired: ResourceNotFoundException
        outcome = await rt.ingestor.ingest(_ref(fx))
    assert outcome.outcome == "failed" and "ResourceNotFoundException" in (outcome.reason or "")
    after = await dump_job(db, fx.job_id)
    assert {t: v for t, v in after.items() if t != "jobs"} == {t: v for t, v in before.items() if t != "jobs"}
    row = await db.fetchrow("SELECT ingest_state, failure_code FROM jobs WHERE job_id = $1", fx.job_id)
    assert row["ingest_state"] == "ingested" and row["failure_code"] == "ResourceNotFoundException"


async def test_readers_never_see_a_partial_job(emulator: Any, settings: Settings, db_url: str) -> None:
    fx = synth.detection_job(unique_job_id("reader"), faces=4000, attributes="DEFAULT")
    emulator.add_job(fx)
    emulator.configure(latency_s=0.15)
    seen: set[int] = set()
    done = asyncio.Event()

    async def watch() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            while not done.is_set():
                seen.add(await conn.fetchval(job_rows_sql("faces", "count(*)"), fx.job_id))
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    watcher = asyncio.create_task(watch())
    try:
        async with runtime(settings) as rt:
            outcome = await rt.ingestor.ingest(_ref(fx))
    finally:
        emulator.configure(latency_s=0.0)
        done.set()
        await watcher
    assert outcome.pages == 4
    assert seen <= {0, 4000} and 0 in seen


async def test_failed_and_in_progress_jobs(emulator: Any, settings: Settings, db: asyncpg.Connection) -> None:
    failed = synth.failed_job(unique_job_id("failed"), "GetFaceSearch", "Unsupported codec")
    running = synth.in_progress_job(unique_job_id("running"), "GetFaceDetection")
    emulator.add_jobs([failed, running])
    async with runtime(settings) as rt:
        f_out = await rt.ingestor.ingest(_ref(failed))
        r_out = await rt.ingestor.ingest(_ref(running))
    assert f_out.outcome == "failed" and f_out.reason == "Unsupported codec"
    row = await db.fetchrow("SELECT * FROM jobs WHERE job_id = $1", failed.job_id)
    assert row["ingest_state"] == "failed" and row["job_status"] == "FAILED"
    assert row["status_message"] == "Unsupported codec" and row["faces"] == 0
    assert r_out.outcome == "not_ready"
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE job_id = $1", running.job_id) == 0
    # Later it completes and ingests normally.
    emulator.add_job(synth.detection_job(running.job_id, faces=10))
    async with runtime(settings) as rt:
        assert (await rt.ingestor.ingest(_ref(running))).outcome == "ingested"


async def test_invalid_pagination_token_restarts_the_job(emulator: Any, settings: Settings,
                                                         db: asyncpg.Connection) -> None:
    fx = synth.detection_job(unique_job_id("token"), faces=2500, attributes="DEFAULT")
    emulator.add_job(fx)
    emulator.expire_tokens_once(fx.job_id)
    async with runtime(settings) as rt:
        outcome = await rt.ingestor.ingest(_ref(fx))
    assert outcome.outcome == "ingested" and outcome.faces == 2500
    assert (await count_rows(db, fx.job_id))["faces"] == 2500


@pytest.mark.parametrize("code", ["ResourceNotFoundException", "InvalidParameterException"])
async def test_permanent_errors_record_the_job_as_failed(code: str, emulator: Any, settings: Settings,
                                                         db: asyncpg.Connection) -> None:
    fx = synth.detection_job(unique_job_id("perm"), faces=5)
    fx.error = code
    emulator.add_job(fx)
    async with runtime(settings) as rt:
        outcome = await rt.ingestor.ingest(_ref(fx))
    assert outcome.outcome == "failed"
    row = await db.fetchrow("SELECT ingest_state, failure_code, failure_reason FROM jobs WHERE job_id = $1", fx.job_id)
    assert row["ingest_state"] == "failed" and row["failure_code"] == code and code in row["failure_reason"]


async def test_access_denied_keeps_the_job_and_stores_nothing(emulator: Any, settings: Settings,
                                                              db: asyncpg.Connection) -> None:
    """An IAM mistake is the deployment's, not the job's: the job is handed back, never recorded failed."""
    fx = synth.detection_job(unique_job_id("denied"), faces=5)
    fx.error = "AccessDeniedException"
    emulator.add_job(fx)
    async with runtime(settings) as rt:
        outcome = await rt.ingestor.ingest(_ref(fx))
    assert outcome.outcome == "transient" and "AccessDeniedException" in (outcome.reason or "")
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE job_id = $1", fx.job_id) == 0


async def test_faults_after_retries_are_transient_and_store_nothing(emulator: Any, settings: Settings,
                                                                   db: asyncpg.Connection) -> None:
    fx = synth.detection_job(unique_job_id("fault"), faces=5)
    emulator.add_job(fx)
    emulator.configure(fault_rate=1.0)
    try:
        async with runtime(settings) as rt:
            outcome = await rt.ingestor.ingest(_ref(fx))
    finally:
        emulator.configure(fault_rate=0.0)
    assert outcome.outcome == "transient" and "InternalServerError" in (outcome.reason or "")
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE job_id = $1", fx.job_id) == 0


async def test_several_jobs_concurrently(emulator: Any, settings: Settings, db: asyncpg.Connection) -> None:
    fixtures = [synth.detection_job(unique_job_id("many"), faces=1100 + i, attributes="DEFAULT") for i in range(5)]
    emulator.add_jobs(fixtures)
    async with runtime(settings) as rt:
        outcomes = await rt.ingestor.ingest_many([_ref(f) for f in fixtures], concurrency=3)
    assert [o.faces for o in outcomes] == [1100 + i for i in range(5)]
    assert all(o.outcome == "ingested" for o in outcomes)


async def test_duplicate_that_raced_the_first_commit_is_caught_under_the_lock(
        emulator: Any, settings: Settings, db: asyncpg.Connection) -> None:
    import time

    from worker.db.store import AlreadyIngested

    fx = synth.detection_job(unique_job_id("race"), faces=20)
    emulator.add_job(fx)
    notified_ms = int(time.time() * 1000) - 60_000
    async with runtime(settings) as rt:
        assert (await rt.ingestor.ingest(_ref(fx))).outcome == "ingested"
        before = await dump_job(db, fx.job_id)
        # The pre-check passed just before the first copy committed; the writer re-checks under the lock.
        with pytest.raises(AlreadyIngested):
            async with rt.store.job_writer(_ref(fx), skip_if_ingested_since_ms=notified_ms):
                pass
        again = await rt.ingestor.ingest(_ref(fx), skip_if_ingested_since_ms=notified_ms)
    assert again.outcome == "duplicate"
    assert await dump_job(db, fx.job_id) == before


async def test_data_errors_are_permanent_and_outages_are_not(db: asyncpg.Connection) -> None:
    from worker.ingest import _is_database_error, _is_permanent_data_error

    with pytest.raises(asyncpg.PostgresError) as division:
        await db.execute("SELECT 1 / 0")  # SQLSTATE 22012: fails the same way every time
    assert _is_permanent_data_error(division.value)
    with pytest.raises(asyncpg.PostgresError) as unique:
        await db.execute("CREATE TEMP TABLE t (k int PRIMARY KEY); INSERT INTO t VALUES (1), (1)")
    assert _is_permanent_data_error(unique.value)  # 23505
    outage = asyncpg.exceptions.AdminShutdownError("terminating connection")  # 57P01: retry later
    assert not _is_permanent_data_error(outage) and _is_database_error(outage)
    assert not _is_permanent_data_error(ConnectionRefusedError())


async def test_error_lines_carry_the_aws_request_id_and_job_lines_the_job_tag(
    emulator: Any, settings: Settings, db: asyncpg.Connection,
) -> None:
    """What AWS Support asks for (the request id) and the user's own key (the JobTag, which a backfill only
    learns from the first page) are on the lines an operator reads."""
    import structlog
    from structlog.testing import capture_logs

    tagged = dataclasses.replace(synth.detection_job(unique_job_id("tagged"), faces=3), job_tag="campaign-42")
    refused = synth.detection_job(unique_job_id("refused"), faces=3)
    refused.error = "InvalidParameterException"
    emulator.add_jobs([tagged, refused])
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
        async with runtime(settings) as rt:
            ok = await rt.ingestor.ingest(_ref(tagged))
            failed = await rt.ingestor.ingest(_ref(refused))
    assert ok.outcome == "ingested" and failed.outcome == "failed"
    finished = {e["job_id"]: e for e in events if e["event"] == "job finished"}
    assert finished[tagged.job_id]["job_tag"] == "campaign-42"
    (call,) = [e for e in events if e["event"] == "rekognition call failed"]
    assert call["aws_error_code"] == "InvalidParameterException"
    assert re.fullmatch(r"[0-9a-f-]{36}", call["aws_request_id"]), call
    assert call["aws_request_id"] in (failed.reason or "")
    row = await db.fetchrow("SELECT failure_reason FROM jobs WHERE job_id = $1", refused.job_id)
    assert call["aws_request_id"] in row["failure_reason"]
