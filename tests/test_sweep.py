"""The stale-ingest sweep of `run` (worker/sweep.py): rows of an ingest that stopped, which no `jobs` row
names and no later writer of the job cleaned up, are dropped; a job being written is left alone."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from tests.conftest import unique_job_id
from tests.helpers import count_rows, dump_job, runtime
from worker.config import Settings
from worker.db.engine import create_engine
from worker.local import synth
from worker.messages import JobRef
from worker.sweep import sweep_stale_ingests

pytestmark = pytest.mark.usefixtures("rekognition_endpoint")


async def _stale_copy(db: asyncpg.Connection, job_id: str) -> int:
    """As a re-ingest killed before its switch leaves it: the job's rows again, under a key no job names."""
    key = int(await db.fetchval("SELECT nextval('ingest_ids')"))
    current = await db.fetchval("SELECT ingest_id FROM jobs WHERE job_id = $1", job_id)
    await db.execute("INSERT INTO ingests (ingest_id, job_id) VALUES ($1, $2)", key, job_id)
    for table in ("faces", "landmarks", "emotions", "face_matches", "raw_pages"):
        columns = [r["attname"] for r in await db.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped "
            "AND attname <> 'ingest_id' AND attgenerated = ''", table)]
        cols = ", ".join(columns)
        await db.execute(f"INSERT INTO {table} (ingest_id, {cols}) SELECT $2, {cols} FROM {table} "
                         "WHERE ingest_id = $1", current, key)
    return key


async def test_the_sweep_drops_keys_no_job_names_and_leaves_a_job_being_written(
    emulator: Any, settings: Settings, db: asyncpg.Connection, db_url: str,
) -> None:
    left, busy = (synth.detection_job(unique_job_id(p), faces=40) for p in ("sweep-left", "sweep-busy"))
    emulator.add_jobs([left, busy])
    async with asyncio.timeout(60), runtime(settings.with_(page_size=10)) as rt:
        for fx in (left, busy):
            assert (await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))).outcome == "ingested"
    before = {fx.job_id: await dump_job(db, fx.job_id) for fx in (left, busy)}
    stale = {fx.job_id: await _stale_copy(db, fx.job_id) for fx in (left, busy)}
    assert await db.fetchval("SELECT count(*) FROM faces WHERE ingest_id = $1", stale[left.job_id]) == 40
    writer = await asyncpg.connect(db_url)  # another process is writing `busy` right now
    engine = create_engine(settings, pool_size=1)
    try:
        assert await writer.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", busy.job_id)
        assert await sweep_stale_ingests(engine) == 1
        assert await db.fetchval("SELECT count(*) FROM ingests WHERE ingest_id = $1", stale[left.job_id]) == 0
        for table in ("faces", "landmarks", "raw_pages"):
            assert await db.fetchval(f"SELECT count(*) FROM {table} WHERE ingest_id = $1", stale[left.job_id]) == 0
        assert await db.fetchval("SELECT count(*) FROM faces WHERE ingest_id = $1", stale[busy.job_id]) == 40
        await writer.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", busy.job_id)
        assert await sweep_stale_ingests(engine) == 1
        assert await sweep_stale_ingests(engine) == 0
    finally:
        await writer.close()
        await engine.dispose()
    assert await db.fetchval("SELECT count(*) FROM ingests") == 2
    for fx in (left, busy):
        assert await dump_job(db, fx.job_id) == before[fx.job_id]
        assert (await count_rows(db, fx.job_id))["faces"] == 40
