"""One limiter per process for every Rekognition Get* call, adapting to throttling.

Pacing is asyncio-throttle's Throttler with one call per period (even spacing, no bursts). Two
things are changed in a subclass: it sleeps exactly until the next slot instead of polling every
10 ms (many waiting jobs would otherwise wake thousands of times a second), and it takes an
injected clock so the logic is testable without sleeping. The rate itself is steered by an AIMD
controller: cut multiplicatively on a throttling answer, recover additively after a quiet period.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from asyncio_throttle.throttler import Throttler

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def full_jitter_backoff_s(attempt: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """AWS "full jitter": uniform in [0, min(cap, base * 2**attempt)]. ``attempt`` counts from 0."""
    ceiling = min(cap_s, base_s * (2 ** min(attempt, 30)))
    return rng.uniform(0.0, ceiling)


@dataclass(slots=True)
class AimdController:
    """Additive-increase, multiplicative-decrease of a call rate. Pure: the caller passes ``now``.

    Throttles that arrive within ``decrease_holdoff_s`` of a cut count as one congestion event
    (the calls already in flight were sent at the old rate). After ``quiet_s`` without a throttle
    the rate climbs by ``increase_per_s`` for each second that stays quiet, up to the ceiling.
    """

    ceiling_per_s: float
    rate_per_s: float = 0.0
    floor_per_s: float = 0.05
    decrease_factor: float = 0.7
    decrease_holdoff_s: float = 1.0
    quiet_s: float = 2.0
    increase_per_s: float = 0.0
    _last_cut_s: float = float("-inf")
    _last_increase_s: float = float("-inf")

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0:
            self.rate_per_s = self.ceiling_per_s
        if self.increase_per_s <= 0:
            # Climb back from a cut to the ceiling in roughly 20 quiet seconds.
            self.increase_per_s = max(self.ceiling_per_s / 20.0, 0.05)

    def on_throttle(self, now_s: float) -> bool:
        """Returns True when the rate was cut."""
        if now_s - self._last_cut_s < self.decrease_holdoff_s:
            return False
        self.rate_per_s = max(self.floor_per_s, self.rate_per_s * self.decrease_factor)
        self._last_cut_s = now_s
        self._last_increase_s = now_s
        return True

    def on_success(self, now_s: float) -> bool:
        """Returns True when the rate was raised."""
        if self.rate_per_s >= self.ceiling_per_s or now_s - self._last_cut_s < self.quiet_s:
            return False
        since = now_s - max(self._last_increase_s, self._last_cut_s + self.quiet_s)
        if since < 1.0:
            return False
        self.rate_per_s = min(self.ceiling_per_s, self.rate_per_s + self.increase_per_s * since)
        self._last_increase_s = now_s
        return True


class PacedThrottler(Throttler):
    """asyncio-throttle's Throttler that waits for the exact slot and takes an injected clock."""

    def __init__(self, rate_per_s: float, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        super().__init__(rate_limit=1, period=1.0 / rate_per_s)
        self._clock = clock
        self._sleep = sleep

    def set_rate(self, rate_per_s: float) -> None:
        self.period = 1.0 / rate_per_s

    def flush(self) -> None:
        now = self._clock()
        while self._task_logs and now - self._task_logs[0] >= self.period:
            self._task_logs.popleft()

    async def acquire(self) -> None:
        while True:
            self.flush()
            if len(self._task_logs) < self.rate_limit:
                break
            await self._sleep(max(self._task_logs[0] + self.period - self._clock(), 0.0))
        self._task_logs.append(self._clock())


class RateLimiter:
    """The process-wide limiter: ``async with limiter:`` before each call, then report the outcome."""

    def __init__(self, ceiling_per_s: float, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep,
                 on_change: Callable[[float, str], None] | None = None) -> None:
        self.controller = AimdController(ceiling_per_s=ceiling_per_s)
        self._clock = clock
        self._throttler = PacedThrottler(ceiling_per_s, clock=clock, sleep=sleep)
        self._on_change = on_change

    @property
    def rate_per_s(self) -> float:
        return self.controller.rate_per_s

    async def __aenter__(self) -> None:
        await self._throttler.acquire()

    async def __aexit__(self, *exc: object) -> None:
        return None

    def record_throttle(self) -> None:
        if self.controller.on_throttle(self._clock()):
            self._changed("throttled")

    def record_success(self) -> None:
        if self.controller.on_success(self._clock()):
            self._changed("recovering")

    def _changed(self, why: str) -> None:
        self._throttler.set_rate(self.controller.rate_per_s)
        if self._on_change is not None:
            self._on_change(self.controller.rate_per_s, why)
