"""Deletion that stays deleted: tombstones of the jobs `delete` and the retention purge removed.

A tombstone (JobId, API, why, when; no face data) is written in the transaction that removes the job
(worker/lifecycle.py). Rekognition keeps the results for 7 days, and SQS may still hold a copy of the job's
notification (in backoff, requeued, in the DLQ), so a later notification of a tombstoned job is settled
without ingesting it, counted (``worker_tombstoned_notifications_total``) and logged; the store re-reads the
tombstone under the job's lock just before writing, so a copy that started before the delete does not bring
the job back either. `backfill` and `jobs retry` refuse the job the same way unless the operator passes
``--restore-deleted``, which removes the tombstone first. Tombstones are kept: they are small and name no one.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from worker.config import Settings
from worker.errors import InvalidInput, WorkerError

if TYPE_CHECKING:
    import asyncpg

REASONS = ("deleted", "expired")
RESTORE_FLAG = "--restore-deleted"

_BURY_SQL = """
INSERT INTO tombstones (job_id, api, reason) VALUES ($1, $2::text::face_api, $3)
ON CONFLICT (job_id) DO UPDATE SET api = coalesce(EXCLUDED.api, tombstones.api), reason = EXCLUDED.reason,
                                   deleted_at = now()
"""
_FIND_SQL = "SELECT job_id, api::text AS api, reason, deleted_at FROM tombstones WHERE job_id = $1"
# A notification that raced the delete may have recorded the job pending again: that row goes with the check.
_CLEAR_PENDING_SQL = "DELETE FROM jobs WHERE job_id = $1 AND ingest_state = 'pending'"
_TRY_LOCK_SQL = "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))"


class Tombstoned(WorkerError):
    """The job was deleted (or expired) and is not ingested again unless an operator restores it."""

    def __init__(self, job_id: str, reason: str, deleted_at: datetime) -> None:
        super().__init__(f"job {job_id} was {'deleted' if reason == 'deleted' else 'expired by retention'} at "
                         f"{deleted_at.isoformat(timespec='seconds')}: not ingested again "
                         f"({RESTORE_FLAG} on backfill or jobs retry brings it back)")
        self.job_id = job_id
        self.reason = reason
        self.deleted_at = deleted_at


async def bury(conn: asyncpg.Connection, job_id: str, api: str | None, reason: str) -> None:
    """Record that ``job_id`` was removed, in the caller's transaction (the one that removes it)."""
    if reason not in REASONS:
        raise ValueError(f"unknown tombstone reason {reason!r}")
    await conn.execute(_BURY_SQL, job_id, api, reason)


async def find(conn: asyncpg.Connection, job_id: str) -> Mapping[str, Any] | None:
    row = await conn.fetchrow(_FIND_SQL, job_id)
    return dict(row) if row is not None else None


async def check(conn: asyncpg.Connection, job_id: str) -> None:
    """Raise Tombstoned when the job has a tombstone (the caller holds the job's lock)."""
    if (stone := await find(conn, job_id)) is not None:
        raise Tombstoned(job_id, stone["reason"], stone["deleted_at"])


async def settle(conn: asyncpg.Connection, job_id: str) -> Tombstoned | None:
    """The tombstone of ``job_id`` as an error to report (None: there is none). A pending jobs row that a
    racing notification recorded meanwhile is removed when the job is not being written."""
    stone = await find(conn, job_id)
    if stone is None:
        return None
    async with conn.transaction():
        if await conn.fetchval(_TRY_LOCK_SQL, job_id):
            await conn.execute(_CLEAR_PENDING_SQL, job_id)
    return Tombstoned(job_id, stone["reason"], stone["deleted_at"])


async def restore(conn: asyncpg.Connection, job_ids: Sequence[str]) -> list[str]:
    """Remove the tombstones of ``job_ids``; returns the jobs that had one."""
    rows = await conn.fetch("DELETE FROM tombstones WHERE job_id = ANY($1::text[]) RETURNING job_id", list(job_ids))
    return sorted(r["job_id"] for r in rows)


async def restore_for_retry(conn: asyncpg.Connection, job_ids: Sequence[str]) -> list[str]:
    """`jobs retry --restore-deleted --job ...`: each named tombstoned job becomes a failed job (no rows) that
    the retry then ingests; returns those jobs. A job that exists is left as it is."""
    restored = []
    async with conn.transaction():
        for job_id in job_ids:
            stone = await conn.fetchrow("DELETE FROM tombstones WHERE job_id = $1 RETURNING api::text AS api, reason",
                                        job_id)
            if stone is None:
                continue
            restored.append(job_id)
            if stone["api"] is None:
                raise InvalidInput(f"job {job_id} was deleted before its API was known: restore it with "
                                   f"backfill --api API {RESTORE_FLAG} {job_id}")
            await conn.execute(
                "INSERT INTO jobs (job_id, api, ingest_state, failure_code, failure_reason) "
                "VALUES ($1, $2::text::face_api, 'failed', 'Restored', $3) ON CONFLICT (job_id) DO NOTHING",
                job_id, stone["api"], f"{stone['reason']}; restored by the operator for a retry")
    return restored


def add_restore_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """The flag that brings deleted or expired jobs back (cli.py adds it to backfill and jobs retry)."""
    parser.add_argument(RESTORE_FLAG, dest="restore_deleted", action="store_true",
                        help=f"{what}: also jobs that were deleted or expired (their tombstone is removed first)")


async def run_restore(settings: Settings, job_ids: Sequence[str], *, for_retry: bool = False) -> list[str]:
    """The ``--restore-deleted`` hook of `backfill` and `jobs retry`: remove the named jobs' tombstones."""
    from worker.db.engine import connect

    conn = await connect(settings.asyncpg_dsn)
    try:
        return await (restore_for_retry if for_retry else restore)(conn, job_ids)
    finally:
        await conn.close()
