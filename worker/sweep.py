"""Rows that no job names, left by ingests that stopped, are dropped by a periodic sweep in `run`.

An ingest writes under a key of its own and the job switches to it at the end (worker/db/store.py). A
writer that stops first (SIGKILL, a node lost, its connection cut) leaves its key's rows unnamed by any
``jobs`` row: invisible, and dropped by the job's next writer, failure record, delete or erase. A job that is
never touched again (the stopped ingest was a duplicate's, or a re-ingest of a job that stays ingested)
would keep them for good; this sweep drops them, one job at a time under the job's lock, skipping a job
being written right now (whose unnamed key is that writer's).
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.db.joblock import JobLockBusy, job_lock
from worker.db.store import drop_stale_ingests
from worker.logs import get_logger

log = get_logger(__name__)

_ORPHANED_SQL = ("SELECT DISTINCT i.job_id FROM ingests i WHERE NOT EXISTS "
                 "(SELECT 1 FROM jobs j WHERE j.ingest_id = i.ingest_id) ORDER BY 1 LIMIT $1")
SWEEP_BATCH_JOBS = 100


async def sweep_stale_ingests(engine: AsyncEngine, *, batch_jobs: int = SWEEP_BATCH_JOBS) -> int:
    """Drop the keys no ``jobs`` row names, of jobs nobody is writing; returns how many keys went."""
    dropped = 0
    async with engine.connect() as sa_conn:
        raw = await sa_conn.get_raw_connection()
        conn: asyncpg.Connection = raw.driver_connection
        for row in await conn.fetch(_ORPHANED_SQL, batch_jobs):
            try:
                async with job_lock(conn, row["job_id"], wait=False):
                    dropped += await drop_stale_ingests(conn, row["job_id"])
            except JobLockBusy:
                continue  # being written now: the unnamed key is the writer's
    return dropped


async def sweep_loop(engine: AsyncEngine, interval_s: float, stop: asyncio.Event) -> None:
    """A sweep at start and every ``interval_s`` until ``stop``; never raises for a failed pass."""
    while not stop.is_set():
        try:
            dropped = await sweep_stale_ingests(engine)
        except Exception as exc:  # the database is down or restarting: the next pass tries again
            log.warning("stale ingest sweep failed", error=f"{type(exc).__name__}: {exc}"[:300])
        else:
            if dropped:
                log.info("stale ingest keys dropped", keys=dropped)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await stop.wait()
