"""delete, retention and erase against real PostgreSQL, with jobs ingested from the emulator over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY

from tests.conftest import unique_job_id
from tests.helpers import COUNTED, KEY_OF, TABLES, count_rows, dump_job, job_rows_sql, runtime
from tests.test_cli import run_cli
from worker.archive import ArchivedPage
from worker.config import Settings
from worker.db.engine import create_engine
from worker.lifecycle import JOB_TABLES, purge_expired, retention_loop, run_delete
from worker.local import synth
from worker.messages import JobRef
from worker.reprocess import run_reprocess

KEY = "test-erasure-key-of-at-least-32-bytes"
COUNTERS = ("faces", "persons", "face_matches", "collection_faces", "landmarks", "emotions")


async def _ingest(settings: Settings, emulator: Any, fixtures: list[synth.JobFixture]) -> None:
    emulator.add_jobs(fixtures)
    async with runtime(settings) as rt:
        for fx in fixtures:
            assert (await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))).outcome == "ingested"


async def _dump_all(db: asyncpg.Connection) -> dict[str, Any]:
    ids = [r["job_id"] for r in await db.fetch("SELECT job_id FROM jobs ORDER BY job_id")]
    return {job_id: await dump_job(db, job_id) for job_id in ids}


async def _text_columns(db: asyncpg.Connection) -> list[tuple[str, str]]:
    return [(r["table_name"], r["column_name"]) for r in await db.fetch(
        "SELECT c.table_name, c.column_name FROM information_schema.columns c JOIN information_schema.tables t "
        "USING (table_schema, table_name) WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE' "
        "AND c.data_type IN ('text', 'character varying') AND c.table_name <> 'alembic_version'")]


async def _stored_anywhere(db: asyncpg.Connection, needles: set[str]) -> list[str]:
    """Where any needle occurs: a text column of any table, or a decompressed raw page."""
    found = []
    for table, column in await _text_columns(db):
        for needle in needles:
            if await db.fetchval(f"SELECT count(*) FROM {table} WHERE strpos({column}, $1) > 0", needle):
                found.append(f"{table}.{column} holds {needle}")
    for r in await db.fetch("SELECT i.job_id, r.page_no, r.encoding, r.body, r.body_bytes FROM raw_pages r "
                            "JOIN ingests i USING (ingest_id)"):
        raw = ArchivedPage(bytes(r["body"]), r["body_bytes"], r["encoding"]).decompress().decode()
        found += [f"raw page {r['job_id']}/{r['page_no']} holds {n}" for n in needles if n in raw]
    return found


def _without_seq(rows: list[tuple[Any, ...]]) -> Counter[tuple[Any, ...]]:
    # Arrays (a face's landmarks, emotions) as tuples, so rows can be counted.
    return Counter(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in row if k != "face_seq")
                   for row in rows)


async def _check_counters(db: asyncpg.Connection) -> None:
    for job in await db.fetch("SELECT * FROM jobs"):
        for name in COUNTERS:
            counted = COUNTED.get(name, "count(*)")
            assert job[name] == await db.fetchval(job_rows_sql(name, counted), job["job_id"]), \
                (job["job_id"], name)


def _expected_after_erase(before: dict[str, Any], face_ids: set[str]) -> dict[str, Any]:
    """Every job's dump with the erased entries removed, as the erase defines them (jobs and raw pages aside)."""
    out: dict[str, Any] = {}
    for job_id, dump in before.items():
        rows = {t: [dict(row) for row in rows] for t, rows in dump.items()}
        seq_person = {f["face_seq"]: f["person_index"] for f in rows["faces"]}
        persons = {seq_person[m["face_seq"]] for m in rows["face_matches"]
                   if m["face_id"] in face_ids and seq_person[m["face_seq"]] is not None}
        seqs = {s for s, p in seq_person.items() if p in persons}
        keep: dict[str, list[dict[str, Any]]] = {
            "faces": [f for f in rows["faces"] if f["face_seq"] not in seqs],
            "landmarks": [r for r in rows["landmarks"] if r["face_seq"] not in seqs],
            "emotions": [r for r in rows["emotions"] if r["face_seq"] not in seqs],
            "face_matches": [m for m in rows["face_matches"] if m["face_seq"] not in seqs
                             and m["face_id"] not in face_ids],
            "persons": [p for p in rows["persons"] if p["person_index"] not in persons],
        }
        matched = {m["face_id"] for m in keep["face_matches"]}
        keep["collection_faces"] = [c for c in rows["collection_faces"] if c["face_id"] in matched]
        out[job_id] = {t: sorted((tuple(r.items()) for r in v), key=repr) for t, v in keep.items()}
    return out


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_erase_external_image_id_leaves_no_trace_and_reprocess_keeps_it_gone(
    emulator: Any, settings: Settings, db: asyncpg.Connection, db_url: str
) -> None:
    async with asyncio.timeout(150):
        searches = [synth.search_job(unique_job_id(f"er-s{n}"), persons_elements=700, persons=6, seed=0,
                                     all_optional=True) for n in range(3)]
        det = synth.detection_job(unique_job_id("er-det"), faces=300, attributes="ALL")
        await _ingest(settings.with_(page_size=200), emulator, [*searches, det])
        target = await db.fetchval("SELECT external_image_id FROM collection_faces GROUP BY 1 "
                                   "ORDER BY count(*) DESC, 1 LIMIT 1")
        erased = await db.fetch("SELECT DISTINCT face_id, image_id, user_id FROM collection_faces "
                                "WHERE external_image_id = $1", target)
        face_ids = {r["face_id"] for r in erased}
        needles = {target, *face_ids, *(r["image_id"] for r in erased), *(r["user_id"] for r in erased)}
        before = await _dump_all(db)
        assert await _stored_anywhere(db, needles)

        dry = run_cli("erase", "--external-image-id", target, "--dry-run",
                      env={"DATABASE_URL": db_url, "ERASURE_HASH_KEY": KEY})
        assert dry.returncode == 0, dry.stderr
        assert "would remove" in dry.stdout and target not in dry.stdout
        assert await _dump_all(db) == before
        assert await db.fetchval("SELECT count(*) FROM erasures") == 0

        refused = run_cli("erase", "--external-image-id", target, env={"DATABASE_URL": db_url})
        assert refused.returncode == 2 and "ERASURE_HASH_KEY" in refused.stderr

        result = run_cli("erase", "--external-image-id", target, env={"DATABASE_URL": db_url, "ERASURE_HASH_KEY": KEY})
        assert result.returncode == 0, result.stderr

        assert await _stored_anywhere(db, needles) == []
        after = await _dump_all(db)
        expected = _expected_after_erase(before, face_ids)
        touched = set()
        for job_id, dump in after.items():
            assert {t: dump[t] for t in expected[job_id]} == expected[job_id], job_id
            skip = set(COUNTERS)
            assert [{k: v for k, v in r if k not in skip} for r in dump["jobs"]] == \
                [{k: v for k, v in r if k not in skip} for r in before[job_id]["jobs"]]
            pages_before = {dict(r)["page_no"]: dict(r) for r in before[job_id]["raw_pages"]}
            pages_after = {dict(r)["page_no"]: dict(r) for r in dump["raw_pages"]}
            assert pages_before.keys() == pages_after.keys()
            if pages_before != pages_after:
                touched.add(job_id)
        assert touched == {fx.job_id for fx in searches}  # every search job saw the target; detection is untouched
        assert after[det.job_id] == before[det.job_id]
        await _check_counters(db)

        audit = await db.fetchrow("SELECT * FROM erasures")
        assert audit["selector_kind"] == "external_image_id"
        assert audit["selector_hash"] == hmac.new(KEY.encode(), f"external_image_id:{target}".encode(),
                                                  hashlib.sha256).hexdigest()
        assert audit["jobs"] == 3 and audit["pages_rewritten"] > 0 and audit["persons"] > 0
        assert audit["faces"] == sum(len(before[j]["faces"]) - len(after[j]["faces"]) for j in before)
        # Landmarks are counted one by one (a face's row holds them as arrays), as the jobs counters count them.
        assert audit["landmarks"] == sum(len(dict(r)["types"]) for j in before for r in before[j]["landmarks"]) - \
            sum(len(dict(r)["types"]) for j in after for r in after[j]["landmarks"])
        assert target not in repr(dict(audit))

        views = {v: await db.fetch(f"SELECT * FROM reporting.{v} ORDER BY 1, 2, 3")
                 for v in ("person_appearances", "person_identities", "collection_face_sightings", "person_seconds")}
        summary = await db.fetch("SELECT * FROM reporting.job_summary ORDER BY job_id")
        outcomes = await run_reprocess(settings, None)
        assert {o.outcome for o in outcomes} == {"ingested"} and len(outcomes) == 4
        assert await _stored_anywhere(db, needles) == []
        rebuilt = await _dump_all(db)
        for job_id in after:
            for table in ("faces", "landmarks", "emotions", "face_matches"):
                assert _without_seq(rebuilt[job_id][table]) == _without_seq(after[job_id][table]), (job_id, table)
            for table in ("persons", "collection_faces", "raw_pages"):
                assert rebuilt[job_id][table] == after[job_id][table], (job_id, table)
        await _check_counters(db)
        for view, rows in views.items():
            assert await db.fetch(f"SELECT * FROM reporting.{view} ORDER BY 1, 2, 3") == rows, view
        skip = {"attempts", "ingest_started_at", "ingested_at", "updated_at"}
        assert [{k: v for k, v in dict(r).items() if k not in skip} for r in summary] == [
            {k: v for k, v in dict(r).items() if k not in skip}
            for r in await db.fetch("SELECT * FROM reporting.job_summary ORDER BY job_id")]


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_erase_reaches_quarantined_pages_of_a_failed_job(
    emulator: Any, settings: Settings, db: asyncpg.Connection
) -> None:
    from worker.lifecycle import erase

    async with asyncio.timeout(60):
        fx = synth.search_job(unique_job_id("er-failed"), persons_elements=200, seed=0)
        await _ingest(settings, emulator, [fx])
        target = await db.fetchval("SELECT external_image_id FROM collection_faces ORDER BY 1 LIMIT 1")
        # As a quarantine leaves it: failed, no rows, the raw pages kept.
        for table in ("faces", "landmarks", "emotions", "face_matches", "collection_faces", "persons"):
            await db.execute(f"DELETE FROM {table} WHERE {KEY_OF}", fx.job_id)
        await db.execute("UPDATE jobs SET ingest_state = 'failed', ingested_at = NULL, faces = 0, persons = 0, "
                         "face_matches = 0, collection_faces = 0, landmarks = 0, emotions = 0 WHERE job_id = $1",
                         fx.job_id)
        assert await _stored_anywhere(db, {target})
        result = await erase(db, "external_image_id", target, key=KEY)
        assert result.counts["pages_rewritten"] > 0 and await _stored_anywhere(db, {target}) == []


