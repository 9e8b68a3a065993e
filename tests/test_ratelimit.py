"""The limiter's logic on injected clocks: AIMD, backoff, pacing, and whole runs in virtual time.

Nothing here sleeps. The last group runs the real Fetcher and RateLimiter against a fake Rekognition
(token-bucket quota, latency, faults) on an event loop whose clock jumps to the next timer, so a
30-second run takes milliseconds and repeats exactly for a given seed.
"""

from __future__ import annotations

import asyncio
import random
import selectors
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from botocore.exceptions import ClientError

from worker.errors import CredentialsError, PermanentJobError, RestartJob, TransientError
from worker.messages import Api
from worker.ratelimit import (
    AimdController,
    AimdParams,
    PacedThrottler,
    Permit,
    RateLimiter,
    full_jitter_backoff_s,
    increased_rate,
)
from worker.rekognition import Fetcher

T = TypeVar("T")

# --- virtual time ------------------------------------------------------------------------------------


class _SkippingSelector:
    """Wraps the loop's selector: when nothing is ready, advance virtual time instead of blocking."""

    def __init__(self, loop: VirtualTimeLoop, inner: selectors.BaseSelector) -> None:
        self._loop = loop
        self._inner = inner

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._inner.select(0)
        if not events and timeout is not None and timeout > 0:
            self._loop.now_s += timeout
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` only moves when every task waits for a timer."""

    def __init__(self) -> None:
        super().__init__()
        self.now_s = 0.0
        inner: selectors.BaseSelector = self._selector  # type: ignore[has-type]
        self._selector = _SkippingSelector(self, inner)

    def time(self) -> float:
        return self.now_s


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


# --- pure pieces ---------------------------------------------------------------------------------


def test_full_jitter_backoff_is_uniform_below_a_capped_exponential() -> None:
    rng = random.Random(1)
    for attempt, ceiling in ((0, 0.25), (1, 0.5), (3, 2.0), (10, 20.0), (500, 20.0)):
        draws = [full_jitter_backoff_s(attempt, base_s=0.25, cap_s=20.0, rng=rng) for _ in range(2000)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > 0.9 * ceiling and min(draws) < 0.1 * ceiling  # spread over the whole range
        assert abs(sum(draws) / len(draws) - ceiling / 2) < 0.05 * ceiling


def test_aimd_cuts_once_per_round_of_calls() -> None:
    c = AimdController(ceiling_per_s=20.0)
    assert (c.rate_per_s, c.cut_rate_per_s) == (20.0, None)
    assert c.on_throttle(now_s=10.0, sent_s=9.6)
    assert c.rate_per_s == 10.0 and c.cut_rate_per_s == 20.0
    # Calls sent before the cut were paced at the old rate: their throttles are the same event.
    assert not c.on_throttle(now_s=10.1, sent_s=9.9)
    assert not c.on_throttle(now_s=10.3, sent_s=9.99)
    assert c.rate_per_s == 10.0
    # A call sent after the cut and still throttled: the new rate is too high as well.
    assert c.on_throttle(now_s=10.5, sent_s=10.05)
    assert c.rate_per_s == 5.0 and c.cut_rate_per_s == 10.0


def test_aimd_treats_a_lone_throttle_as_a_blip_when_asked_to() -> None:
    p = AimdParams(isolated_decrease_factor=0.8, forget_after_s=60.0)
    c = AimdController(ceiling_per_s=5.0, params=p)
    assert c.on_throttle(now_s=100.0, sent_s=99.9)
    assert c.rate_per_s == 4.0 and c.cut_rate_per_s is None  # -20 %, and no knee to stop the climb at
    for t in (101.5, 102.5, 103.5):
        c.on_wait(t - 0.2)
        c.on_success(t)
    assert c.rate_per_s == 5.0  # back at the ceiling 2.5 s after the blip (halved, it would take 14 s)
    assert c.on_throttle(now_s=110.0, sent_s=109.9)  # within the minute: a real cut
    assert c.rate_per_s == 2.5 and c.cut_rate_per_s == 5.0
    assert c.on_throttle(now_s=180.0, sent_s=179.9)  # a minute later, a blip again
    assert c.rate_per_s == 2.0 and c.cut_rate_per_s is None
    # Without the setting (process mode's default) every throttle halves and remembers the knee.
    d = AimdController(ceiling_per_s=5.0)
    assert d.on_throttle(now_s=100.0, sent_s=99.9) and (d.rate_per_s, d.cut_rate_per_s) == (2.5, 5.0)
    with pytest.raises(ValueError, match="isolated_decrease_factor"):
        AimdParams(isolated_decrease_factor=1.0)


def test_aimd_without_send_times_uses_a_holdoff() -> None:
    c = AimdController(ceiling_per_s=8.0, params=AimdParams(holdoff_s=1.0))
    assert c.on_throttle(now_s=1.0)
    assert not c.on_throttle(now_s=1.5)
    assert c.on_throttle(now_s=2.0)
    assert c.rate_per_s == 2.0


def test_aimd_never_goes_below_the_floor() -> None:
    c = AimdController(ceiling_per_s=1.0, params=AimdParams(floor_per_s=0.2))
    for i in range(20):
        c.on_throttle(now_s=float(i), sent_s=float(i))
    assert c.rate_per_s == 0.2


def test_aimd_recovers_fast_to_below_the_cut_rate_then_probes_slowly() -> None:
    params = AimdParams(quiet_s=1.0, step_interval_s=1.0, increase_fraction_per_s=0.1, probe_fraction_per_s=0.02,
                        probe_band=0.1, forget_after_s=60.0)
    c = AimdController(ceiling_per_s=20.0, params=params, rate_per_s=6.0)
    assert c.on_throttle(now_s=0.0, sent_s=0.0)
    assert c.rate_per_s == 3.0 and c.cut_rate_per_s == 6.0
    c.on_wait(0.5)
    assert not c.on_success(0.9)  # quiet period
    c.on_wait(1.5)
    assert not c.on_success(1.5)  # less than one step since the quiet period ended
    assert c.on_success(2.0)  # one second past the quiet period: +2/s (10% of the ceiling)
    assert c.rate_per_s == pytest.approx(5.0)
    c.on_wait(2.5)
    assert c.on_success(3.0)
    assert c.rate_per_s == pytest.approx(5.4)  # stops at 90% of the rate that was throttled
    c.on_wait(3.5)
    assert c.on_success(4.0)
    assert c.rate_per_s == pytest.approx(5.8)  # then +2% of the ceiling per second
    assert not c.on_success(4.5)
    for t in range(5, 31):
        c.on_wait(t - 0.5)
        c.on_success(float(t))
    assert c.rate_per_s == pytest.approx(min(20.0, 5.4 + 0.4 * 27))


def test_aimd_forgets_an_old_cut_and_reaches_the_ceiling() -> None:
    c = AimdController(ceiling_per_s=100.0, params=AimdParams(forget_after_s=30.0, probe_fraction_per_s=0.001),
                       rate_per_s=10.0)
    c.on_throttle(now_s=0.0, sent_s=0.0)
    for t in range(1, 30):
        c.on_wait(t - 0.5)
        c.on_success(float(t))
    slow = c.rate_per_s
    assert 8.0 < slow < 12.0  # probing near the 10/s that was throttled
    for t in range(30, 45):
        c.on_wait(t - 0.5)
        c.on_success(float(t))
    assert c.rate_per_s == 100.0


def test_aimd_a_new_throttle_restarts_the_quiet_period() -> None:
    c = AimdController(ceiling_per_s=10.0)
    c.on_throttle(now_s=0.0, sent_s=0.0)
    c.on_wait(2.9)
    c.on_success(3.0)
    raised = c.rate_per_s
    assert raised > 5.0
    assert c.on_throttle(now_s=3.5, sent_s=3.2)
    assert c.rate_per_s == raised / 2 and c.cut_rate_per_s == raised
    assert not c.on_success(4.0)


def test_aimd_does_not_climb_while_no_call_waits_for_a_slot() -> None:
    c = AimdController(ceiling_per_s=20.0, rate_per_s=10.0)
    c.on_throttle(now_s=0.0, sent_s=0.0)
    for t in range(2, 61):  # the callers, not the rate, limit calls: no evidence the quota allows more
        assert not c.on_success(float(t))
    assert c.rate_per_s == 5.0
    c.on_wait(60.5)
    assert c.on_success(61.0)
    assert c.rate_per_s == pytest.approx(7.0)  # one step's worth, not the idle minute's


def test_increased_rate_never_passes_the_ceiling() -> None:
    p = AimdParams()
    assert increased_rate(9.9, ceiling_per_s=10.0, cut_rate_per_s=None, since_s=100.0, quiet_for_s=1.0,
                          params=p) == 10.0
    assert increased_rate(9.9, ceiling_per_s=10.0, cut_rate_per_s=50.0, since_s=100.0, quiet_for_s=1.0,
                          params=p) == 10.0
    assert increased_rate(9.9, ceiling_per_s=10.0, cut_rate_per_s=10.0, since_s=100.0, quiet_for_s=1.0,
                          params=p) == 10.0


def test_aimd_params_are_validated() -> None:
    with pytest.raises(ValueError, match="decrease_factor"):
        AimdParams(decrease_factor=1.0)
    with pytest.raises(ValueError, match="quiet_s"):
        AimdParams(quiet_s=-1.0)
    with pytest.raises(ValueError, match="ceiling"):
        AimdController(ceiling_per_s=0.0)


@dataclass
class FakeClock:
    now_s: float = 0.0
    sleeps: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now_s

    async def sleep(self, delay_s: float) -> None:
        self.sleeps.append(delay_s)
        self.now_s += delay_s


async def test_paced_throttler_spaces_calls_exactly_one_period_apart() -> None:
    clock = FakeClock(now_s=100.0)
    throttler = PacedThrottler(4.0, clock=clock, sleep=clock.sleep)
    sent = [await throttler.acquire() for _ in range(5)]
    assert sent == pytest.approx([100.0, 100.25, 100.5, 100.75, 101.0])
    assert clock.sleeps == pytest.approx([0.25] * 4)  # one exact sleep per slot, no polling
    clock.now_s += 10.0  # idle: no burst credit builds up
    assert await throttler.acquire() == 111.0
    assert await throttler.acquire() == 111.25


async def test_paced_throttler_follows_a_rate_change_at_the_next_slot() -> None:
    clock = FakeClock()
    throttler = PacedThrottler(10.0, clock=clock, sleep=clock.sleep)
    await throttler.acquire()
    throttler.set_rate(2.0)
    assert await throttler.acquire() == pytest.approx(0.5)
    throttler.set_rate(20.0)
    assert await throttler.acquire() == pytest.approx(0.55)


async def test_rate_limiter_reports_changes_and_paces_at_the_new_rate() -> None:
    clock = FakeClock()
    changes: list[tuple[float, str]] = []
    limiter = RateLimiter(8.0, clock=clock, sleep=clock.sleep, on_change=lambda r, why: changes.append((r, why)))
    first = await limiter.__aenter__()
    assert first == Permit(sent_s=0.0)
    clock.now_s = 0.4
    await limiter.record_throttle(first)
    await limiter.record_throttle(first)  # the same round: one cut
    assert changes == [(4.0, "throttled")] and limiter.rate_per_s == 4.0
    second = await limiter.__aenter__()
    third = await limiter.__aenter__()
    assert third.sent_s - second.sent_s == pytest.approx(0.25)
    clock.now_s = 3.0
    limiter.record_success(third)
    assert changes[-1][1] == "throttled"  # nobody waited for a slot since the cut: no evidence for more
    await limiter.__aenter__()
    await limiter.__aenter__()  # waits for its slot
    clock.now_s = 4.5
    limiter.record_success(third)
    assert changes[-1][1] == "recovering" and limiter.rate_per_s > 4.0


# --- whole runs in virtual time -------------------------------------------------------------------


class FakeRekognition:
    """GetFaceDetection with a token-bucket quota (capacity max(1, quota)), latency and faults."""

    def __init__(self, *, quota_tps: float, latency_s: float, fault_rate: float = 0.0, pages: int = 10,
                 throttle_code: str = "ProvisionedThroughputExceededException", seed: int = 0) -> None:
        self.quota_tps = quota_tps
        self.capacity = max(1.0, quota_tps)
        self.tokens = self.capacity
        self.updated_s = 0.0
        self.latency_s = latency_s
        self.fault_rate = fault_rate
        self.pages = pages
        self.throttle_code = throttle_code
        self.rng = random.Random(seed)
        self.calls: list[tuple[float, str]] = []

    def _admit(self, now_s: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now_s - self.updated_s) * self.quota_tps)
        self.updated_s = now_s
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    async def get_face_detection(self, *, JobId: str, MaxResults: int, NextToken: str | None = None) -> dict[str, Any]:
        now_s = asyncio.get_running_loop().time()
        admitted = self._admit(now_s)
        faulted = admitted and self.rng.random() < self.fault_rate
        outcome = "throttled" if not admitted else "fault" if faulted else "ok"
        self.calls.append((now_s, outcome))
        await asyncio.sleep(self.latency_s)
        if outcome != "ok":
            code = self.throttle_code if outcome == "throttled" else "InternalServerError"
            status = 500 if outcome == "fault" else 400
            raise ClientError({"Error": {"Code": code, "Message": code},
                               "ResponseMetadata": {"HTTPStatusCode": status}}, "GetFaceDetection")
        page = int(NextToken or 0)
        body: dict[str, Any] = {"JobStatus": "SUCCEEDED", "Faces": []}
        if page + 1 < self.pages:
            body["NextToken"] = str(page + 1)
        return body


@dataclass
class RunStats:
    calls: list[tuple[float, str]]
    pages_per_job: list[int]
    rates: list[tuple[float, float]]

    @property
    def span_s(self) -> float:
        return self.calls[-1][0] - self.calls[0][0]

    def share(self, outcome: str) -> float:
        return sum(1 for _, o in self.calls if o == outcome) / len(self.calls)

    @property
    def admitted_per_s(self) -> float:
        return sum(1 for _, o in self.calls if o != "throttled") / self.span_s


def simulate(*, ceiling_per_s: float, quota_tps: float, jobs: int = 8, pages: int = 12, latency_s: float = 0.4,
             fault_rate: float = 0.0, seed: int = 0, params: AimdParams | None = None,
             throttle_code: str = "ProvisionedThroughputExceededException", write_s: float = 0.01) -> RunStats:
    """``jobs`` concurrent jobs of ``pages`` pages through one Fetcher and limiter, in virtual time."""

    async def run() -> RunStats:
        loop = asyncio.get_running_loop()
        service = FakeRekognition(quota_tps=quota_tps, latency_s=latency_s, fault_rate=fault_rate, pages=pages,
                                  throttle_code=throttle_code, seed=seed)
        rates: list[tuple[float, float]] = [(0.0, ceiling_per_s)]
        limiter = RateLimiter(ceiling_per_s, params=params, clock=loop.time,
                              on_change=lambda r, _: rates.append((loop.time(), r)))
        fetcher = Fetcher(service, limiter, page_size=50, max_attempts=8, rng=random.Random(seed))

        async def job(n: int) -> int:
            got = 0
            async for _ in fetcher.pages(Api.FACE_DETECTION, f"job-{n}"):
                got += 1
                await asyncio.sleep(write_s)
            return got

        counts = await asyncio.gather(*(job(n) for n in range(jobs)))
        return RunStats(service.calls, list(counts), rates)

    return run_virtual(run())


@pytest.mark.parametrize("seed", range(5))
def test_simulated_ceiling_below_the_quota_is_never_throttled(seed: int) -> None:
    stats = simulate(ceiling_per_s=4.0, quota_tps=5.0, seed=seed)
    assert stats.pages_per_job == [12] * 8
    assert stats.share("throttled") == 0.0
    assert stats.admitted_per_s >= 0.95 * 4.0


@pytest.mark.parametrize("throttle_code", ["ProvisionedThroughputExceededException", "ThrottlingException"])
@pytest.mark.parametrize("seed", range(5))
def test_simulated_ceiling_far_above_the_quota_converges(seed: int, throttle_code: str) -> None:
    stats = simulate(ceiling_per_s=20.0, quota_tps=5.0, fault_rate=0.05, seed=seed, pages=15,
                     throttle_code=throttle_code)
    assert stats.pages_per_job == [15] * 8
    assert stats.share("throttled") <= 0.15
    assert stats.admitted_per_s >= 0.85 * 5.0


def test_simulated_long_run_settles_near_the_quota() -> None:
    stats = simulate(ceiling_per_s=20.0, quota_tps=5.0, jobs=8, pages=100, seed=3)
    late = [r for t, r in stats.rates if t > 30.0]
    assert late and all(2.0 <= r <= 8.0 for r in late)
    assert stats.share("throttled") <= 0.08
    assert stats.admitted_per_s >= 0.9 * 5.0


# --- the Fetcher's error classes, in virtual time ----------------------------------------------------


class ScriptedClient:
    """Answers each call with the next scripted error code, then pages."""

    def __init__(self, codes: list[str], status: int = 400) -> None:
        self.codes = list(codes)
        self.status = status
        self.calls = 0

    async def get_face_detection(self, **_: Any) -> dict[str, Any]:
        self.calls += 1
        if self.codes:
            code = self.codes.pop(0)
            raise ClientError({"Error": {"Code": code, "Message": f"scripted {code}"},
                               "ResponseMetadata": {"HTTPStatusCode": self.status}}, "GetFaceDetection")
        return {"JobStatus": "SUCCEEDED", "Faces": []}


def _fetch(client: ScriptedClient, limiter: RateLimiter | None = None, max_attempts: int = 4) -> Any:
    async def run() -> Any:
        lim = limiter or RateLimiter(10.0, clock=asyncio.get_running_loop().time)
        return await Fetcher(client, lim, max_attempts=max_attempts, rng=random.Random(0)).fetch(
            Api.FACE_DETECTION, "job", None)

    return run_virtual(run())


@pytest.mark.parametrize("code", ["ThrottlingException", "ProvisionedThroughputExceededException"])
def test_throttling_is_retried_and_cuts_the_rate(code: str) -> None:
    client = ScriptedClient([code] * 6)
    changes: list[tuple[float, str]] = []

    async def run() -> tuple[dict[str, Any], float]:
        limiter = RateLimiter(10.0, clock=asyncio.get_running_loop().time,
                              on_change=lambda r, why: changes.append((r, why)))
        page = await Fetcher(client, limiter, max_attempts=4, rng=random.Random(0)).fetch(
            Api.FACE_DETECTION, "job", None)
        return page, limiter.rate_per_s

    page, rate = run_virtual(run())
    assert page["JobStatus"] == "SUCCEEDED" and client.calls == 7  # throttles outlast max_attempts faults
    assert rate < 10.0 and changes[0] == (5.0, "throttled")


def test_throttling_without_end_becomes_transient() -> None:
    client = ScriptedClient(["ThrottlingException"] * 1000)
    with pytest.raises(TransientError, match="still throttled after 16 tries"):
        _fetch(client, max_attempts=4)


def test_server_faults_get_bounded_retries() -> None:
    assert _fetch(ScriptedClient(["InternalServerError"] * 3, status=500))["JobStatus"] == "SUCCEEDED"
    client = ScriptedClient(["InternalServerError"] * 10, status=500)
    with pytest.raises(TransientError, match="failed 4 times, last InternalServerError"):
        _fetch(client, max_attempts=4)
    assert client.calls == 4


def test_faults_do_not_cut_the_rate() -> None:
    async def run() -> float:
        limiter = RateLimiter(10.0, clock=asyncio.get_running_loop().time)
        await Fetcher(ScriptedClient(["InternalServerError"] * 3, status=500), limiter,
                      rng=random.Random(0)).fetch(Api.FACE_DETECTION, "job", None)
        return limiter.rate_per_s

    assert run_virtual(run()) == 10.0


def test_invalid_pagination_token_asks_for_a_restart() -> None:
    client = ScriptedClient(["InvalidPaginationTokenException"])
    with pytest.raises(RestartJob, match="InvalidPaginationTokenException"):
        _fetch(client)
    assert client.calls == 1


@pytest.mark.parametrize("code", ["ResourceNotFoundException", "InvalidParameterException"])
def test_permanent_errors_are_not_retried(code: str) -> None:
    client = ScriptedClient([code])
    with pytest.raises(PermanentJobError) as info:
        _fetch(client)
    assert info.value.code == code and client.calls == 1


@pytest.mark.parametrize("code", ["AccessDeniedException", "ExpiredTokenException", "UnrecognizedClientException",
                                  "InvalidSignatureException"])
def test_credential_and_iam_errors_are_the_deployments_not_the_jobs(code: str) -> None:
    client = ScriptedClient([code])
    with pytest.raises(CredentialsError, match=code) as info:
        _fetch(client)
    assert not isinstance(info.value, PermanentJobError) and client.calls == 1
