"""The limiter against the emulator over HTTP, with a quota, latency and faults; and fleet mode.

The figures asserted here are the issue's done-when criteria, measured as shares of the calls the
emulator recorded. They are properties of the limiter (how many calls it lets through per second,
and how many of them the quota rejects), not of CPU speed, and hold with a margin.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import unique_job_id
from tests.helpers import runtime
from worker.config import Settings
from worker.fleet import CUT_SQL, DEFAULT_BURST_S, FLEET_AIMD_PARAMS, TAKE_SQL, FleetRateLimiter
from worker.local import synth
from worker.messages import JobRef
from worker.ratelimit import AimdController, AimdParams

pytestmark = pytest.mark.usefixtures("rekognition_endpoint")

PAGE_SIZE = 50


@contextmanager
def configured(emulator: Any, **changes: Any) -> Iterator[None]:
    """Emulator settings for one test, restored afterwards; counters start from zero."""
    before = emulator.config
    emulator.configure(**changes)
    emulator.reset_stats()
    try:
        yield
    finally:
        emulator.configure(before)


def call_figures(stats: dict[str, Any]) -> dict[str, float]:
    """Requests, throttled share, and admitted calls per second over the span of the run."""
    calls = stats["calls"]
    span_s = calls[-1][0] - calls[0][0]
    admitted = sum(1 for _, outcome in calls if outcome != "throttled")
    throttled = sum(1 for _, outcome in calls if outcome == "throttled")
    return {"requests": len(calls), "throttled_share": throttled / len(calls), "admitted_per_s": admitted / span_s,
            "span_s": span_s}


def jobs(count: int, pages: int) -> list[synth.JobFixture]:
    # A few faces short of full pages, so the last page is a partial one as in real results.
    return [synth.detection_job(unique_job_id("rl"), faces=PAGE_SIZE * pages - 7, attributes="DEFAULT", persons=2)
            for _ in range(count)]


def scenario_settings(settings: Settings, ceiling_per_s: float, concurrency: int) -> Settings:
    # Production retry timing (the suite's default settings shorten it for speed).
    return settings.with_(rekognition_tps=ceiling_per_s, max_concurrent_jobs=concurrency, page_size=PAGE_SIZE,
                          retry_base_s=0.25, retry_cap_s=20.0, max_call_attempts=8)


async def ingest_all(settings: Settings, fixtures: list[synth.JobFixture]) -> list[Any]:
    async with runtime(settings) as rt:
        return await rt.ingestor.ingest_many([JobRef.create(f.job_id, f.api) for f in fixtures],
                                             concurrency=settings.max_concurrent_jobs)


async def faces_stored(db: asyncpg.Connection, fixtures: list[synth.JobFixture]) -> list[int]:
    rows = await db.fetch("SELECT j.job_id, count(*) AS n FROM faces f JOIN jobs j ON j.ingest_id = f.ingest_id "
                          "WHERE j.job_id = any($1::text[]) GROUP BY j.job_id",
                          [f.job_id for f in fixtures])
    by_job = {r["job_id"]: r["n"] for r in rows}
    return [by_job.get(f.job_id, 0) for f in fixtures]


# --- the done-when scenarios, one process ------------------------------------------------------------


@pytest.mark.slow
async def test_ceiling_below_the_quota_is_never_throttled_and_fully_used(
        emulator: Any, settings: Settings, db: asyncpg.Connection) -> None:
    fixtures = jobs(8, pages=7)
    emulator.add_jobs(fixtures)
    with configured(emulator, quota_tps=5.0, latency_s=0.4, fault_rate=0.0):
        outcomes = await ingest_all(scenario_settings(settings, 4.0, concurrency=8), fixtures)
        figures = call_figures(emulator.stats())
    print(f"ceiling 4/s, quota 5/s: {figures}")
    assert [o.outcome for o in outcomes] == ["ingested"] * 8
    assert figures["throttled_share"] == 0.0
    assert figures["admitted_per_s"] >= 0.85 * 4.0


@pytest.mark.slow
@pytest.mark.parametrize(("throttle_error", "status"), [("ProvisionedThroughputExceededException", 400),
                                                        ("ThrottlingException", 503)])
async def test_ceiling_far_above_the_quota_converges_with_faults(
        throttle_error: str, status: int, emulator: Any, settings: Settings, db: asyncpg.Connection) -> None:
    fixtures = jobs(8, pages=10)
    emulator.add_jobs(fixtures)
    with configured(emulator, quota_tps=5.0, latency_s=0.4, fault_rate=0.05, throttle_error=throttle_error,
                    throttle_http_status=status, seed=11):
        outcomes = await ingest_all(scenario_settings(settings, 20.0, concurrency=8), fixtures)
        stats = emulator.stats()
    figures = call_figures(stats)
    print(f"ceiling 20/s, quota 5/s, 5% faults, {throttle_error}: {figures}, faults {stats['faults']}")
    assert [o.outcome for o in outcomes] == ["ingested"] * 8
    assert await faces_stored(db, fixtures) == [len(f.results) for f in fixtures]
    assert stats["faults"] > 0 and stats["throttled"] > 0  # both were exercised
    assert figures["admitted_per_s"] >= 0.75 * 5.0
    assert figures["throttled_share"] <= 0.20


# --- error classes over HTTP ---------------------------------------------------------------------------


async def test_connection_errors_get_bounded_retries_then_the_job_is_transient(
        settings: Settings, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_REKOGNITION", f"http://127.0.0.1:{port}")
    job_id = unique_job_id("closed")
    async with runtime(settings) as rt:
        outcome = await rt.ingestor.ingest(JobRef.create(job_id, "GetFaceDetection"))
    assert outcome.outcome == "transient"
    assert f"unreachable after {settings.max_call_attempts} tries" in (outcome.reason or "")
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE job_id = $1", job_id) == 0


async def test_throttled_calls_are_retried_until_the_job_is_complete(
        emulator: Any, settings: Settings, db: asyncpg.Connection) -> None:
    fixtures = jobs(3, pages=2)
    emulator.add_jobs(fixtures)
    with configured(emulator, quota_tps=2.0, latency_s=0.0, fault_rate=0.0):
        outcomes = await ingest_all(settings.with_(rekognition_tps=50.0, page_size=PAGE_SIZE), fixtures)
        stats = emulator.stats()
    assert stats["throttled"] > 0
    assert [o.outcome for o in outcomes] == ["ingested"] * 3
    assert await faces_stored(db, fixtures) == [len(f.results) for f in fixtures]


# --- fleet mode: the SQL against the Python rules -----------------------------------------------------

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def new_bucket(db: asyncpg.Connection, name: str, ceiling_per_s: float) -> None:
    await db.execute("INSERT INTO rate_limit_buckets (name, ceiling_per_s, rate_per_s, refilled_at, updated_at) "
                     "VALUES ($1, $2, $2, $3, $3)", name, ceiling_per_s, T0)


async def take(db: asyncpg.Connection, name: str, now_s: float, p: AimdParams,
               burst_s: float = DEFAULT_BURST_S) -> asyncpg.Record:
    return await db.fetchrow(TAKE_SQL, name, at(now_s), p.quiet_s, p.step_interval_s, p.increase_fraction_per_s,
                             p.probe_fraction_per_s, p.probe_band, p.forget_after_s, burst_s)


async def test_fleet_bucket_paces_by_reservation(db: asyncpg.Connection) -> None:
    p = AimdParams()
    await new_bucket(db, "pace", 5.0)
    waits = []
    for now_s in (0.0, 0.0, 0.0, 0.1, 2.0, 10.0, 10.0):
        row = await take(db, "pace", now_s, p, burst_s=0.0)
        waits.append(round(max(0.0, -row["tokens"]) / row["rate_per_s"], 6))
    # Slots 0, 0.2, 0.4, 0.6 (asked at 0.1), then idle: with no burst credit, 10.0 and 10.2.
    assert waits == [0.0, 0.2, 0.4, 0.5, 0.0, 0.0, 0.2]


@pytest.mark.parametrize("p", [AimdParams(), FLEET_AIMD_PARAMS], ids=["process-rules", "fleet-rules"])
async def test_fleet_sql_follows_the_same_aimd_rules_as_the_process_limiter(
        p: AimdParams, db: asyncpg.Connection) -> None:
    await new_bucket(db, "aimd", 20.0)
    python = AimdController(ceiling_per_s=20.0, params=p)
    # (time, event, reservation time of the throttled call); "burst" is two takes at once, so one waits
    # (in a bucket without burst credit: the credit's own tests are in test_ratelimit_fleet.py).
    events = [(0.1, "take", None), (0.5, "throttle", 0.1), (0.6, "throttle", 0.1), (0.9, "burst", None),
              (1.3, "throttle", 0.9), (1.5, "take", None), (2.4, "burst", None), (2.8, "take", None),
              (3.9, "burst", None), (5.0, "take", None), (6.2, "burst", None), (7.0, "throttle", 3.9),
              (7.1, "throttle", 7.05), (8.0, "burst", None), (9.5, "burst", None), (11.0, "take", None),
              (12.0, "burst", None)]
    events += [(13.0 + i, "take", None) for i in range(10)]  # nobody waits: no climb
    events += [(23.0 + i, "burst", None) for i in range(60)]
    for now_s, event, reserved_s in events:
        if event == "throttle":
            assert reserved_s is not None
            row = await db.fetchrow(CUT_SQL, "aimd", at(now_s), p.decrease_factor, p.floor_per_s, at(reserved_s),
                                    p.isolated_decrease_factor, p.forget_after_s)
            assert (row is not None) == python.on_throttle(now_s, reserved_s), now_s
            rate = await db.fetchval("SELECT rate_per_s FROM rate_limit_buckets WHERE name = 'aimd'")
        else:
            for _ in range(2 if event == "burst" else 1):
                row = await take(db, "aimd", now_s, p, burst_s=0.0)
                python.on_success(now_s)
                if row["tokens"] < 0:
                    python.on_wait(now_s)
            rate = row["rate_per_s"]
        assert rate == pytest.approx(python.rate_per_s, rel=1e-6), (now_s, event)
    assert python.rate_per_s == 20.0  # forgot the cut rate after a minute and went back to the ceiling


async def test_fleet_take_reads_the_clock_after_waiting_for_the_row(db_url: str, db: asyncpg.Connection) -> None:
    p = AimdParams()
    await db.execute("INSERT INTO rate_limit_buckets (name, ceiling_per_s, rate_per_s) VALUES ('lock', 0.5, 0.5)")
    other = await asyncpg.connect(db_url)
    try:
        async with other.transaction():
            first = await other.fetchrow(TAKE_SQL, "lock", None, p.quiet_s, p.step_interval_s,
                                         p.increase_fraction_per_s, p.probe_fraction_per_s, p.probe_band,
                                         p.forget_after_s, DEFAULT_BURST_S)
            blocked = asyncio.create_task(db.fetchrow(TAKE_SQL, "lock", None, p.quiet_s, p.step_interval_s,
                                                      p.increase_fraction_per_s, p.probe_fraction_per_s,
                                                      p.probe_band, p.forget_after_s, DEFAULT_BURST_S))
            await asyncio.sleep(0.8)
        second = await blocked
    finally:
        await other.close()
    # The second take read the clock after the lock was released, and refilled the first one's row:
    # 0 tokens + 0.8 s x 0.5/s - 1 (an old row version would have given 0).
    waited_s = (second["refilled_at"] - first["refilled_at"]).total_seconds()
    assert waited_s >= 0.75
    assert first["tokens"] == 0.0 and second["tokens"] == pytest.approx(waited_s * 0.5 - 1.0, abs=1e-3)


async def test_a_throttle_seen_by_one_process_slows_every_process(db_url: str) -> None:
    a = FleetRateLimiter(db_url, ceiling_per_s=8.0, name="shared")
    b = FleetRateLimiter(db_url, ceiling_per_s=8.0, name="shared")
    await a.open()
    await b.open()
    try:
        permit = await a.__aenter__()
        await b.__aenter__()
        await a.record_throttle(permit)
        await b.record_throttle(permit)  # the same event, reported twice: one cut
        await b.__aenter__()
        assert a.rate_per_s == b.rate_per_s == 6.4  # the fleet's first throttle is a blip: -20 %
    finally:
        await a.close()
        await b.close()


# --- fleet mode: three worker processes, one quota -------------------------------------------------------


@pytest.mark.slow
async def test_three_processes_in_fleet_mode_share_one_quota(
        emulator: Any, db_url: str, db: asyncpg.Connection, tmp_path: Path) -> None:
    per_process = [jobs(4, pages=7) for _ in range(3)]
    emulator.add_jobs([f for group in per_process for f in group])
    env = {**os.environ, "DATABASE_URL": db_url, "RATE_LIMIT_SCOPE": "fleet", "REKOGNITION_TPS": "5",
           "MAX_CONCURRENT_JOBS": "4", "PAGE_SIZE": str(PAGE_SIZE), "LOG_FORMAT": "json",
           "AWS_ENDPOINT_URL_REKOGNITION": emulator.url}
    with configured(emulator, quota_tps=5.0, latency_s=0.4, fault_rate=0.0):
        procs = []
        for n, group in enumerate(per_process):
            job_file = tmp_path / f"jobs-{n}.txt"
            job_file.write_text("".join(f"{f.job_id},{f.api}\n" for f in group))
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker", "backfill", "--from-file", str(job_file), env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE))
        results = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), timeout=120)
        stats = emulator.stats()
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, (out.decode()[-2000:], err.decode()[-2000:])
    figures = call_figures(stats)
    grants = await db.fetchval("SELECT sum(grants) FROM rate_limit_buckets")
    print(f"fleet of 3, REKOGNITION_TPS=5, quota 5/s: {figures}, grants {grants}")
    assert grants == stats["requests"]  # every call of every process took its slot from the shared row
    for group in per_process:
        assert await faces_stored(db, group) == [len(f.results) for f in group]
    assert figures["admitted_per_s"] >= 0.85 * 5.0
    assert figures["throttled_share"] <= 0.05
