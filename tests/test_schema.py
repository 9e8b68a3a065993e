"""The migrated schema agrees with the normalizer, keys the bulk tables by ingest key, and migrates both ways."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
import sqlalchemy as sa
from alembic import command

from worker import normalize
from worker.config import Settings
from worker.db import schema, store
from worker.db.migrate import alembic_config, head_revision

COLUMNS = {
    "faces": normalize.FACE_COLUMNS, "landmarks": normalize.LANDMARK_COLUMNS, "emotions": normalize.EMOTION_COLUMNS,
    "face_matches": normalize.MATCH_COLUMNS, "collection_faces": normalize.COLLECTION_FACE_COLUMNS,
}
# The store's COPY column lists, derived from worker/db/schema.py.
COPY_COLUMNS = {
    "faces": store.FACE_COLUMNS, "landmarks": store.LANDMARK_COLUMNS, "emotions": store.EMOTION_COLUMNS,
    "face_matches": store.MATCH_COLUMNS, "collection_faces": store.COLLECTION_FACE_COLUMNS,
}
# Columns that hold Rekognition's enumeration values: text since 0005, so newer values are stored as sent.
ENUM_COLUMNS = {("faces", "gender_value"), ("jobs", "color_range"), ("jobs", "job_status")}
# Landmark and emotion types: text arrays since 0012 (one row per face).
ENUM_ARRAY_COLUMNS = {("landmarks", "types"), ("emotions", "types")}
OLD_ENUM_TYPES = ("landmark_type", "emotion_type", "gender", "color_range", "job_status")


async def test_copy_columns_match_the_tables(db: asyncpg.Connection) -> None:
    for table, columns in COLUMNS.items():
        rows = await db.fetch("SELECT column_name FROM information_schema.columns WHERE table_schema = 'rekognition' "
                              "AND table_name = $1 ORDER BY ordinal_position", table)
        in_table = tuple(r["column_name"] for r in rows)
        # Every column is written, by name; the table lays them out its own way (against alignment padding).
        assert sorted(in_table) == sorted(columns), table
        assert in_table == schema.columns(schema.metadata.tables[f"rekognition.{table}"]), table


def test_normalizer_rows_are_in_the_store_copy_column_order() -> None:
    # The normalizer's tuples are positional: COPY writes value i into the column named i-th in the store's list.
    for table, columns in COLUMNS.items():
        assert COPY_COLUMNS[table] == columns, table
        assert sorted(columns) == sorted(schema.columns(schema.metadata.tables[f"rekognition.{table}"])), table


def test_the_normalizer_does_not_import_sqlalchemy() -> None:
    # It runs in the decoding processes: importing SQLAlchemy there would cost each one its start-up time.
    import subprocess
    import sys

    code = "import sys, worker.normalize; print(any(m.split('.')[0] == 'sqlalchemy' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


async def test_check_constraints_are_declared_in_schema_py(db: asyncpg.Connection) -> None:
    # Autogenerate does not compare CHECK constraints: their names and tables are compared here.
    rows = await db.fetch("SELECT c.conrelid::regclass::text AS tbl, c.conname FROM pg_constraint c "
                          "JOIN pg_namespace n ON n.oid = c.connamespace "
                          "WHERE n.nspname = 'rekognition' AND c.contype = 'c'")
    declared = {(t.name, c.name) for t in schema.metadata.tables.values()
                for c in (*t.constraints, *(k for col in t.c for k in col.constraints))
                if isinstance(c, sa.CheckConstraint)}
    assert {(r["tbl"], r["conname"]) for r in rows} == declared


async def test_enumeration_columns_are_text_and_the_old_types_are_gone(db: asyncpg.Connection) -> None:
    for table, column in ENUM_COLUMNS:
        data_type = await db.fetchval("SELECT data_type FROM information_schema.columns "
                                      "WHERE table_schema = 'rekognition' AND table_name = $1 AND column_name = $2",
                                      table, column)
        assert data_type == "text", (table, column)
    for table, column in ENUM_ARRAY_COLUMNS:
        udt = await db.fetchval("SELECT udt_name FROM information_schema.columns "
                                "WHERE table_schema = 'rekognition' AND table_name = $1 AND column_name = $2",
                                table, column)
        assert udt == "_text", (table, column)
    assert await db.fetch("SELECT typname FROM pg_type WHERE typname = ANY($1)", list(OLD_ENUM_TYPES)) == []


async def test_result_tables_have_an_index_led_by_the_ingest_key(db: asyncpg.Connection) -> None:
    # What a key's rows are read and deleted by; the JobId itself is in jobs and ingests only.
    for table in ("faces", "landmarks", "emotions", "face_matches", "collection_faces", "persons", "raw_pages"):
        first_keys = {r["attname"] for r in await db.fetch(
            """SELECT a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0]
               WHERE c.relname = $1 AND c.relnamespace = 'rekognition'::regnamespace""", table)}
        assert "ingest_id" in first_keys, table
        assert await db.fetchval("SELECT count(*) FROM information_schema.columns WHERE table_schema = 'rekognition' "
                                 "AND table_name = $1 AND column_name = 'job_id'", table) == 0, table


async def test_schema_is_at_head(db: asyncpg.Connection) -> None:
    assert await db.fetchval("SELECT version_num FROM alembic_version") == head_revision()


async def test_downgrade_and_upgrade_round_trip(db_url: str, db: asyncpg.Connection) -> None:
    cfg = alembic_config(Settings(database_url=db_url))
    await asyncio.to_thread(command.downgrade, cfg, "base")
    assert await db.fetchval("SELECT to_regclass('public.faces')") is None
    await asyncio.to_thread(command.upgrade, cfg, "head")
    assert await db.fetchval("SELECT to_regclass('public.faces')") is None
    assert await db.fetchval("SELECT to_regclass('rekognition.faces')") == "faces"
    assert await db.fetchval("SELECT to_regclass('reporting.job_summary')") == "reporting.job_summary"


async def test_job_id_pattern_is_enforced_by_the_database(db: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO jobs (job_id, api, ingest_state) VALUES ('bad id', 'FACE_SEARCH', 'failed')")


async def _reporting_surface(db: asyncpg.Connection, role: str) -> dict[str, tuple[object, ...]]:
    """Per reporting view: its definition, columns, whether ``role`` may read it, its comments."""
    rows = await db.fetch(
        """SELECT c.relname, pg_get_viewdef(c.oid) AS definition, has_table_privilege($1, c.oid, 'SELECT') AS readable,
                  obj_description(c.oid, 'pg_class') AS comment,
                  (SELECT array_agg(a.attname || '=' || coalesce(col_description(c.oid, a.attnum), '')
                                    ORDER BY a.attnum)
                   FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0) AS columns
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'reporting' AND c.relkind = 'v'""", role)
    return {r["relname"]: (r["definition"], r["readable"], r["comment"], tuple(r["columns"])) for r in rows}


async def test_0012_carries_jobs_over_and_back(db_url: str, db: asyncpg.Connection) -> None:
    # A job with rows at 0010 (JobId in every row) reads the same through the views at 0012 and back at 0010.
    cfg = alembic_config(Settings(database_url=db_url))
    await asyncio.to_thread(command.downgrade, cfg, "0010")
    await db.execute("INSERT INTO jobs (job_id, api, job_status, ingest_state, faces, persons) "
                     "VALUES ('k-1', 'FACE_SEARCH', 'SUCCEEDED', 'ingested', 2, 1)")
    await db.execute("INSERT INTO faces (job_id, face_seq, timestamp_ms, person_index, has_face, gender_value, "
                     "smile_value, smile_confidence, pose_yaw) "
                     "VALUES ('k-1', 0, 0, 3, true, 'Female', true, 91.5, -2.25), "
                     "('k-1', 1, 1500, 3, false, NULL, NULL, NULL, NULL)")
    await db.execute("INSERT INTO landmarks (job_id, face_seq, ordinal, type, x, y) "
                     "VALUES ('k-1', 0, 0, 'nose', 0.5, 0.25)")
    await db.execute("INSERT INTO face_matches (job_id, face_seq, ordinal, face_id, similarity) "
                     "VALUES ('k-1', 0, 0, 'f-1', 99.5)")
    await db.execute("INSERT INTO collection_faces (job_id, face_id, external_image_id) VALUES ('k-1', 'f-1', 'ann')")
    await db.execute("INSERT INTO persons VALUES ('k-1', 3, 0, 1500, 2)")
    await db.execute("INSERT INTO raw_pages (job_id, page_no, encoding, body, body_bytes) "
                     "VALUES ('k-1', 0, 'json', 'x', 1)")
    views = ("face_observations", "person_identities", "person_appearances", "collection_face_sightings",
             "person_seconds")

    async def read() -> dict[str, list[tuple[object, ...]]]:
        return {v: sorted((tuple(r) for r in await db.fetch(f"SELECT * FROM reporting.{v}")), key=repr)
                for v in views}

    before = await read()
    assert all(before.values()), before
    await asyncio.to_thread(command.upgrade, cfg, "head")
    assert await read() == before
    key = await db.fetchval("SELECT ingest_id FROM jobs WHERE job_id = 'k-1'")
    assert await db.fetchval("SELECT job_id FROM ingests WHERE ingest_id = $1", key) == "k-1"
    assert await db.fetchval("SELECT xs[1] FROM landmarks WHERE ingest_id = $1", key) == 0.5
    assert await db.fetchval("SELECT types FROM landmarks WHERE ingest_id = $1", key) == ["nose"]
    assert await db.fetchval("SELECT count(*) FROM raw_pages WHERE ingest_id = $1", key) == 1
    await asyncio.to_thread(command.downgrade, cfg, "0010")
    assert await read() == before
    assert await db.fetchval("SELECT count(*) FROM raw_pages WHERE job_id = 'k-1'") == 1
    await asyncio.to_thread(command.upgrade, cfg, "head")


async def test_0005_carries_rows_views_grants_and_comments_over_and_back(
        db_url: str, db: asyncpg.Connection) -> None:
    cfg = alembic_config(Settings(database_url=db_url))
    await asyncio.to_thread(command.downgrade, cfg, "0004")
    role = f"reader_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE ROLE {role}")
    try:
        await db.execute(f"GRANT USAGE ON SCHEMA reporting TO {role}")
        await db.execute(f"GRANT SELECT ON reporting.job_summary, reporting.face_observations TO {role}")
        await db.execute("COMMENT ON VIEW reporting.job_summary IS 'one row per job, it''s documented'")
        await db.execute("COMMENT ON COLUMN reporting.face_observations.gender_value IS 'Male, Female, or newer'")
        await db.execute("INSERT INTO jobs (job_id, api, job_status, color_range, ingest_state) "
                         "VALUES ('m-1', 'FACE_DETECTION', 'SUCCEEDED', 'LIMITED', 'ingested')")
        await db.execute("INSERT INTO faces (job_id, face_seq, timestamp_ms, has_face, gender_value) "
                         "VALUES ('m-1', 0, 0, true, 'Female')")
        await db.execute("INSERT INTO landmarks (job_id, face_seq, ordinal, type) VALUES ('m-1', 0, 0, 'chinBottom')")
        await db.execute("INSERT INTO emotions (job_id, face_seq, ordinal, type) VALUES ('m-1', 0, 0, 'FEAR')")
        before = await _reporting_surface(db, role)
        assert before["job_summary"][1] and before["job_summary"][2]

        # Up to 0006: 0010 then redefines job_summary (finished jobs only) and writes its own data dictionary.
        await asyncio.to_thread(command.upgrade, cfg, "0006")
        assert await _reporting_surface(db, role) == before
        stored = ("SELECT j.job_status::text, j.color_range::text, f.gender_value::text, l.type::text, e.type::text "
                  "FROM jobs j JOIN faces f USING (job_id) JOIN landmarks l USING (job_id) "
                  "JOIN emotions e USING (job_id)")
        assert tuple(await db.fetchrow(stored)) == ("SUCCEEDED", "LIMITED", "Female", "chinBottom", "FEAR")
        assert await db.fetchval("SELECT gender_value FROM reporting.face_observations") == "Female"

        # A value the old enum cannot hold: the downgrade refuses, naming it, and changes nothing.
        await db.execute("INSERT INTO landmarks (job_id, face_seq, ordinal, type) VALUES ('m-1', 0, 1, 'earLeft')")
        with pytest.raises(RuntimeError, match=r"landmarks\.type: 'earLeft'"):
            await asyncio.to_thread(command.downgrade, cfg, "0004")
        # Each revision is its own transaction: the later ones came down, 0005's own downgrade changed nothing.
        assert await db.fetchval("SELECT version_num FROM alembic_version") == "0005"
        assert await db.fetchval("SELECT to_regtype('landmark_type')") is None

        await db.execute("DELETE FROM landmarks WHERE type = 'earLeft'")
        await asyncio.to_thread(command.downgrade, cfg, "0004")
        assert await _reporting_surface(db, role) == before
        assert tuple(await db.fetchrow(stored)) == ("SUCCEEDED", "LIMITED", "Female", "chinBottom", "FEAR")
        assert await db.fetchval("SELECT pg_typeof(type)::text FROM landmarks") == "landmark_type"
        await asyncio.to_thread(command.upgrade, cfg, "head")
    finally:
        await db.execute(f"DROP OWNED BY {role}")
        await db.execute(f"DROP ROLE {role}")
