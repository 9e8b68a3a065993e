"""A job's lock taken by a session that waits for it outside any transaction.

Writers hold the job's session-level advisory lock (``hashtextextended(job_id, 0)``) for a whole ingest.
Whoever else changes the job (`delete`, `erase`, the retention pass, a failure record) must wait for that
lock, and must not wait inside a transaction, nor inside one long statement: either way the backend keeps
an xmin for as long as the ingest runs, which holds back vacuum on the whole database. So the lock is
tried, one short statement at a time, with a growing pause between tries during which the session is
idle; the caller's short transactions then run under the held lock, and the lock is released on the way
out whatever happened, cancellation included (a session that cannot unlock is closed, which unlocks).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg

from worker.logs import get_logger

log = get_logger(__name__)

TRY_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"
UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtextextended($1, 0))"
# Between tries: short at first (a job's switch or a page takes milliseconds), then a second at most.
FIRST_PAUSE_S = 0.02
MAX_PAUSE_S = 1.0
UNLOCK_TIMEOUT_S = 5.0


def next_pause_s(pause_s: float) -> float:
    """The pause after ``pause_s`` (doubling, capped)."""
    return min(pause_s * 2, MAX_PAUSE_S)


class JobLockBusy(Exception):
    """``wait=False`` and another session holds the job's lock."""


async def _release(conn: asyncpg.Connection, job_id: str) -> None:
    """Unlock within a deadline; a session that cannot (broken, mid-statement, cancelled) is closed instead,
    which releases every lock it holds."""
    try:
        async with asyncio.timeout(UNLOCK_TIMEOUT_S):
            if conn.is_in_transaction():
                raise RuntimeError("a transaction was left open under the job's lock")
            await conn.execute(UNLOCK_SQL, job_id)
            if conn.is_in_transaction():
                # The server says a transaction is open: a BEGIN cancelled after it was sent but before its
                # answer was read. The session is closed, which rolls it back (nothing may stay idle in it).
                raise RuntimeError("a transaction the client did not see was open under the job's lock")
    except asyncio.CancelledError:
        conn.terminate()
        raise
    except Exception as exc:  # the lock goes with the closed session; the block's own outcome stands
        log.warning("could not release the job's lock: closing the session", job_id=job_id,
                    error=f"{type(exc).__name__}: {exc}"[:300])
        conn.terminate()


@asynccontextmanager
async def job_lock(conn: asyncpg.Connection, job_id: str, *, wait: bool = True,
                   sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> AsyncIterator[None]:
    """Hold ``job_id``'s lock on ``conn`` (no transaction open) for the block; the block opens its own short
    transactions. ``wait=False`` raises :class:`JobLockBusy` at once when another session holds it."""
    if conn.is_in_transaction():
        raise RuntimeError("the job's lock is waited for outside any transaction")
    pause_s = FIRST_PAUSE_S
    waited = 0
    while True:
        try:
            got = await conn.fetchval(TRY_LOCK_SQL, job_id)
        except BaseException:
            # Cancelled (or broken) with the answer unread: the lock may be ours; closing the session frees it.
            conn.terminate()
            raise
        if got:
            break
        if not wait:
            raise JobLockBusy(job_id)
        if waited == 0:
            log.info("waiting for the job's lock (another process is writing it)", job_id=job_id)
        waited += 1
        await sleep(pause_s)  # idle between tries: no transaction, no snapshot
        pause_s = next_pause_s(pause_s)
    try:
        yield
    finally:
        await _release(conn, job_id)
