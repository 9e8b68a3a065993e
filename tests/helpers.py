"""Test helpers: table dumps for comparing whole jobs, and direct ingestion wiring."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from worker.config import Settings
from worker.runtime import Runtime, open_runtime

# Columns that legitimately differ between two ingests of the same results (the ingest key among them).
VOLATILE = {"jobs": {"attempts", "ingest_started_at", "ingested_at", "updated_at", "notified_at", "completed_at",
                     "ingest_id", "first_ingested_at"},
            "raw_pages": {"fetched_at"}}
TABLES = ("jobs", "faces", "landmarks", "emotions", "face_matches", "collection_faces", "persons", "raw_pages")


# The key of job $1's rows: the one its jobs row names.
KEY_OF = "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1)"


def job_rows_sql(table: str, select: str = "t.*") -> str:
    """SELECT ``select`` from ``table`` for the job $1: the rows of the key its jobs row names (what readers see).

    Rows of other keys of the job (an ingest being written or replaced, an attempt that stopped) are not
    the job's data; stale_keys() shows them.
    """
    if table == "jobs":
        return f"SELECT {select} FROM jobs t WHERE t.job_id = $1"
    return f"SELECT {select} FROM {table} t JOIN jobs j ON j.ingest_id = t.ingest_id WHERE j.job_id = $1"


async def dump_job(conn: asyncpg.Connection, job_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of one job in every table, sorted, without the columns that record when or the ingest key."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table in TABLES:
        rows = await conn.fetch(job_rows_sql(table), job_id)
        skip = VOLATILE.get(table, set()) | {"ingest_id"}
        out[table] = sorted(
            (tuple((k, v) for k, v in dict(r).items() if k not in skip) for r in rows), key=repr
        )
    return out


# landmarks and emotions hold a face's elements as arrays: what they hold is counted in elements.
COUNTED = {"landmarks": "coalesce(sum(cardinality(t.types)), 0)", "emotions": "coalesce(sum(cardinality(t.types)), 0)"}


async def count_rows(conn: asyncpg.Connection, job_id: str) -> dict[str, int]:
    """Rows of the job per table (landmarks and emotions: elements, as the jobs counters count them)."""
    return {t: await conn.fetchval(job_rows_sql(t, COUNTED.get(t, "count(*)")), job_id) for t in TABLES}


async def stale_keys(conn: asyncpg.Connection, job_id: str | None = None) -> list[int]:
    """Keys whose rows no jobs row names (of ``job_id``, or of any job): what a stopped attempt leaves."""
    return [r["ingest_id"] for r in await conn.fetch(
        "SELECT i.ingest_id FROM ingests i WHERE ($1::text IS NULL OR i.job_id = $1) "
        "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.ingest_id = i.ingest_id) ORDER BY 1", job_id)]


@asynccontextmanager
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    async with open_runtime(settings) as rt:
        yield rt
