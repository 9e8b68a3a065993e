"""The fleet bucket's burst credit (slots nobody asked for in time are kept, up to ``burst_s`` of the rate)
and its answer to a lone throttle (a gentle cut, climbed straight back).

Each take runs the production statement against a real PostgreSQL with a fixed ``now`` (no sleeping).
Quota use of three real processes is measured by bench/fleet_bench.py, not asserted here (its smoke run
below proves only that it runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from worker.fleet import CUT_SQL, DEFAULT_BURST_S, FLEET_AIMD_PARAMS, LATE_SQL, TAKE_SQL, FleetRateLimiter
from worker.ratelimit import AimdParams

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2030, 1, 1, tzinfo=UTC)
P = AimdParams()


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def new_bucket(db: asyncpg.Connection, name: str, rate_per_s: float) -> None:
    await db.execute("INSERT INTO rate_limit_buckets (name, ceiling_per_s, rate_per_s, refilled_at, updated_at) "
                     "VALUES ($1, $2, $2, $3, $3)", name, rate_per_s, T0)


async def take(db: asyncpg.Connection, name: str, now_s: float, burst_s: float) -> asyncpg.Record:
    return await db.fetchrow(TAKE_SQL, name, at(now_s), P.quiet_s, P.step_interval_s, P.increase_fraction_per_s,
                             P.probe_fraction_per_s, P.probe_band, P.forget_after_s, burst_s)


async def cut(db: asyncpg.Connection, name: str, now_s: float, reserved_s: float,
              p: AimdParams = P) -> asyncpg.Record | None:
    return await db.fetchrow(CUT_SQL, name, at(now_s), p.decrease_factor, p.floor_per_s, at(reserved_s),
                             p.isolated_decrease_factor, p.forget_after_s)


async def slots(db: asyncpg.Connection, name: str, asks_s: list[float], burst_s: float) -> list[float]:
    """When each ask gets its slot: the time it asked plus the wait the statement hands back."""
    out = []
    for now_s in asks_s:
        row = await take(db, name, now_s, burst_s)
        out.append(round(now_s + max(0.0, -row["tokens"]) / row["rate_per_s"], 6))
    return out


async def test_unused_slots_are_kept_as_credit_up_to_the_burst(db: asyncpg.Connection) -> None:
    await new_bucket(db, "credit", 5.0)
    # Idle for 10 s, then five asks at once: 0.5 s of credit at 5/s is 2.5 tokens, so three go at once
    # (one of them on the half token plus the first slot's refill) and the rest are paced from there.
    assert await slots(db, "credit", [0.0, 10.0, 10.0, 10.0, 10.0, 10.0], burst_s=0.5) == \
        [0.0, 10.0, 10.0, 10.1, 10.3, 10.5]
    # Without credit (the old bucket of one token) only one goes at once.
    await new_bucket(db, "no-credit", 5.0)
    assert await slots(db, "no-credit", [0.0, 10.0, 10.0, 10.0, 10.0, 10.0], burst_s=0.0) == \
        [0.0, 10.0, 10.2, 10.4, 10.6, 10.8]


async def test_a_late_ask_takes_the_slot_it_missed(db: asyncpg.Connection) -> None:
    # Three processes each ask late for their next slot (every process busy elsewhere for a moment): with a
    # bucket of one token those slots are gone for good; with credit the fleet catches up at once.
    asks = [0.0, 0.2, 0.4, 1.0, 1.0, 1.0, 1.0]
    await new_bucket(db, "late", 5.0)
    caught_up = await slots(db, "late", asks, burst_s=0.5)
    await new_bucket(db, "late-old", 5.0)
    lost = await slots(db, "late-old", asks, burst_s=0.0)
    # 0.6 s since the last slot is three tokens: a bucket of one keeps one, and two slots are gone for good.
    assert lost == [0.0, 0.2, 0.4, 1.0, 1.2, 1.4, 1.6]
    # 0.5 s of credit keeps 2.5 of them: two asks go at once and the fleet is back on its old schedule.
    assert caught_up == [0.0, 0.2, 0.4, 1.0, 1.0, 1.1, 1.3]


async def test_calls_sent_late_spend_the_credit_instead_of_adding_to_it(db: asyncpg.Connection) -> None:
    await new_bucket(db, "late-calls", 5.0)
    # Three processes hold reservations for 0.2, 0.4 and 0.6 s; the machine stalls until 2.0 s.
    assert await slots(db, "late-calls", [0.0, 0.0, 0.0, 0.0], burst_s=0.5) == [0.0, 0.2, 0.4, 0.6]
    # Each late call goes out at 2.0 s, bunched: it spends the credit above one token (2.5 by then)...
    spent = [await db.fetchrow(LATE_SQL, "late-calls", at(2.0), 0.5) for _ in range(3)]
    balances = [r["tokens"] + (at(2.0) - r["refilled_at"]).total_seconds() * 5.0 for r in spent]
    assert balances == pytest.approx([1.5, 1.0, 1.0])  # ... never less than one token: no debt, no wait
    # So one more goes with the three late ones, as a bucket of one token allows, not 2.5 more.
    assert await slots(db, "late-calls", [2.0, 2.0], burst_s=0.5) == [2.0, 2.2]
    # With reservations outstanding a late call changes nothing.
    await slots(db, "late-calls", [2.0, 2.0], burst_s=0.5)
    before = await db.fetchrow("SELECT tokens, refilled_at FROM rate_limit_buckets WHERE name = 'late-calls'")
    after = await db.fetchrow(LATE_SQL, "late-calls", at(2.0), 0.5)
    assert after["tokens"] == before["tokens"] < 0 and after["refilled_at"] == before["refilled_at"]


async def test_credit_never_exceeds_the_burst_and_survives_storage(db: asyncpg.Connection) -> None:
    await new_bucket(db, "cap", 4.0)
    row = await take(db, "cap", 100.0, burst_s=1.0)  # 4 tokens of credit after a long idle, one taken
    # The column holds at most one token (migration 0003's CHECK): the rest is the line's earlier start.
    assert row["tokens"] == 1.0
    assert row["updated_at"] == at(100.0)
    assert (row["updated_at"] - row["refilled_at"]).total_seconds() == pytest.approx(2.0 / 4.0)
    assert await slots(db, "cap", [100.0, 100.0, 100.0, 100.0], burst_s=1.0) == [100.0, 100.0, 100.0, 100.25]


async def test_a_throttle_after_a_cut_is_judged_by_the_take_time_not_the_credit(db: asyncpg.Connection) -> None:
    await new_bucket(db, "judge", 5.0)
    await take(db, "judge", 0.0, burst_s=1.0)
    assert await cut(db, "judge", 9.95, reserved_s=0.0) is not None
    # Asked at 10.0, after the cut, on credit whose line starts before the cut: its throttle is new evidence.
    row = await take(db, "judge", 10.0, burst_s=1.0)
    assert row["refilled_at"] < at(9.95) < row["updated_at"] == at(10.0)
    again = await db.fetchrow(CUT_SQL, "judge", at(10.4), P.decrease_factor, P.floor_per_s, row["updated_at"],
                              P.isolated_decrease_factor, P.forget_after_s)
    assert again is not None and again["rate_per_s"] == pytest.approx(1.25)


async def test_a_cut_shrinks_the_credit_with_the_rate(db: asyncpg.Connection) -> None:
    await new_bucket(db, "shrink", 5.0)
    await take(db, "shrink", 10.0, burst_s=0.5)  # 1.5 tokens left: one stored, half a token as 0.1 s
    # (Uncut, the next three would go at 10.0, 10.0 and 10.1.)
    await cut(db, "shrink", 10.0, reserved_s=10.0)
    # At 2.5/s those 0.1 s are a quarter token, and the burst is 1.25 tokens: one goes at once, then paced.
    assert await slots(db, "shrink", [10.0, 10.0, 10.0], burst_s=0.5) == [10.0, 10.3, 10.7]


def test_limiter_rejects_a_negative_burst() -> None:
    with pytest.raises(ValueError, match="burst_s"):
        FleetRateLimiter("postgresql://unused", ceiling_per_s=5.0, burst_s=-1.0)
    assert FleetRateLimiter("postgresql://unused", ceiling_per_s=5.0, name="rekognition-start").burst_s == \
        DEFAULT_BURST_S


async def test_a_lone_throttle_is_a_blip_and_the_rate_climbs_straight_back(db: asyncpg.Connection) -> None:
    p = FLEET_AIMD_PARAMS
    await new_bucket(db, "blip", 5.0)

    async def rate_after_busy_second(now_s: float) -> float:
        # Three asks at once: the fleet is waiting for slots, so the rate may climb.
        for _ in range(3):
            row = await db.fetchrow(TAKE_SQL, "blip", at(now_s), p.quiet_s, p.step_interval_s,
                                    p.increase_fraction_per_s, p.probe_fraction_per_s, p.probe_band,
                                    p.forget_after_s, 0.0)
        return float(row["rate_per_s"])

    # The first throttle in a minute: -20 %, and no knee (the rate held at 5/s is what the quota allowed).
    row = await cut(db, "blip", 100.0, reserved_s=100.0, p=p)
    assert row is not None and row["rate_per_s"] == pytest.approx(4.0)
    assert await db.fetchval("SELECT cut_rate_per_s FROM rate_limit_buckets WHERE name = 'blip'") is None
    # After the quiet second, +10 % of the ceiling per second, all the way back.
    assert [await rate_after_busy_second(100.0 + t) for t in (1.0, 2.0, 3.0, 4.0)] == \
        pytest.approx([4.0, 4.5, 5.0, 5.0])
    # A second throttle within the minute is no blip: halve, and remember the knee below 5/s.
    row = await cut(db, "blip", 110.0, reserved_s=110.0, p=p)
    assert row is not None and row["rate_per_s"] == pytest.approx(2.5)
    assert await db.fetchval("SELECT cut_rate_per_s FROM rate_limit_buckets WHERE name = 'blip'") == 5.0


@pytest.mark.slow
def test_fleet_bench_runs_end_to_end(tmp_path: Path, pg_server_url: str) -> None:
    """The fleet benchmark runs on a tiny workload, so it cannot rot. No figure is asserted."""
    out = tmp_path / "fleet.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["DATABASE_URL"] = pg_server_url
    result = subprocess.run([sys.executable, "bench/fleet_bench.py", "--processes", "2", "--jobs", "1", "--pages",
                             "3", "--latency-s", "0", "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "quota used" in result.stdout
    [run] = json.loads(out.read_text())["results"]["this tree"]
    assert run["calls"] >= 6 and run["jobs"] == {"ingested": 2} and "mean_rate_per_s" in run["bucket"]
