"""One limiter per process for every Rekognition Get* call, adapting to throttling.

Pacing is asyncio-throttle's Throttler with one call per period (even spacing, no bursts). Two
things are changed in a subclass: it sleeps exactly until the next slot instead of polling every
10 ms (many waiting jobs would otherwise wake thousands of times a second), and it takes an
injected clock so the logic is testable without sleeping. (aiolimiter, its maintained successor,
fixes its rate at construction and reads time only from the event loop: a worse fit for a rate that
changes all the time; see docs/rate-limiting.md.) The rate itself is steered by an AIMD
controller: cut multiplicatively on a throttling answer, recover additively after a quiet period,
fast up to just below the rate that was last throttled and slowly past it.

The same AIMD rules run in SQL for fleet mode (``worker.fleet``); both read :class:`AimdParams`.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from asyncio_throttle.throttler import Throttler

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
OnRateChange = Callable[[float, str], None]


def full_jitter_backoff_s(attempt: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """AWS "full jitter": uniform in [0, min(cap, base * 2**attempt)]. ``attempt`` counts from 0."""
    ceiling = min(cap_s, base_s * (2 ** min(attempt, 30)))
    return rng.uniform(0.0, ceiling)


@dataclass(frozen=True, slots=True)
class AimdParams:
    """How the call rate reacts to throttling; shared by the process limiter and the fleet bucket.

    Defaults were measured against a 5/s token-bucket quota with 0.4 s latency (docs/rate-limiting.md).
    """

    # A throttle means the rate is above the quota; halving is below it for any overshoot up to 2x.
    decrease_factor: float = 0.5
    # No increase this soon after a cut: answers to calls sent just before the cut are still arriving.
    quiet_s: float = 1.0
    # Increases come in steps at least this far apart (also bounds "rate changed" log lines).
    step_interval_s: float = 1.0
    # Fast recovery, in fractions of the ceiling per second, up to (1 - probe_band) x the last cut rate.
    increase_fraction_per_s: float = 0.1
    # Past that point, probe slowly, in fractions of the ceiling per second. A step that does not depend
    # on the rate is what makes replicas that share a quota converge to equal shares (as AIMD does).
    probe_fraction_per_s: float = 0.02
    probe_band: float = 0.2
    # A cut rate this old is no longer evidence (the quota may have been raised): recover fast again.
    forget_after_s: float = 60.0
    floor_per_s: float = 0.05
    # When the caller cannot say when a throttled call was sent, throttles this close to a cut are one event.
    holdoff_s: float = 1.0
    # A throttle after ``forget_after_s`` without one is a blip (calls that bunched up on their way, another
    # caller's burst), not evidence of a lower quota: cut by this factor only and keep no knee, so the rate
    # climbs straight back; a second throttle within ``forget_after_s`` is a real cut. None: every throttle
    # is a real cut. Fleet mode sets it (worker.fleet.FLEET_AIMD_PARAMS): its rate sits at a ceiling chosen
    # below the quota, so a lone throttle says little about the rate.
    isolated_decrease_factor: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.decrease_factor < 1.0:
            raise ValueError(f"decrease_factor must be within (0, 1) (got {self.decrease_factor})")
        if self.isolated_decrease_factor is not None and not 0.0 < self.isolated_decrease_factor < 1.0:
            raise ValueError(f"isolated_decrease_factor must be within (0, 1) or None "
                             f"(got {self.isolated_decrease_factor})")
        if not 0.0 <= self.probe_band < 1.0:
            raise ValueError(f"probe_band must be within [0, 1) (got {self.probe_band})")
        for name in ("quiet_s", "step_interval_s", "increase_fraction_per_s", "probe_fraction_per_s",
                     "forget_after_s", "floor_per_s", "holdoff_s"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")


def increased_rate(rate_per_s: float, *, ceiling_per_s: float, cut_rate_per_s: float | None, since_s: float,
                   quiet_for_s: float, params: AimdParams) -> float:
    """The rate after ``since_s`` more throttle-free seconds (``quiet_for_s`` since the last cut).

    Below ``(1 - probe_band) x cut_rate`` it climbs fast but stops there; within reach of the rate
    that was throttled it probes slowly. Both steps are fractions of the ceiling per second. With no
    cut rate, or one older than ``forget_after_s``, it climbs fast all the way to the ceiling.
    """
    fast_per_s = params.increase_fraction_per_s * ceiling_per_s
    if cut_rate_per_s is None or quiet_for_s >= params.forget_after_s:
        return min(ceiling_per_s, rate_per_s + fast_per_s * since_s)
    knee_per_s = (1.0 - params.probe_band) * cut_rate_per_s
    if rate_per_s < knee_per_s:
        return min(ceiling_per_s, knee_per_s, rate_per_s + fast_per_s * since_s)
    return min(ceiling_per_s, rate_per_s + params.probe_fraction_per_s * ceiling_per_s * since_s)


@dataclass(slots=True)
class AimdController:
    """Additive-increase, multiplicative-decrease of a call rate. Pure: the caller passes the time.

    A throttle cuts the rate unless the throttled call was sent before the last cut (it was paced
    at the old rate, so it says nothing about the new one). The rate at the cut is remembered: after
    ``quiet_s`` the rate climbs back fast to just below it and probes slowly beyond (with
    ``isolated_decrease_factor`` set, a throttle after a throttle-free ``forget_after_s`` cuts gently
    and remembers no rate, so the climb goes straight back). It climbs only
    while the rate is what holds calls back (a call waited for its slot, see :meth:`on_wait`): a
    rate that nobody used is no evidence that the quota allows it.
    """

    ceiling_per_s: float
    params: AimdParams = field(default_factory=AimdParams)
    rate_per_s: float = 0.0
    cut_rate_per_s: float | None = None
    _last_cut_s: float = -math.inf
    _last_increase_s: float = -math.inf
    _last_wait_s: float = -math.inf

    def __post_init__(self) -> None:
        if not self.ceiling_per_s > 0:
            raise ValueError(f"ceiling_per_s must be > 0 (got {self.ceiling_per_s})")
        if self.rate_per_s <= 0:
            self.rate_per_s = self.ceiling_per_s
        self.rate_per_s = min(self.rate_per_s, self.ceiling_per_s)

    @property
    def last_cut_s(self) -> float:
        return self._last_cut_s

    def on_throttle(self, now_s: float, sent_s: float | None = None) -> bool:
        """Returns True when the rate was cut. ``sent_s``: when the throttled call left (same clock)."""
        if sent_s is not None:
            if sent_s < self._last_cut_s:
                return False
        elif now_s - self._last_cut_s < self.params.holdoff_s:
            return False
        factor = self.params.decrease_factor
        if self.params.isolated_decrease_factor is not None and now_s - self._last_cut_s >= self.params.forget_after_s:
            factor, self.cut_rate_per_s = self.params.isolated_decrease_factor, None
        else:
            self.cut_rate_per_s = self.rate_per_s
        self.rate_per_s = max(min(self.params.floor_per_s, self.ceiling_per_s), self.rate_per_s * factor)
        self._last_cut_s = now_s
        return True

    def on_wait(self, now_s: float) -> None:
        """A call had to wait for its slot at ``now_s``: the rate, not the callers, limits calls now."""
        self._last_wait_s = max(self._last_wait_s, now_s)

    def on_success(self, now_s: float) -> bool:
        """Returns True when the rate was raised."""
        quiet_from_s = self._last_cut_s + self.params.quiet_s
        if self.rate_per_s >= self.ceiling_per_s or now_s < quiet_from_s:
            return False
        step_from_s = max(self._last_increase_s, quiet_from_s)
        since_s = now_s - step_from_s
        if since_s < self.params.step_interval_s:
            return False
        self._last_increase_s = now_s
        if self._last_wait_s < step_from_s:
            return False  # nobody waited for a slot during this step: the step passes unused
        new_rate = increased_rate(self.rate_per_s, ceiling_per_s=self.ceiling_per_s,
                                  cut_rate_per_s=self.cut_rate_per_s, since_s=since_s,
                                  quiet_for_s=now_s - self._last_cut_s, params=self.params)
        if new_rate <= self.rate_per_s:
            return False
        self.rate_per_s = new_rate
        return True


_SLACK_S = 1e-6


class PacedThrottler(Throttler):
    """asyncio-throttle's Throttler that waits for the exact slot and takes an injected clock."""

    def __init__(self, rate_per_s: float, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        super().__init__(rate_limit=1, period=1.0 / rate_per_s)
        self._clock = clock
        self._sleep = sleep
        # When a caller last had to wait for a slot (-inf: never).
        self.last_wait_s = -math.inf

    def set_rate(self, rate_per_s: float) -> None:
        self.period = 1.0 / rate_per_s

    def flush(self) -> None:
        now = self._clock()
        # A microsecond of slack: a timer that fires a rounding error early must not sleep again for ~0 s.
        while self._task_logs and now - self._task_logs[0] >= self.period - _SLACK_S:
            self._task_logs.popleft()

    async def acquire(self) -> float:
        """Wait for the next slot; returns the time it was taken (the call's send time)."""
        while True:
            self.flush()
            if len(self._task_logs) < self.rate_limit:
                break
            self.last_wait_s = self._clock()
            # Waiters wake in the order they slept, so the earliest takes the slot: FIFO without a queue.
            await self._sleep(max(self._task_logs[0] + self.period - self._clock(), 0.0))
        now = self._clock()
        self._task_logs.append(now)
        return now


@dataclass(frozen=True, slots=True)
class Permit:
    """One admitted call: when it left, and (fleet mode) the shared bucket's slot in server time."""

    sent_s: float
    fleet_slot: object | None = None


class Limiter(Protocol):
    """What the Fetcher needs from a limiter: ``async with limiter as permit``, then report the outcome."""

    @property
    def rate_per_s(self) -> float: ...

    async def __aenter__(self) -> Permit: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def record_throttle(self, permit: Permit | None = None) -> None: ...

    def record_success(self, permit: Permit | None = None) -> None: ...


class RateLimiter:
    """The process-wide limiter: ``async with limiter as permit:`` before each call, then report the outcome."""

    def __init__(self, ceiling_per_s: float, *, params: AimdParams | None = None, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep, on_change: OnRateChange | None = None) -> None:
        self.controller = AimdController(ceiling_per_s=ceiling_per_s, params=params or AimdParams())
        self._clock = clock
        self._throttler = PacedThrottler(ceiling_per_s, clock=clock, sleep=sleep)
        self._on_change = on_change

    @property
    def rate_per_s(self) -> float:
        return self.controller.rate_per_s

    async def __aenter__(self) -> Permit:
        sent_s = await self._throttler.acquire()
        self.controller.on_wait(self._throttler.last_wait_s)
        return Permit(sent_s=sent_s)

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def record_throttle(self, permit: Permit | None = None) -> None:
        sent_s = permit.sent_s if permit is not None else None
        if self.controller.on_throttle(self._clock(), sent_s):
            self._changed("throttled")

    def record_success(self, permit: Permit | None = None) -> None:
        if self.controller.on_success(self._clock()):
            self._changed("recovering")

    def _changed(self, why: str) -> None:
        self._throttler.set_rate(self.controller.rate_per_s)
        if self._on_change is not None:
            self._on_change(self.controller.rate_per_s, why)