def _purged(table: str) -> float:
    return REGISTRY.get_sample_value("rekognition_worker_retention_rows_purged_total", {"table": table}) or 0.0


async def _set_times(db: asyncpg.Connection, job_id: str, days_ago: float, state: str = "ingested") -> None:
    at = datetime.now(tz=UTC) - timedelta(days=days_ago)
    await db.execute("UPDATE jobs SET ingest_state = $2::ingest_state, ingested_at = CASE WHEN $2 = 'ingested' "
                     "THEN $3::timestamptz END, updated_at = $3 WHERE job_id = $1", job_id, state, at)


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_delete_removes_every_row_of_the_job_and_nothing_else(
    emulator: Any, settings: Settings, db: asyncpg.Connection, db_url: str
) -> None:
    async with asyncio.timeout(120):
        big = synth.detection_job(unique_job_id("del-big"), faces=450, attributes="ALL")
        small, other = (synth.search_job(unique_job_id(f"del-{n}"), persons_elements=150) for n in ("s", "o"))
        await _ingest(settings.with_(page_size=100), emulator, [big, small, other])
        await db.execute("INSERT INTO job_retries (job_id, api, failures) VALUES ($1, 'FACE_DETECTION', 1)", big.job_id)
        before = await _dump_all(db)

        dry = run_cli("delete", big.job_id, small.job_id, "--dry-run", "--format", "table",
                      env={"DATABASE_URL": db_url})
        assert dry.returncode == 0, dry.stderr
        assert "would be deleted" in dry.stdout and big.job_id in dry.stdout
        assert await _dump_all(db) == before

        # A chunk of 100 faces: the large job goes in several transactions.
        [removal] = await run_delete(settings, [big.job_id], chunk_faces=100)
        assert removal.outcome == "deleted"
        assert removal.rows == {t: len(before[big.job_id][t]) for t in TABLES} | {"job_retries": 1, "ingests": 1}
        result = run_cli("delete", small.job_id, env={"DATABASE_URL": db_url})
        assert result.returncode == 0, result.stderr
        for job_id in (big.job_id, small.job_id):
            assert set((await count_rows(db, job_id)).values()) == {0}
            assert await db.fetchval("SELECT count(*) FROM job_retries WHERE job_id = $1", job_id) == 0
        assert await _dump_all(db) == {other.job_id: before[other.job_id]}
        missing = run_cli("delete", small.job_id, env={"DATABASE_URL": db_url})
        assert missing.returncode == 3 and "no such job" in missing.stderr  # not found (docs/cli.md)


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_delete_ingested_before_removes_exactly_those_jobs(
    emulator: Any, settings: Settings, db: asyncpg.Connection, db_url: str
) -> None:
    async with asyncio.timeout(90):
        fxs = [synth.detection_job(unique_job_id(f"del-t{n}"), faces=60) for n in range(4)]
        await _ingest(settings, emulator, fxs)
        for fx, days in zip(fxs, (10, 5, 1, 30), strict=True):
            await _set_times(db, fx.job_id, days, "failed" if days == 30 else "ingested")
        cutoff = (datetime.now(tz=UTC) - timedelta(days=3)).isoformat()
        before = await _dump_all(db)
        dry = run_cli("delete", "--ingested-before", cutoff, "--dry-run", env={"DATABASE_URL": db_url})
        assert dry.returncode == 0, dry.stderr
        assert fxs[0].job_id in dry.stdout and fxs[1].job_id in dry.stdout and fxs[2].job_id not in dry.stdout
        assert await _dump_all(db) == before
        result = run_cli("delete", "--ingested-before", cutoff, env={"DATABASE_URL": db_url})
        assert result.returncode == 0, result.stderr
        # Ingested 10 and 5 days ago go; the recent job and the failed one (no ingested_at) stay.
        assert await _dump_all(db) == {fx.job_id: before[fx.job_id] for fx in (fxs[2], fxs[3])}


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_retention_purges_old_jobs_one_replica_at_a_time(
    emulator: Any, settings: Settings, db: asyncpg.Connection
) -> None:
    async with asyncio.timeout(90):
        fxs = [synth.detection_job(unique_job_id(f"ret-{n}"), faces=60) for n in range(5)]
        await _ingest(settings, emulator, fxs)
        old, recent, old_failed, recent_failed, kept = fxs
        await _set_times(db, old.job_id, 40)
        await _set_times(db, recent.job_id, 2)
        await _set_times(db, old_failed.job_id, 40, "failed")
        await _set_times(db, recent_failed.job_id, 2, "failed")
        stay = {fx.job_id: await dump_job(db, fx.job_id) for fx in (recent, recent_failed, kept)}
        engine = create_engine(settings, pool_size=3)
        try:
            # Another replica holds the purge lock: this one does nothing.
            holder = await asyncpg.connect(settings.asyncpg_dsn)
            assert await holder.fetchval("SELECT pg_try_advisory_lock(hashtextextended('worker.retention', 0))")
            assert await purge_expired(engine, 30, now=datetime.now(tz=UTC)) is None
            await holder.close()
            assert await db.fetchval("SELECT count(*) FROM jobs") == 5

            # Two purgers at once: never both at work, every expired job removed once.
            purged_before = _purged("landmarks")
            results = await asyncio.gather(*(purge_expired(engine, 30, now=datetime.now(tz=UTC)) for _ in range(2)))
            # The loser found the lock taken (None), or ran after the winner and found nothing left.
            assert [r.jobs for r in results if r is not None and r.jobs] == [2]
            assert _purged("landmarks") - purged_before == \
                sum(r.rows.get("landmarks", 0) for r in results if r is not None) > 0
            assert {fx.job_id: await dump_job(db, fx.job_id) for fx in (recent, recent_failed, kept)} == stay
            assert await db.fetchval("SELECT count(*) FROM jobs") == 3

            # The loop in `run`, its clock 5 days ahead and 6 days of retention: the 2-day-old jobs are now 7 days
            # old and go, the job ingested just now (5 days old by that clock) stays.
            stop = asyncio.Event()
            loop = asyncio.create_task(retention_loop(
                engine, settings.with_(retention_days=6.0, retention_interval_s=0.05), stop,
                clock=lambda: datetime.now(tz=UTC) + timedelta(days=5)))
            while await db.fetchval("SELECT count(*) FROM jobs WHERE job_id = ANY($1)",
                                    [recent.job_id, recent_failed.job_id]):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # a few more passes: nothing else goes
            stop.set()
            await loop
            assert [r["job_id"] for r in await db.fetch("SELECT job_id FROM jobs")] == [kept.job_id]
            for table in JOB_TABLES:
                column = "job_id" if table in ("jobs", "ingests", "job_retries") else "ingest_id"
                assert await db.fetchval(f"SELECT count(*) FROM {table} t WHERE t.{column} IS DISTINCT FROM "
                                         f"(SELECT {column} FROM jobs WHERE job_id = $1)", kept.job_id) == 0
        finally:
            await engine.dispose()


