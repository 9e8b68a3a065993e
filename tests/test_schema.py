"""The migrated schema agrees with the normalizer, leads with job_id, and migrates both ways."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from alembic import command

from worker import normalize
from worker.config import Settings
from worker.db.migrate import alembic_config, head_revision

COLUMNS = {
    "faces": normalize.FACE_COLUMNS, "landmarks": normalize.LANDMARK_COLUMNS, "emotions": normalize.EMOTION_COLUMNS,
    "face_matches": normalize.MATCH_COLUMNS, "collection_faces": normalize.COLLECTION_FACE_COLUMNS,
}
ENUMS = {"landmark_type": normalize.LANDMARK_TYPES, "emotion_type": normalize.EMOTION_TYPES,
         "gender": normalize.GENDERS, "color_range": normalize.COLOR_RANGES, "job_status": normalize.JOB_STATUSES}


async def test_copy_columns_match_the_tables(db: asyncpg.Connection) -> None:
    for table, columns in COLUMNS.items():
        rows = await db.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = $1 "
                              "ORDER BY ordinal_position", table)
        assert tuple(r["column_name"] for r in rows) == columns, table


async def test_enum_labels_match_the_normalizer(db: asyncpg.Connection) -> None:
    for type_name, values in ENUMS.items():
        labels = await db.fetch("SELECT enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid "
                                "WHERE t.typname = $1", type_name)
        assert {r["enumlabel"] for r in labels} == set(values), type_name


async def test_result_tables_lead_with_job_id(db: asyncpg.Connection) -> None:
    for table in ("faces", "landmarks", "emotions", "face_matches", "collection_faces", "persons", "raw_pages"):
        first_key = await db.fetchval(
            """SELECT a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0]
               WHERE c.relname = $1 AND i.indisprimary""", table)
        assert first_key == "job_id", table


async def test_schema_is_at_head(db: asyncpg.Connection) -> None:
    assert await db.fetchval("SELECT version_num FROM alembic_version") == head_revision()


async def test_downgrade_and_upgrade_round_trip(db_url: str, db: asyncpg.Connection) -> None:
    cfg = alembic_config(Settings(database_url=db_url))
    await asyncio.to_thread(command.downgrade, cfg, "base")
    assert await db.fetchval("SELECT to_regclass('public.faces')") is None
    await asyncio.to_thread(command.upgrade, cfg, "head")
    assert await db.fetchval("SELECT to_regclass('public.faces')") == "faces"
    assert await db.fetchval("SELECT to_regclass('reporting.job_summary')") == "reporting.job_summary"


async def test_job_id_pattern_is_enforced_by_the_database(db: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO jobs (job_id, api, ingest_state) VALUES ('bad id', 'FACE_SEARCH', 'failed')")
