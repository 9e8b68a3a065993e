"""Test helpers: table dumps for comparing whole jobs, and direct ingestion wiring."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from worker.config import Settings
from worker.runtime import Runtime, open_runtime

# Columns that legitimately differ between two ingests of the same results.
VOLATILE = {"jobs": {"attempts", "ingest_started_at", "ingested_at", "updated_at", "notified_at", "completed_at"},
            "raw_pages": {"fetched_at"}}
TABLES = ("jobs", "faces", "landmarks", "emotions", "face_matches", "collection_faces", "persons", "raw_pages")


async def dump_job(conn: asyncpg.Connection, job_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of one job in every table, sorted, without the columns that record when."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table in TABLES:
        rows = await conn.fetch(f"SELECT * FROM {table} WHERE job_id = $1", job_id)
        skip = VOLATILE.get(table, set())
        out[table] = sorted(
            (tuple((k, v) for k, v in dict(r).items() if k not in skip) for r in rows), key=repr
        )
    return out


async def count_rows(conn: asyncpg.Connection, job_id: str) -> dict[str, int]:
    return {t: await conn.fetchval(f"SELECT count(*) FROM {t} WHERE job_id = $1", job_id) for t in TABLES}


@asynccontextmanager
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    async with open_runtime(settings) as rt:
        yield rt
