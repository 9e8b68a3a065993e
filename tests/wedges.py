"""Wedged jobs for the tests of jobs that must end (tests/test_job_ends.py, tests/test_watchdog.py); no tests here.

The writer is held back by a row another connection inserted and has not committed (the job's first
raw page): PostgreSQL makes the worker's INSERT of the same key wait. Meanwhile the prefetching task
fills its queue and blocks on it, the usual state of a job, since writing is the slow side.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from tests.conftest import unique_job_id
from worker.local import synth
from worker.messages import JobRef

PAGE_SIZE = 20
PREFETCH = 2
# Pages the worker has asked for once its writer waits on page 0 and the prefetching task waits on a
# full queue: page 0 (being written), PREFETCH queued, one more in the producer's hands.
QUEUE_FULL_CALLS = PREFETCH + 2


def add_job(emu: Any, prefix: str, faces: int = 200, seed: int = 1) -> JobRef:
    fx = synth.detection_job(unique_job_id(prefix), faces=faces, seed=seed)
    emu.add_job(fx)
    return JobRef.create(fx.job_id, fx.api)


class Blocker:
    """Another session's uncommitted raw_pages row for page 0 under an ingest key the worker is about to take:
    the worker's write of that page waits. Keys come from sequence ingest_ids in order, so the blockers held
    before the worker starts block its next ingests, one each (the i-th blocker the i-th ingest key taken)."""

    def __init__(self, conn: asyncpg.Connection, tx: Any) -> None:
        self.conn, self.tx = conn, tx

    @classmethod
    async def hold(cls, db_url: str, key: int) -> Blocker:
        conn = await asyncpg.connect(db_url)
        tx = conn.transaction()
        await tx.start()
        await conn.execute("INSERT INTO raw_pages (ingest_id, page_no, encoding, body, body_bytes) "
                           "VALUES ($1, 0, 'zstd+json', '\\x00'::bytea, 1)", key)
        return cls(conn, tx)

    async def release(self) -> None:
        if not self.conn.is_closed():
            await self.tx.rollback()
            await self.conn.close()


class Blockers:
    """``async with Blockers(db_url) as hold: await hold(job_id)``; every blocker is released on exit."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.held: list[Blocker] = []
        self._last_key: int | None = None

    async def hold(self, job_id: str) -> Blocker:
        """Block the next ingest key not blocked yet (``job_id``'s, when the test starts one job per blocker)."""
        if self._last_key is None:
            conn = await asyncpg.connect(self.db_url)
            try:
                self._last_key = int(await conn.fetchval("SELECT nextval('ingest_ids')"))
            finally:
                await conn.close()
        self._last_key += 1
        self.held.append(await Blocker.hold(self.db_url, self._last_key))
        return self.held[-1]

    async def __aenter__(self) -> Callable[[str], Awaitable[Blocker]]:
        return self.hold

    async def __aexit__(self, *exc: object) -> None:
        for b in self.held:
            await b.release()


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result if isinstance(result, bool) else await result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def writers_waiting(db: asyncpg.Connection) -> int:
    """Worker sessions whose statement waits for a lock (the blocked page write)."""
    return int(await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'rekognition-worker' AND wait_event_type = 'Lock'"))


async def pages_queued(emu: Any, db: asyncpg.Connection, calls: int = QUEUE_FULL_CALLS, writers: int = 1) -> None:
    """Wait until the writer waits on its lock and the prefetching task on its full queue."""
    async def ready() -> bool:
        return int(emu.stats()["requests"]) >= calls and await writers_waiting(db) >= writers
    await wait_until(ready, "the writer blocked with pages queued ahead of it")
    await asyncio.sleep(0.3)  # the last page fetched reaches the full queue
    assert int(emu.stats()["requests"]) == calls, f"the prefetching task did not stop at a full queue: {emu.stats()}"


async def ends_within(task: asyncio.Task[Any], seconds: float) -> asyncio.Task[Any]:
    """The task, once ended; fails (and cancels it) if it runs on past ``seconds``.

    asyncio.wait, not asyncio.timeout: a timeout's cancellation that the code under test swallows
    (and turns into an outcome) would let a hung job pass as one that ended.
    """
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        raise AssertionError(f"still running {seconds} s later")
    return task


async def terminate_worker_sessions(db: asyncpg.Connection) -> int:
    return int(await db.fetchval(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'rekognition-worker') t"))


async def assert_nothing_left_open(db: asyncpg.Connection) -> None:
    """No worker session idle in a transaction, no advisory (job) lock held by anyone."""
    idle = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'rekognition-worker' AND state LIKE 'idle in transaction%'")
    locks = await db.fetchval(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        "WHERE l.locktype = 'advisory' AND d.datname = current_database()")
    assert (idle, locks) == (0, 0), f"{idle} session(s) idle in transaction, {locks} advisory lock(s) held"