def test_retention_settings() -> None:
    assert Settings.from_env({}).retention_days is None
    s = Settings.from_env({"RETENTION_DAYS": "30", "RETENTION_INTERVAL_S": "60", "ERASURE_HASH_KEY": KEY})
    assert (s.retention_days, s.retention_interval_s, s.erasure_hash_key) == (30.0, 60.0, KEY)
    assert KEY not in repr(s)
    from worker.errors import ConfigError
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ConfigError):
            Settings.from_env({"RETENTION_DAYS": bad})


def test_page_rewrite_keeps_other_members() -> None:
    from worker.lifecycle import _rewrite_page

    body = orjson.loads(orjson.dumps({"JobStatus": "SUCCEEDED", "NextToken": "t", "Persons": [
        {"Timestamp": 1, "Person": {"Index": 0}, "FaceMatches": [{"Face": {"FaceId": "a"}}, {"Face": {"FaceId": "b"}}]},
        {"Timestamp": 2, "Person": {"Index": 1}, "FaceMatches": [{"Face": {"FaceId": "c"}}]},
        {"Timestamp": 3, "Person": {"Index": 2}, "FaceMatches": []}]}))
    assert _rewrite_page(body, "ExternalImageId", "x", {"a"}, {1})
    assert body == {"JobStatus": "SUCCEEDED", "NextToken": "t", "Persons": [
        {"Timestamp": 1, "Person": {"Index": 0}, "FaceMatches": [{"Face": {"FaceId": "b"}}]},
        {"Timestamp": 3, "Person": {"Index": 2}, "FaceMatches": []}]}


