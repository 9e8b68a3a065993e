"""`delete`, `erase` and the retention pass wait for a job's lock outside any transaction (issue 20 item 6).

While an ingest holds the job's lock, the waiting session must hold no transaction, no snapshot (its
backend_xmin would hold back vacuum for the whole database) and no lock wait inside a statement; once the
ingest is done, the change completes as if it had not waited. A real ingest, paced by the emulator's
latency, holds the lock; pg_stat_activity is sampled throughout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests.conftest import unique_job_id
from tests.helpers import runtime
from tests.test_lifecycle import KEY, _stored_anywhere
from worker.config import Settings
from worker.db.engine import create_engine
from worker.lifecycle import count_job_rows, delete_job, erase, purge_expired
from worker.local import synth
from worker.messages import JobRef

# Is the job's lock (the writer's key) held, and by which backend?
_HOLDER = """
SELECT l.pid FROM pg_locks l, (SELECT hashtextextended($1, 0) AS k) key
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid = ((key.k >> 32) & 4294967295)::oid AND l.objid = (key.k & 4294967295)::oid
"""
_ACTIVITY = ("SELECT state, backend_xid::text AS xid, backend_xmin::text AS xmin, wait_event_type, query "
             "FROM pg_stat_activity WHERE pid = $1")


async def _ingest(settings: Settings, fixtures: list[synth.JobFixture]) -> None:
    async with runtime(settings) as rt:
        for fx in fixtures:
            assert (await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))).outcome == "ingested"


async def _while_an_ingest_holds_the_lock(settings: Settings, emu: Any, monitor: asyncpg.Connection,
                                          fx: synth.JobFixture, waiter: asyncpg.Connection,
                                          change: Awaitable[Any]) -> tuple[list[asyncpg.Record], Any]:
    """Re-ingest ``fx`` slowly; once its lock is held, run ``change`` (on ``waiter``) and sample the waiter's
    activity until the ingest is done. Returns the samples and what ``change`` returned."""
    emu.configure(latency_s=0.25)  # each page a quarter of a second: the re-ingest runs for seconds
    reingest = asyncio.create_task(_ingest(settings, [fx]))
    async with asyncio.timeout(30):
        while not await monitor.fetch(_HOLDER, fx.job_id):
            assert not reingest.done(), reingest
            await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(change)
    samples = []
    while not reingest.done():
        samples.extend(await monitor.fetch(_ACTIVITY, waiter.get_server_pid()))
        assert not waiting.done(), "the change did not wait for the ingest's lock"
        await asyncio.sleep(0.02)
    await reingest
    emu.configure(latency_s=0.0)
    return samples, await asyncio.wait_for(waiting, 30)


def _assert_waited_idle(samples: list[asyncpg.Record]) -> None:
    assert len(samples) >= 20, samples
    for s in samples:
        # A statement may be running (a try of the lock; erase keeping the identifier's hash, a one-row
        # insert, before it waits): never a transaction left open between statements, never a lock wait.
        assert s["state"] != "idle in transaction" and s["wait_event_type"] != "Lock", dict(s)
        assert s["xid"] is None or s["state"] == "active", dict(s)
        if s["xmin"] is not None:
            # Only a statement running (a try of the lock, the erase's look-up before it) holds a snapshot.
            assert s["state"] == "active", dict(s)
    idle = [s for s in samples if s["state"] == "idle" and s["xmin"] is None]
    assert len(idle) >= 0.7 * len(samples), [dict(s) for s in samples]


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_delete_waits_for_an_ingest_without_an_open_transaction_then_deletes_everything(
    emu: Any, settings: Settings, db: asyncpg.Connection, db_url: str,
) -> None:
    settings = settings.with_(page_size=20)
    fx = synth.detection_job(unique_job_id("lockwait-del"), faces=200)
    emu.add_job(fx)
    await _ingest(settings, [fx])
    waiter = await asyncpg.connect(db_url)
    try:
        samples, removal = await _while_an_ingest_holds_the_lock(
            settings, emu, db, fx, waiter, delete_job(waiter, fx.job_id, chunk_faces=50))
        _assert_waited_idle(samples)
        assert removal.outcome == "deleted" and removal.rows["faces"] == 200, removal
        assert set((await count_job_rows(db, fx.job_id)).values()) == {0}
        assert await db.fetchval("SELECT count(*) FROM ingests WHERE job_id = $1", fx.job_id) == 0
        assert await db.fetch(_HOLDER, fx.job_id) == []  # released
        assert not waiter.is_in_transaction()
    finally:
        await waiter.close()


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_erase_waits_for_an_ingest_without_an_open_transaction_then_erases(
    emu: Any, settings: Settings, db: asyncpg.Connection, db_url: str,
) -> None:
    settings = settings.with_(page_size=20, erasure_hash_key=KEY)  # erasures exist once it runs: ingests need the key
    fx = synth.search_job(unique_job_id("lockwait-erase"), persons_elements=160, persons=4, seed=0)
    emu.add_job(fx)
    await _ingest(settings, [fx])
    target = await db.fetchval("SELECT external_image_id FROM collection_faces ORDER BY 1 LIMIT 1")
    waiter = await asyncpg.connect(db_url)
    try:
        samples, result = await _while_an_ingest_holds_the_lock(
            settings, emu, db, fx, waiter, erase(waiter, "external_image_id", target, key=KEY))
        _assert_waited_idle(samples)
        # `erase` keeps the identifier's hash before it waits (worker/erased.py), so the re-ingest holding the
        # lock already removes the identity at its switch; the erase then finds it gone or removes it itself.
        assert result.audit_id is not None
        assert await _stored_anywhere(db, {target}) == []
        assert await db.fetchval("SELECT faces FROM jobs WHERE job_id = $1", fx.job_id) == await db.fetchval(
            "SELECT count(*) FROM faces f JOIN jobs j ON j.ingest_id = f.ingest_id WHERE j.job_id = $1", fx.job_id)
        assert await db.fetchval("SELECT count(*) FROM faces f JOIN jobs j ON j.ingest_id = f.ingest_id "
                                 "WHERE j.job_id = $1", fx.job_id) < len(fx.results)
        assert await db.fetch(_HOLDER, fx.job_id) == []
    finally:
        await waiter.close()


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_a_delete_cancelled_while_waiting_or_holding_the_lock_leaves_no_lock_nor_transaction(
    emu: Any, settings: Settings, db: asyncpg.Connection, db_url: str,
) -> None:
    fx = synth.detection_job(unique_job_id("lockwait-cancel"), faces=50)
    emu.add_job(fx)
    await _ingest(settings, [fx])
    holder = await asyncpg.connect(db_url)
    waiter = await asyncpg.connect(db_url)
    try:
        # Waiting: cancelled at once, nothing held.
        assert await holder.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", fx.job_id)
        task = asyncio.create_task(delete_job(waiter, fx.job_id))
        await asyncio.sleep(0.5)
        task.cancel()
        async with asyncio.timeout(2):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert [r["pid"] for r in await db.fetch(_HOLDER, fx.job_id)] == [holder.get_server_pid()]
        assert not waiter.is_closed() and not waiter.is_in_transaction()
        assert await holder.fetchval("SELECT pg_advisory_unlock(hashtextextended($1, 0))", fx.job_id)
        # Holding it: the retention pass (which does not wait) is cancelled mid-job; the lock goes with it.
        pid = waiter.get_server_pid()
        task = asyncio.create_task(delete_job(waiter, fx.job_id, wait=False, chunk_faces=10))
        async with asyncio.timeout(10):
            while not await db.fetch(_HOLDER, fx.job_id) and not task.done():
                await asyncio.sleep(0)
        task.cancel()
        async with asyncio.timeout(6):
            await asyncio.gather(task, return_exceptions=True)
        # Unlocked, or the session closed (cancelled mid-statement), which the server notices within moments.
        async with asyncio.timeout(5):
            while pid in [r["pid"] for r in await db.fetch(_HOLDER, fx.job_id)] or await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'idle in transaction'", pid):
                await asyncio.sleep(0.05)
        # The job is then deleted whole by the next pass.
        engine = create_engine(settings, pool_size=1)
        try:
            result = await purge_expired(engine, 0.0, now=datetime.now(tz=UTC) + timedelta(days=1))
        finally:
            await engine.dispose()
        assert result is not None and result.jobs <= 1 and result.busy == 0
        assert set((await count_job_rows(db, fx.job_id)).values()) == {0}
    finally:
        await holder.close()
        await waiter.close()

