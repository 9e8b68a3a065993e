"""Fleet mode (RATE_LIMIT_SCOPE=fleet): every process sharing one database shares one Get* budget.

The budget is one row of ``rate_limit_buckets`` (migration 0003). Each call takes its slot with one
atomic ``UPDATE ... RETURNING`` that refills the bucket by elapsed *server* time (``clock_timestamp()``,
so all processes share one clock) and takes a token; a negative balance is a reservation, and the
statement returns how long to wait for it. That is even pacing at ``rate_per_s`` across the fleet,
with exactly one statement per call and no polling. Slots nobody asked for in time are kept as credit
up to ``burst_s`` of the rate (a bucket capped at one token threw them away whenever every process was
busy elsewhere at once); a call whose process was held up past its slot spends that credit, so the
calls that go out together after a stall are never more than a bucket of one token would send.

The AIMD rules of :mod:`worker.ratelimit` run in the same row: a throttle seen by any process cuts
the shared rate (once per round: only for calls reserved after the last cut), and the take statement
raises it again after a quiet period. A lone throttle (none for a minute) is a blip: a 20 % cut with
no knee, climbed straight back (``FLEET_AIMD_PARAMS``). So the fleet behaves like one process with one
limiter, and REKOGNITION_TPS is the ceiling of the whole fleet. Why: docs/rate-limiting.md.

Each process keeps at most one reservation outstanding (a local lock held while it waits), so a cut
reaches the next call of every process, and the connection is its own: a job's long write
transaction never holds up the limiter.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import asyncpg

from worker.db.engine import connect
from worker.errors import InfrastructureError
from worker.logs import get_logger
from worker.ratelimit import AimdParams, Clock, OnRateChange, Permit, Sleep

log = get_logger(__name__)

# Created on first use; REKOGNITION_TPS of the process that started last is the fleet's ceiling.
UPSERT_SQL = """
INSERT INTO rate_limit_buckets AS b (name, ceiling_per_s, rate_per_s)
VALUES ($1, $2::float8, $2::float8)
ON CONFLICT (name) DO UPDATE
SET ceiling_per_s = EXCLUDED.ceiling_per_s,
    rate_per_s = least(b.rate_per_s, EXCLUDED.ceiling_per_s),
    updated_at = clock_timestamp()