async def test_run_purges_with_retention_days_set(settings: Settings, sqs: Any, db: asyncpg.Connection) -> None:
    from tests.test_service_support import make_queues
    from worker.service import SqsWorker, run_service

    async with asyncio.timeout(60):
        queues = await make_queues(sqs, visibility_timeout_s=2, max_receive_count=2)
        for job_id, days in (("ret-run-old", 40), ("ret-run-new", 1)):
            key = await db.fetchval("SELECT nextval('ingest_ids')")
            await db.execute("INSERT INTO jobs (job_id, api, ingest_state, updated_at, ingest_id) VALUES "
                             "($1, 'FACE_SEARCH', 'failed', now() - make_interval(days => $2), $3)", job_id, days, key)
            await db.execute("INSERT INTO ingests (ingest_id, job_id) VALUES ($1, $2)", key, job_id)
            await db.execute("INSERT INTO raw_pages (ingest_id, page_no, encoding, body, body_bytes) "
                             "VALUES ($1, 0, 'zstd+json', '\\x00', 1)", key)
        passes = REGISTRY.get_sample_value("rekognition_worker_retention_passes_total", {"outcome": "done"}) or 0.0
        workers: list[SqsWorker] = []
        service = asyncio.create_task(run_service(settings.with_(
            queue_url=queues.url, poll_wait_s=1, health_port=0, retention_days=30.0, retention_interval_s=0.05),
            ready=workers.append))
        while await db.fetchval("SELECT count(*) FROM jobs WHERE job_id = 'ret-run-old'"):
            await asyncio.sleep(0.05)
        workers[0].request_stop()
        assert await service == 0
        assert [r["job_id"] for r in await db.fetch(
            "SELECT i.job_id FROM raw_pages r JOIN ingests i USING (ingest_id)")] == ["ret-run-new"]
        assert (REGISTRY.get_sample_value("rekognition_worker_retention_passes_total",
                                          {"outcome": "done"}) or 0.0) > passes
