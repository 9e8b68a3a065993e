"""The worker on a Citus cluster (`make test-citus`: a coordinator and two workers from the installed Citus).

Every command runs as a real process against a distributed database and, with the same inputs, against a
plain PostgreSQL database on the same server (the coordinator is an ordinary PostgreSQL for a database
without the extension): after each step the stored content and every reporting view must be the same.
Skipped in the ordinary suite, which has no cluster.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tests.conftest import create_database, with_database
from tests.helpers import dump_job
from tests.test_cli import run_cli
from tests.test_service_support import Queues, enveloped, make_queues, send
from worker.config import Settings
from worker.db import citus
from worker.db.migrate import upgrade_to_head
from worker.local import synth
from worker.local.citus import add_citus

needs_citus = pytest.mark.skipif(os.environ.get("TEST_CITUS") != "1",
                                 reason="needs a Citus cluster: run `make test-citus`")

KEY = "citus-test-erasure-key-of-32-bytes!!"
BULK = ("faces", "landmarks", "emotions", "face_matches", "collection_faces", "persons", "raw_pages")
JOB_LEVEL = ("jobs", "ingests", "job_retries", "erasures", "rate_limit_buckets", "submissions")
# Reporting views and the columns that say when, not what (they differ between any two runs).
VIEWS = ("job_summary", "person_appearances", "person_identities", "collection_face_sightings", "person_seconds",
         "face_observations", "pending_jobs", "submissions")
WHEN = {"ingested_at", "completed_at", "age_s", "expires_at", "submitted_at", "started_at", "finished_at",
        "notified_at", "ingest_started_at", "updated_at"}


async def _faces_per_worker(conn: asyncpg.Connection) -> dict[int, int]:
    """Face rows per worker port, counted in each shard placement."""
    rows = await conn.fetch("SELECT nodeport, result FROM run_command_on_placements('rekognition.faces', "
                            "'SELECT count(*) FROM %s')")
    out: dict[int, int] = {}
    for r in rows:
        out[r["nodeport"]] = out.get(r["nodeport"], 0) + int(r["result"])
    return out


@needs_citus
async def test_migrate_distributes_the_bulk_tables_and_keeps_job_tables_on_the_coordinator(
    db: asyncpg.Connection, db_url: str, citus_cluster: Any
) -> None:
    tables = {r["table_name"]: r for r in await db.fetch(
        "SELECT c.relname AS table_name, citus_table_type, distribution_column, colocation_id "
        "FROM citus_tables t JOIN pg_class c ON c.oid = t.table_name "
        "WHERE c.relnamespace = 'rekognition'::regnamespace")}
    assert set(tables) == set(BULK)
    assert await db.fetchval("SELECT count(*) FROM citus_tables") == len(BULK)
    kinds = {(r["citus_table_type"], r["distribution_column"]) for r in tables.values()}
    assert kinds == {("distributed", "ingest_id")}
    assert len({r["colocation_id"] for r in tables.values()}) == 1, "co-located"
    for table in JOB_LEVEL:
        assert await db.fetchval("SELECT to_regclass($1) IS NOT NULL", f"rekognition.{table}")
        assert table not in tables
    # Idempotent: a second migrate distributes nothing more and fails nothing.
    again = run_cli("migrate", env={"DATABASE_URL": db_url})
    assert again.returncode == 0, again.stderr
    assert "Distributed on Citus" not in again.stderr
    assert await db.fetchval("SELECT count(*) FROM citus_tables") == len(BULK)


@needs_citus
async def test_a_database_migrated_before_citus_converts_in_place(
    citus_cluster: Any, emulator: Any
) -> None:
    """An existing deployment: migrated and filled on plain PostgreSQL, then the extension and the workers
    are added and `migrate` moves the rows to the shards."""
    name = f"t_convert_{uuid.uuid4().hex[:8]}"
    for node in citus_cluster.nodes:
        admin = await asyncpg.connect(node.url())
        try:
            await create_database(admin, name)
        finally:
            await admin.close()
    url = with_database(citus_cluster.url(), name)
    try:
        await asyncio.to_thread(upgrade_to_head, Settings(database_url=url))
        emulator.configure(quota_tps=None, fault_rate=0.0, latency_s=0.0)
        jobs = [synth.detection_job(f"cv-det-{uuid.uuid4().hex[:8]}", faces=150, seed=n) for n in range(3)]
        emulator.add_jobs(jobs)
        env = {"DATABASE_URL": url, "AWS_ENDPOINT_URL_REKOGNITION": emulator.url}
        done = run_cli("backfill", "--api", "GetFaceDetection", *(j.job_id for j in jobs), env=env)
        assert done.returncode == 0, done.stderr
        conn = await asyncpg.connect(url)
        try:
            before = {j.job_id: await dump_job(conn, j.job_id) for j in jobs}
        finally:
            await conn.close()
        # The extension on every node, the node list on the coordinator.
        await add_citus(citus_cluster, name)
        migrated = run_cli("migrate", env={"DATABASE_URL": url})
        assert migrated.returncode == 0, migrated.stderr
        assert "Distributed on Citus by ingest_id" in migrated.stderr
        conn = await asyncpg.connect(url)
        try:
            assert {r[0] for r in await conn.fetch(
                "SELECT c.relname FROM citus_tables t JOIN pg_class c ON c.oid = t.table_name")} == set(BULK)
            assert {j.job_id: await dump_job(conn, j.job_id) for j in jobs} == before
            # Moved, not copied: the coordinator's own tables are empty.
            assert await conn.fetchval("SELECT count(*) FROM ONLY rekognition.faces") == 0 or \
                await conn.fetchval("SELECT pg_relation_size('rekognition.faces')") == 0
            assert sum((await _faces_per_worker(conn)).values()) == 450
        finally:
            await conn.close()
    finally:
        for node in citus_cluster.nodes:
            admin = await asyncpg.connect(node.url())
            try:
                await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()


@pytest.fixture
async def plain_url(pg_server_url: str) -> AsyncIterator[str]:
    """A database on the coordinator's server without the citus extension: one plain PostgreSQL."""
    name = f"t_plain_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_server_url)
    try:
        await create_database(admin, name)
    finally:
        await admin.close()
    url = with_database(pg_server_url, name)
    await asyncio.to_thread(upgrade_to_head, Settings(database_url=url))
    yield url
    admin = await asyncpg.connect(pg_server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


async def _state(url: str) -> dict[str, Any]:
    """What a user sees: every job's rows (without keys and times), every reporting view, the erasure audit."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET search_path = rekognition, public")
        out: dict[str, Any] = {}
        for job_id in [r[0] for r in await conn.fetch("SELECT job_id FROM jobs ORDER BY 1")]:
            out[f"job {job_id}"] = await dump_job(conn, job_id)
        for view in VIEWS:
            rows = await conn.fetch(f"SELECT * FROM reporting.{view}")
            out[f"view {view}"] = sorted((tuple((k, _plain(v)) for k, v in r.items() if k not in WHEN) for r in rows),
                                         key=repr)
        segments = []
        for job_id in [r[0] for r in await conn.fetch("SELECT job_id FROM reporting.job_summary ORDER BY 1")]:
            segments.append((job_id, [tuple(r) for r in await conn.fetch(
                "SELECT * FROM reporting.person_segments($1, 1000)", job_id)]))
        out["person_segments"] = segments
        out["erasures"] = [tuple(r) for r in await conn.fetch(
            "SELECT selector_kind, selector_hash, jobs, collection_faces, face_matches, persons, faces, landmarks, "
            "emotions, pages_rewritten FROM erasures ORDER BY id")]
        # Nothing left behind under keys no job names.
        out["unnamed keys"] = await conn.fetchval(
            "SELECT count(*) FROM ingests i WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.ingest_id = i.ingest_id)")
        return out
    finally:
        await conn.close()


async def _same(citus_url: str, plain_url: str, step: str) -> dict[str, Any]:
    on_citus, on_plain = await _state(citus_url), await _state(plain_url)
    assert on_citus.keys() == on_plain.keys(), step
    for key in on_citus:
        assert on_citus[key] == on_plain[key], f"{step}: {key} differs between Citus and one PostgreSQL"
    return on_citus


def _ok(result: Any) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


@needs_citus
@pytest.mark.usefixtures("rekognition_endpoint")
async def test_every_command_leaves_the_same_content_and_views_as_one_postgresql(
    db_url: str, plain_url: str, emulator: Any, sqs: Any, moto_url: str
) -> None:
    emulator.configure(quota_tps=None, fault_rate=0.0, latency_s=0.0)
    tag = uuid.uuid4().hex[:8]
    detections = [synth.detection_job(f"ct-det{n}-{tag}", faces=250, attributes="ALL", seed=n) for n in range(2)]
    searches = [synth.search_job(f"ct-search{n}-{tag}", persons_elements=300, persons=5, seed=n, all_optional=True)
                for n in range(2)]
    queued = synth.search_job(f"ct-queued-{tag}", persons_elements=120, persons=4, seed=7)
    emulator.add_jobs([*detections, *searches, queued])
    urls = (db_url, plain_url)

    def each(*args: str, **env: str) -> None:
        for url in urls:
            _ok(run_cli(*args, env={"DATABASE_URL": url, "AWS_ENDPOINT_URL_REKOGNITION": emulator.url,
                                    "PAGE_SIZE": "100", "ERASURE_HASH_KEY": KEY, **env}, timeout_s=180))

    # Backfill of both APIs.
    each("backfill", "--api", "GetFaceDetection", *(j.job_id for j in detections))
    each("backfill", "--api", "StartFaceSearch", *(j.job_id for j in searches))
    state = await _same(db_url, plain_url, "backfill")
    assert len([k for k in state if k.startswith("job ")]) == 4
    conn = await asyncpg.connect(db_url)
    try:
        per_worker = await _faces_per_worker(conn)
        assert len(per_worker) == 2
        assert all(n > 0 for n in per_worker.values()), f"face rows on both workers: {per_worker}"
        assert sum(per_worker.values()) == 2 * 250 + 2 * 300
        # The coordinator keeps no bulk rows of its own.
        assert await conn.fetchval("SELECT pg_relation_size('rekognition.faces')") == 0
    finally:
        await conn.close()

    # A re-ingest of one job (a new key, the old one dropped).
    each("backfill", "--api", "FACE_DETECTION", detections[0].job_id)
    await _same(db_url, plain_url, "re-ingest")

    # The SQS path: `run --exit-when-idle` drains one notification per database.
    for url in urls:
        queues: Queues = await make_queues(sqs)
        await send(sqs, queues.url, enveloped(queued))
        _ok(run_cli("run", "--exit-when-idle", env={
            "DATABASE_URL": url, "QUEUE_URL": queues.url, "AWS_ENDPOINT_URL_SQS": moto_url,
            "AWS_ENDPOINT_URL_REKOGNITION": emulator.url, "HEALTH_PORT": "0", "POLL_WAIT_S": "1",
            "PAGE_SIZE": "100", "AWS_REGION": "us-east-1"}, timeout_s=180))
    state = await _same(db_url, plain_url, "run (SQS)")
    assert f"job {queued.job_id}" in state

    # erase of a collection face's external image id, then reprocess --all from the rewritten archive.
    conn = await asyncpg.connect(db_url)
    try:
        target = await conn.fetchval("SELECT external_image_id FROM rekognition.collection_faces "
                                     "WHERE external_image_id IS NOT NULL GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1")
    finally:
        await conn.close()
    assert target
    each("erase", "--external-image-id", target)
    state = await _same(db_url, plain_url, "erase")
    assert len(state["erasures"]) == 1 and state["erasures"][0][2] > 0
    each("reprocess", "--all")
    await _same(db_url, plain_url, "reprocess --all")

    # delete of one job, then of the rest by ingest time.
    each("delete", searches[1].job_id)
    state = await _same(db_url, plain_url, "delete")
    assert f"job {searches[1].job_id}" not in state
    each("delete", "--ingested-before", "2999-01-01T00:00:00+00:00")
    state = await _same(db_url, plain_url, "delete --ingested-before")
    assert not [k for k in state if k.startswith("job ")]
    conn = await asyncpg.connect(db_url)
    try:
        assert sum((await _faces_per_worker(conn)).values()) == 0
        for table in BULK:
            assert await conn.fetchval(f"SELECT count(*) FROM rekognition.{table}") == 0, table
    finally:
        await conn.close()


_RELATIONS = ("SELECT relname, relkind, relpersistence FROM pg_class "
              "WHERE relnamespace = 'rekognition'::regnamespace ORDER BY 1")


async def test_the_distribution_step_changes_nothing_on_plain_postgresql(settings: Settings) -> None:
    """On a database without the extension (the ordinary suite's) `migrate` ran the step, which found
    nothing to do: no Citus catalog, every table a plain one, and running it again changes nothing."""
    from worker.db.engine import create_engine

    engine = create_engine(settings, pool_size=1)
    try:
        async with engine.connect() as conn:
            if await conn.run_sync(citus.has_citus):
                pytest.skip("this database has the citus extension")
            before = (await conn.exec_driver_sql(_RELATIONS)).all()
            assert await conn.run_sync(citus.distribute) == []
            assert (await conn.exec_driver_sql("SELECT to_regclass('pg_dist_partition')")).scalar() is None
            after = (await conn.exec_driver_sql(_RELATIONS)).all()
            assert after == before and {r[0] for r in before} >= set(BULK)
    finally:
        await engine.dispose()
