"""The stall detector (worker/watchdog.py): the rule on a fake clock, then jobs that really wedge (a write
waiting on another session's lock, a Get* that does not answer) cancelled and handed back as transient,
with ``/livez`` failing while a job is past its deadline and passing once it has ended."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.helpers import runtime
from tests.wedges import (
    Blocker,
    Blockers,
    add_job,
    assert_nothing_left_open,
    ends_within,
    pages_queued,
    wait_until,
)
from worker.config import Settings
from worker.errors import JobStalled
from worker.health import HealthServer
from worker.ingest import Ingestor
from worker.watchdog import Stall, Watchdog, progress


@pytest.fixture
async def blockers(db_url: str) -> AsyncIterator[Callable[[str], Awaitable[Blocker]]]:
    async with Blockers(db_url) as hold:
        yield hold


# --- the rule, on a fake clock (no sleeping) ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    """Let every ready task run up to its next wait."""
    for _ in range(5):
        await asyncio.sleep(0)


def watched(dog: Watchdog, job_id: str, step: asyncio.Event | None = None,
            release: asyncio.Event | None = None) -> asyncio.Task[str]:
    """A job that waits for ``release``; each time ``step`` is set it reports a page (progress)."""
    async def job() -> str:
        with dog.watch(job_id):
            while release is None or not release.is_set():
                waits = [asyncio.create_task(e.wait()) for e in (step, release) if e is not None]
                if not waits:
                    await asyncio.Event().wait()
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
                if step is not None and step.is_set():
                    step.clear()
                    progress()
        return "done"
    return asyncio.create_task(job())


async def test_a_job_without_progress_for_the_timeout_is_cancelled_as_stalled_and_only_it() -> None:
    clock = Clock()
    dog = Watchdog(10.0, clock=clock)
    step = asyncio.Event()
    stuck, busy = watched(dog, "stuck"), watched(dog, "busy", step=step)
    await settle()
    clock.now += 9.0
    step.set()  # "busy" fetches a page
    await settle()
    assert dog.check() == [] and dog.stalled() == []
    clock.now += 1.5  # "stuck": 10.5 s without progress; "busy": 1.5 s
    assert dog.stalled() == [Stall("stuck", 10.5)]
    assert dog.check() == [Stall("stuck", 10.5)]
    assert dog.check() == [], "cancelled once"
    await settle()
    with pytest.raises(JobStalled, match="stalled: no page fetched or written for 10 s"):
        stuck.result()
    assert stuck.cancelling() == 0, "the watchdog's cancel() is balanced"
    assert dog.stalled() == [], "an ended job is no longer stalled"
    clock.now += 8.4  # "busy": 9.9 s since its page
    assert dog.check() == [] and not busy.done()
    clock.now += 0.2
    assert dog.check() == [Stall("busy", 10.1)]
    await settle()
    with pytest.raises(JobStalled):
        busy.result()


async def test_progress_counts_from_tasks_the_job_starts_and_nowhere_else() -> None:
    clock = Clock()
    dog = Watchdog(5.0, clock=clock)
    progress()  # outside any watched job: nothing to record, no error
    release = asyncio.Event()

    async def job() -> None:
        with dog.watch("parent"):
            async def child() -> None:  # a prefetching task: it copies the job's context
                for _ in range(3):
                    clock.now += 4.0
                    progress()
                    await asyncio.sleep(0)
            await asyncio.create_task(child())
            await release.wait()

    task = asyncio.create_task(job())
    await settle()
    assert dog.stalled() == [] and dog.check() == []  # 12 s since the start, 0 since the last page
    release.set()
    await task


async def test_shutdown_cancellation_stays_a_cancellation() -> None:
    clock = Clock()
    dog = Watchdog(10.0, clock=clock)
    plain = watched(dog, "shutdown")
    both = watched(dog, "both")
    await settle()
    plain.cancel()  # the service's grace period is over
    clock.now += 11
    dog.check()  # cancels "both" as stalled ...
    both.cancel()  # ... and shutdown cancels it too: shutdown wins
    await settle()
    assert plain.cancelled() and both.cancelled()


async def test_a_job_that_survives_its_cancellation_stays_stalled_until_it_ends() -> None:
    clock = Clock()
    dog = Watchdog(10.0, clock=clock)
    release = asyncio.Event()

    async def stubborn() -> str:
        with dog.watch("stubborn"):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await release.wait()  # e.g. a rollback on a connection that never answers
            return "ended"

    task = asyncio.create_task(stubborn())
    await settle()
    clock.now += 11
    assert dog.check() == [Stall("stubborn", 11.0)]
    await settle()
    clock.now += 100
    assert dog.stalled() == [Stall("stubborn", 111.0)], "reported until the job ends"
    assert dog.check() == []
    release.set()
    assert await task == "ended"
    assert dog.stalled() == [] and task.cancelling() == 0


async def test_livez_fails_with_the_stalled_jobs_and_recovers_when_they_end() -> None:
    clock = Clock()
    dog = Watchdog(10.0, clock=clock)
    health = HealthServer(port=0, live_within_s=1000.0, ready_checks={}, clock=clock, watchdog=dog)
    port = await health.start("127.0.0.1")
    release = asyncio.Event()
    job = watched(dog, "job-1", release=release)
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/livez"
            await settle()
            async with http.get(url) as r:
                assert r.status == 200 and "stalled_jobs" not in await r.json()
            clock.now += 12
            async with http.get(url) as r:
                assert r.status == 503
                assert await r.json() == {"live": False, "last_poll_age_s": 12.0,
                                          "stalled_jobs": [{"job_id": "job-1", "no_progress_s": 12.0}]}
            release.set()
            assert await job == "done"
            async with http.get(url) as r:
                assert r.status == 200 and (await r.json())["live"] is True
    finally:
        await health.stop()


# --- jobs that really wedge ----------------------------------------------------------------------------


async def test_job_whose_write_wedges_is_cancelled_and_handed_back_as_transient(
    emu: Any, settings: Settings, db: asyncpg.Connection,
    blockers: Callable[[str], Awaitable[Blocker]],
) -> None:
    ref = add_job(emu, "wedged-write")
    blocker = await blockers(ref.job_id)
    stall = settings.with_(page_size=20, prefetch_pages=2, job_stall_timeout_s=1.0)
    async with runtime(stall) as rt:
        outcome = (await ends_within(asyncio.create_task(rt.ingestor.ingest(ref)), 15)).result()
        assert outcome.outcome == "transient", outcome
        assert outcome.reason is not None and outcome.reason.startswith("stalled:"), outcome.reason
        await assert_nothing_left_open(db)
        await blocker.release()
        assert (await rt.ingestor.ingest(ref)).outcome == "ingested"


async def test_job_whose_fetch_wedges_is_cancelled_and_handed_back_as_transient(
    emu: Any, settings: Settings, db: asyncpg.Connection,
) -> None:
    ref = add_job(emu, "wedged-fetch", faces=30)
    emu.configure(latency_s=3.0)  # far above the stall timeout
    async with runtime(settings.with_(job_stall_timeout_s=1.0)) as rt:
        outcome = (await ends_within(asyncio.create_task(rt.ingestor.ingest(ref)), 10)).result()
    assert outcome.outcome == "transient" and (outcome.reason or "").startswith("stalled:"), outcome
    assert outcome.seconds < 2.5, "cancelled at the deadline, not when the answer came"
    await assert_nothing_left_open(db)
    # The emulator answers the abandoned call later: let it, so the next test starts from zero calls.
    await wait_until(lambda: emu.stats()["requests"] >= 1, "the abandoned call", timeout_s=10)


async def test_livez_is_503_while_a_job_is_stalled_and_200_once_it_is_cancelled(
    emu: Any, settings: Settings, db: asyncpg.Connection,
    blockers: Callable[[str], Awaitable[Blocker]],
) -> None:
    ref = add_job(emu, "livez")
    await blockers(ref.job_id)
    # Checked by hand: the job stays past its deadline, and /livez red, until this test cancels it.
    dog = Watchdog(1.0, check_interval_s=3600)
    async with runtime(settings.with_(page_size=20, prefetch_pages=2)) as rt:
        ingestor = Ingestor(rt.fetcher, rt.store, prefetch_pages=2, decoder=rt.ingestor.decoder, watchdog=dog)
        health = HealthServer(port=0, live_within_s=1000.0, ready_checks={}, watchdog=dog)
        port = await health.start("127.0.0.1")
        try:
            job = asyncio.create_task(ingestor.ingest(ref))
            await pages_queued(emu, db)
            async with aiohttp.ClientSession() as http, asyncio.timeout(15):
                url = f"http://127.0.0.1:{port}/livez"
                while True:
                    async with http.get(url) as r:
                        body = await r.json()
                        if r.status == 503:
                            break
                        assert r.status == 200 and not job.done()
                    await asyncio.sleep(0.1)
                assert [s["job_id"] for s in body["stalled_jobs"]] == [ref.job_id]
                # Past the 1 s deadline (reported to a tenth of a second).
                assert body["stalled_jobs"][0]["no_progress_s"] >= 1.0
                assert [s.job_id for s in dog.check()] == [ref.job_id]
                outcome = (await ends_within(job, 10)).result()
                assert outcome.outcome == "transient" and (outcome.reason or "").startswith("stalled:")
                async with http.get(url) as r:
                    assert r.status == 200
            await assert_nothing_left_open(db)
        finally:
            await health.stop()