RETURNING b.rate_per_s
"""

# One slot: refill by elapsed time at the old rate up to the burst capacity, maybe raise the rate (AIMD, as
# ratelimit.AimdController.on_success: a step is due, and some call waited for a slot during it), take a
# token, and note whether this call has to wait. The row subquery is re-evaluated if the row was updated
# while this statement waited for its lock, so "now" is always read after the lock.
# The row holds the balance as a line: ``tokens`` at ``refilled_at``, growing at ``rate_per_s`` since. A
# balance above one token is stored as one token at an earlier time (the column is capped at 1 by
# migration 0003's CHECK); the next refill gives the credit back. ``updated_at`` is the take's own time.
# $1 name, $2 now (NULL: clock_timestamp(); tests pass times), $3 quiet_s, $4 step_interval_s,
# $5 increase_fraction_per_s, $6 probe_fraction_per_s, $7 probe_band, $8 forget_after_s, $9 burst_s.
TAKE_SQL = """
UPDATE rate_limit_buckets AS b
SET (rate_per_s, increased_at, tokens, refilled_at, waited_at, grants, updated_at) = (
    SELECT s.rate_per_s, s.increased_at, least(1.0, s.tokens),
           greatest(b.refilled_at, s.now - greatest(0.0, s.tokens - 1.0) / s.rate_per_s * interval '1 second'),
           CASE WHEN s.tokens < 0 THEN s.now ELSE b.waited_at END, b.grants + 1, s.now
    FROM (
        SELECT d.now,
               least(greatest(1.0, $9::float8 * b.rate_per_s), b.tokens + d.elapsed_s * b.rate_per_s) - 1.0
                   AS tokens,
               CASE WHEN NOT (d.step_due AND b.waited_at >= d.step_from) THEN b.rate_per_s
                    WHEN b.cut_rate_per_s IS NULL OR d.quiet_for_s >= $8::float8
                        THEN least(b.ceiling_per_s, b.rate_per_s + $5::float8 * b.ceiling_per_s * d.since_s)
                    WHEN b.rate_per_s < (1.0 - $7::float8) * b.cut_rate_per_s
                        THEN least(b.ceiling_per_s, (1.0 - $7::float8) * b.cut_rate_per_s,
                                   b.rate_per_s + $5::float8 * b.ceiling_per_s * d.since_s)
                    ELSE least(b.ceiling_per_s, b.rate_per_s + $6::float8 * b.ceiling_per_s * d.since_s)
               END AS rate_per_s,
               CASE WHEN d.step_due THEN d.now ELSE b.increased_at END AS increased_at
        FROM (
            SELECT e.*, b.rate_per_s < b.ceiling_per_s AND e.now >= e.quiet_from
                        AND e.since_s >= $4::float8 AS step_due
            FROM (
                SELECT c.now, c.quiet_from, greatest(b.increased_at, c.quiet_from) AS step_from,
                       greatest(0.0, extract(epoch FROM c.now - b.refilled_at)::float8) AS elapsed_s,
                       extract(epoch FROM c.now - greatest(b.increased_at, c.quiet_from))::float8 AS since_s,
                       extract(epoch FROM c.now - b.cut_at)::float8 AS quiet_for_s
                FROM (SELECT coalesce($2::timestamptz, clock_timestamp()) AS now,
                             b.cut_at + $3::float8 * interval '1 second' AS quiet_from) AS c
            ) AS e
        ) AS d
    ) AS s
)
WHERE b.name = $1
RETURNING b.rate_per_s, b.tokens, b.refilled_at, b.updated_at
"""

# A throttle: cut the shared rate, unless the throttled call was reserved before the last cut (it was
# paced at the old rate; its throttle is part of the event already acted on). No row: nothing cut. As
# ratelimit.AimdController.on_throttle: the first throttle after $7 seconds without one is a blip, cut by
# $6 with no knee remembered ($6 NULL: every cut is by $3 and remembers the rate it cut).
# $1 name, $2 now (NULL: clock_timestamp()), $3 decrease_factor, $4 floor_per_s, $5 the call's reservation time,
# $6 isolated_decrease_factor, $7 forget_after_s.
CUT_SQL = """
UPDATE rate_limit_buckets AS b
SET (cut_rate_per_s, rate_per_s, cut_at, cuts, updated_at) = (
    SELECT CASE WHEN c.isolated THEN NULL ELSE b.rate_per_s END,
           greatest(least($4::float8, b.ceiling_per_s),
                    b.rate_per_s * CASE WHEN c.isolated THEN $6::float8 ELSE $3::float8 END),
           c.now, b.cuts + 1, c.now
    FROM (
        SELECT n.now, $6::float8 IS NOT NULL AND extract(epoch FROM n.now - b.cut_at)::float8 >= $7::float8
                   AS isolated
        FROM (SELECT coalesce($2::timestamptz, clock_timestamp()) AS now) AS n
    ) AS c
)
WHERE b.name = $1 AND b.cut_at <= $5::timestamptz
RETURNING b.rate_per_s
"""

# The fleet's rate sits at REKOGNITION_TPS, set below the quota: a lone throttle is a blip (calls of several
# processes that bunched up on the way), cut by the probe band and climbed straight back (docs/rate-limiting.md).
FLEET_AIMD_PARAMS = AimdParams(isolated_decrease_factor=0.8)

# Slots nobody asked for in time are kept as credit up to this many seconds of the rate (at least one
# token), so a moment when every process is busy elsewhere costs no quota; see docs/rate-limiting.md.
DEFAULT_BURST_S = 0.5

# A call sent late (its process was stopped or starved past its slot) goes out bunched with the calls
# after it, as with a bucket of one token; burst credit on top would make the bunch bigger than the
# account's bucket can take. So it spends the credit above one token: refill up to the burst, then take
# up to one token, never leaving less than one (what a bucket of one token would hold). No new debt, no
# wait; counts nothing and changes no AIMD state.
# $1 name, $2 now (NULL: clock_timestamp()), $3 burst_s.
LATE_SQL = """
UPDATE rate_limit_buckets AS b
SET (tokens, refilled_at) = (
    SELECT least(1.0, s.tokens),
           greatest(b.refilled_at, s.now - greatest(0.0, s.tokens - 1.0) / b.rate_per_s * interval '1 second')
    FROM (
        SELECT r.now, r.tokens - least(1.0, greatest(0.0, r.tokens - 1.0)) AS tokens
        FROM (
            SELECT c.now, least(greatest(1.0, $3::float8 * b.rate_per_s),
                                b.tokens + greatest(0.0, extract(epoch FROM c.now - b.refilled_at)::float8)
                                           * b.rate_per_s) AS tokens
            FROM (SELECT coalesce($2::timestamptz, clock_timestamp()) AS now) AS c
        ) AS r
    ) AS s
)
WHERE b.name = $1
RETURNING b.tokens, b.refilled_at
"""

# A call this far past its slot (or one slot period, if longer) was held up on its way: see LATE_SQL.
LATE_AFTER_S = 0.05

_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class FleetRateLimiter:
    """A limiter whose bucket and AIMD state are one PostgreSQL row shared by every process.

    ``await open()`` before use and ``await close()`` after. Same protocol as
    :class:`worker.ratelimit.RateLimiter`: ``async with limiter as permit``, then report the outcome.
    """

    def __init__(self, dsn: str, *, ceiling_per_s: float, name: str = "rekognition",
                 params: AimdParams | None = None, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep,
                 on_change: OnRateChange | None = None, statement_timeout_s: float = 10.0,
                 burst_s: float = DEFAULT_BURST_S) -> None:
        if not ceiling_per_s > 0:
            raise ValueError(f"ceiling_per_s must be > 0 (got {ceiling_per_s})")
        if not burst_s >= 0:
            raise ValueError(f"burst_s must be >= 0 (got {burst_s})")
        self.dsn = dsn
        self.name = name
        self.ceiling_per_s = ceiling_per_s
        self.params = params or FLEET_AIMD_PARAMS
        self.burst_s = burst_s
        self._clock = clock
        self._sleep = sleep
        self._on_change = on_change
        self._timeout_s = statement_timeout_s
        self._rate_per_s = ceiling_per_s
        self._conn: asyncpg.Connection | None = None
        # One statement at a time on the connection; one reservation at a time per process.
        self._conn_lock = asyncio.Lock()
        self._slot_lock = asyncio.Lock()

    @property
    def rate_per_s(self) -> float:
        """The fleet's rate as of this process's last statement."""
        return self._rate_per_s

    async def open(self) -> None:
        row = await self._fetchrow(UPSERT_SQL, self.name, self.ceiling_per_s)
        if row is not None:
            self._rate_per_s = float(row["rate_per_s"])

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close(timeout=self._timeout_s)

    async def __aenter__(self) -> Permit:
        async with self._slot_lock:
            row = await self._take()
            if row is None:
                # The row is gone (an operator reset it, a test truncated it): recreate it and go on.
                await self.open()
                row = await self._take()
                if row is None:
                    raise InfrastructureError(f"fleet rate limit bucket {self.name!r} vanished")
            rate_per_s = float(row["rate_per_s"])
            self._observe(rate_per_s, "fleet")
            # A negative balance is this call's place in the fleet's queue.
            wait_s = max(0.0, -float(row["tokens"])) / rate_per_s
            due_s = self._clock() + wait_s
            if wait_s > 0:
                await self._sleep(wait_s)
            if self._clock() - due_s > max(LATE_AFTER_S, 1.0 / rate_per_s):
                await self._fetchrow(LATE_SQL, self.name, None, self.burst_s)
        return Permit(sent_s=self._clock(), fleet_slot=row["updated_at"])

    async def _take(self) -> Any:
        p = self.params
        return await self._fetchrow(TAKE_SQL, self.name, None, p.quiet_s, p.step_interval_s,
                                    p.increase_fraction_per_s, p.probe_fraction_per_s, p.probe_band,
                                    p.forget_after_s, self.burst_s)

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def record_throttle(self, permit: Permit | None = None) -> None:
        reserved_at = permit.fleet_slot if permit is not None else None
        if not isinstance(reserved_at, datetime):
            return  # not one of ours: nothing to compare with the last cut
        p = self.params
        row = await self._fetchrow(CUT_SQL, self.name, None, p.decrease_factor, p.floor_per_s, reserved_at,
                                   p.isolated_decrease_factor, p.forget_after_s)
        if row is not None:
            self._observe(float(row["rate_per_s"]), "throttled")

    def record_success(self, permit: Permit | None = None) -> None:
        """Nothing to do: the take statement raises the shared rate by quiet time, not per success."""

    def _observe(self, rate_per_s: float, why: str) -> None:
        if abs(rate_per_s - self._rate_per_s) <= 1e-9 * max(1.0, rate_per_s):
            return
        self._rate_per_s = rate_per_s
        if self._on_change is not None:
            self._on_change(rate_per_s, why)

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        async with self._conn_lock:
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await connect(
                        self.dsn, application_name="rekognition-worker-limiter",
                        timeout=self._timeout_s, command_timeout=self._timeout_s,
                    )
                return await self._conn.fetchrow(sql, *args)
            except _DB_ERRORS as exc:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.terminate()
                raise InfrastructureError(f"fleet rate limiter: database unavailable: {type(exc).__name__}: {exc}") \
                    from exc
