"""A local Amazon Rekognition Video endpoint: GetFaceDetection and GetFaceSearch, and the Start* calls behind them.

It speaks the AWS JSON 1.1 wire protocol (``POST /`` with ``X-Amz-Target: RekognitionService.<Op>``), so an
unmodified botocore/aiobotocore ``rekognition`` client works against it through ``endpoint_url`` or
``AWS_ENDPOINT_URL_REKOGNITION``. Errors are the seven modeled ones, as ``{"__type", "Message"}`` bodies.

On top of the API it offers what tests and benchmarks need: an account quota (token bucket on an injected
clock), injected faults and latency, job state changes (IN_PROGRESS -> SUCCEEDED, expiring or rejected tokens, tokens
that loop, IN_PROGRESS on a later page), and
counters with a per-call record.

StartFaceDetection and StartFaceSearch (see :mod:`worker.local.starts`) create jobs that answer IN_PROGRESS for
``job_duration_s`` and then SUCCEEDED with results synthesized from the JobId. They honour the account's
concurrent-job limit (``max_concurrent_jobs``, with room taken by :meth:`RekognitionEmulator.occupy`),
ClientRequestToken idempotency and a start quota of their own (``start_quota_tps``); a job started with a
NotificationChannel sends Rekognition's completion notification, SNS-enveloped, to the SQS queue
``notification_queue_url`` from a background task, unless told to lose it (``drop_notifications``,
``drop_notifications_for``). The Get* quota, counters and call records are untouched by starts; start counters
and per-job records are their own ``stats()`` keys.

Three ways to run it: :class:`RekognitionEmulator` in your event loop, :class:`EmulatorThread` for synchronous
code, or ``python -m worker.local.emulator`` as a process.

All state sits behind one lock and is changed only in synchronous sections, so the loop's handlers and
other threads (through :class:`EmulatorThread`) see consistent counters under concurrent calls.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import math
import random
import secrets
import signal
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

import orjson
from aiohttp import web

from worker.local.starts import (
    START_OPERATIONS,
    Outgoing,
    StartBook,
    StartRejected,
    StartRequest,
    deliver_notifications,
)
from worker.local.synth import (
    API_NAMES,
    JOB_ID_RE,
    JOB_STATUSES,
    JobFixture,
    JobStatus,
    Json,
    demo_jobs,
    page_body,
    with_future_values,
)

Clock = Callable[[], float]
ThrottleError = Literal["ThrottlingException", "ProvisionedThroughputExceededException"]
Outcome = Literal["succeeded", "throttled", "fault", "error"]

TARGET_PREFIX = "RekognitionService."
CONTENT_TYPE = "application/x-amz-json-1.1"
MAX_RESULTS_CAP = 1000
SORT_BYS = ("TIMESTAMP", "INDEX")
TOKEN_MAX_CHARS = 255
CALL_RECORDS_MAX = 100_000
THROTTLE_ERRORS: tuple[str, ...] = get_args(ThrottleError)

# HTTP status of each modeled error when a fixture asks for it; anything else answers 400.
_ERROR_STATUS: dict[str, int] = {"InternalServerError": 500}
_ERROR_MESSAGES: dict[str, str] = {
    "AccessDeniedException": "User is not authorized to access the results of this job",
    "InternalServerError": "Internal server error",
    "ResourceNotFoundException": "Requested resource not found",
    "ProvisionedThroughputExceededException": "Provisioned rate exceeded",
    "ThrottlingException": "Rate exceeded",
}


class ServiceError(Exception):
    """A modeled AWS error: answered with ``status`` and a ``{"__type", "Message"}`` body."""

    def __init__(self, code: str, message: str | None = None, status: int | None = None) -> None:
        super().__init__(message or _ERROR_MESSAGES.get(code, code))
        self.code = code
        self.message = message or _ERROR_MESSAGES.get(code, code)
        self.status = status if status is not None else _ERROR_STATUS.get(code, 400)


def _outcome_of(code: str) -> Outcome:
    if code in THROTTLE_ERRORS:
        return "throttled"
    if code == "InternalServerError":
        return "fault"
    return "error"


@dataclass(frozen=True)
class EmulatorConfig:
    """Behaviour knobs; replace at runtime with :meth:`RekognitionEmulator.configure`.

    ``quota_tps`` is the account quota shared by both operations (None: unlimited): a token bucket holding
    ``max(1, quota_tps)`` tokens, refilled continuously. ``throttle_http_status`` applies to whichever
    ``throttle_error`` is chosen (ThrottlingException may arrive as 5xx in the wild). ``fault_rate`` is the
    probability of an InternalServerError per admitted call, drawn from a Random seeded with ``seed``.
    """

    quota_tps: float | None = None
    throttle_error: ThrottleError = "ProvisionedThroughputExceededException"
    throttle_http_status: int = 400
    fault_rate: float = 0.0
    latency_s: float = 0.0
    seed: int = 0
    require_auth: bool = True
    # Every call answers AccessDeniedException, as when the deployment's role lost its permission.
    access_denied: bool = False
    # --- Start* (worker.local.starts) ---
    # Jobs running at once in the account (started here or occupied); one more start is LimitExceededException.
    max_concurrent_jobs: int = 20
    # How long a started job stays IN_PROGRESS.
    job_duration_s: float = 1.0
    # The Start* quota, a token bucket apart from ``quota_tps`` (None: unlimited); over it: ThrottlingException.
    start_quota_tps: float | None = None
    # Results per started job: Faces (detection) or Persons (search) elements.
    started_job_faces: int = 40
    # Where completion notifications go (None: nowhere; they count as failed), and SQS's endpoint
    # (None: botocore resolves it, AWS_ENDPOINT_URL_SQS included).
    notification_queue_url: str | None = None
    sqs_endpoint_url: str | None = None
    # Lose the next N completion notifications (counts down as they are lost) ...
    drop_notifications: int = 0
    # ... and every notification of these S3 object names.
    drop_notifications_for: tuple[str, ...] = ()
    # Starts naming these S3 object names answer InvalidS3ObjectException.
    invalid_videos: tuple[str, ...] = ()
    # A Start* that created its job answers only this much later: a caller killed meanwhile has started a
    # job whose JobId it never learned (the crash between Start and recording it).
    start_answer_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.quota_tps is not None and not self.quota_tps > 0:
            raise ValueError(f"quota_tps must be > 0 or None (got {self.quota_tps!r})")
        if self.throttle_error not in THROTTLE_ERRORS:
            raise ValueError(f"throttle_error must be one of {THROTTLE_ERRORS} (got {self.throttle_error!r})")
        if not 400 <= self.throttle_http_status <= 599:
            raise ValueError(f"throttle_http_status must be 400..599 (got {self.throttle_http_status!r})")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within 0..1 (got {self.fault_rate!r})")
        if not self.latency_s >= 0.0:
            raise ValueError(f"latency_s must be >= 0 (got {self.latency_s!r})")
        if not self.start_answer_delay_s >= 0.0:
            raise ValueError(f"start_answer_delay_s must be >= 0 (got {self.start_answer_delay_s!r})")
        self._check_start_fields()

    def _check_start_fields(self) -> None:
        for name in ("max_concurrent_jobs", "started_job_faces", "drop_notifications"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (got {value!r})")
        if not (isinstance(self.job_duration_s, int | float) and 0.0 <= self.job_duration_s < math.inf):
            raise ValueError(f"job_duration_s must be a finite number >= 0 (got {self.job_duration_s!r})")
        if self.start_quota_tps is not None and not self.start_quota_tps > 0:
            raise ValueError(f"start_quota_tps must be > 0 or None (got {self.start_quota_tps!r})")
        for name in ("notification_queue_url", "sqs_endpoint_url"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.startswith(("http://", "https://"))):
                raise ValueError(f"{name} must be an http(s) URL or None (got {value!r})")
        for name in ("drop_notifications_for", "invalid_videos"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a collection of S3 object names (got {value!r})")
            # Frozen: normalize lists (from JSON) and sets to a tuple, which asdict and orjson both take.
            object.__setattr__(self, name, tuple(value))


class _TokenBucket:
    def __init__(self, rate_per_s: float, now_s: float) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = max(1.0, rate_per_s)
        self.tokens = self.capacity
        self.updated_s = now_s

    def try_take(self, now_s: float) -> bool:
        # A clock that steps backwards (or calls recorded out of order) must not mint tokens.
        if now_s > self.updated_s:
            self.tokens = min(self.capacity, self.tokens + (now_s - self.updated_s) * self.rate_per_s)
            self.updated_s = now_s
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class _Job:
    fixture: JobFixture
    epoch: int
    in_progress_calls_left: int = 0
    # Calls presenting a NextToken still to answer InvalidPaginationTokenException (-1: every one).
    reject_tokens_left: int = 0
    # Calls presenting a NextToken still to answer IN_PROGRESS (a job that regressed mid-read).
    later_in_progress_left: int = 0
    # The last page's NextToken leads back to this page instead of ending the job (a token loop).
    loop_to_page: int | None = None
    by_index: list[Json] | None = None
    # Rendered pages keyed by (max_results, sort_by, offset); the job id is the outer key.
    pages: dict[tuple[int, str, int], bytes] = field(default_factory=dict)

    def ordered(self, sort_by: str) -> Sequence[Json]:
        if sort_by != "INDEX":
            return self.fixture.results
        if self.by_index is None:
            # Stable: equal (Index, Timestamp) keep their time order, like the service's INDEX grouping.
            self.by_index = sorted(
                self.fixture.results,
                key=lambda p: (p.get("Person", {}).get("Index", -1), p.get("Timestamp", 0)),
            )
        return self.by_index

    def reset_views(self) -> None:
        self.by_index = None
        self.pages.clear()


_COUNTER_NAMES = ("requests", "succeeded", "throttled", "faults", "errors", "in_progress")
_OUTCOME_COUNTER: dict[Outcome, str] = {
    "succeeded": "succeeded",
    "throttled": "throttled",
    "fault": "faults",
    "error": "errors",
}


class RekognitionEmulator:
    """The emulator inside the caller's event loop: ``url = await emu.start(); ...; await emu.stop()``."""

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        jobs: Iterable[JobFixture] = (),
        clock: Clock = time.monotonic,
    ) -> None:
        self._lock = threading.RLock()
        self._clock = clock
        self._config = config or EmulatorConfig()
        self._fault_rng = random.Random(self._config.seed)
        self._bucket: _TokenBucket | None = None
        self._jobs: dict[str, _Job] = {}
        self._epochs = 0
        # Tokens carry an HMAC with this per-instance secret: a token from another emulator, a tampered
        # one or one from a removed-and-re-added job is rejected, as the service rejects foreign tokens.
        self._token_key = secrets.token_bytes(16)
        self._counters: Counter[str] = Counter()
        self._by_operation: dict[str, Counter[str]] = {}
        self._by_error: Counter[str] = Counter()
        self._calls: deque[tuple[float, Outcome]] = deque(maxlen=CALL_RECORDS_MAX)
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._starts = StartBook(clock)
        # The epoch of each started job's entry in _jobs: completion leaves a job replaced by add_job alone.
        self._started_epochs: dict[str, int] = {}
        self._start_bucket: _TokenBucket | None = None
        # The notification task, in the loop that serves the app; started and stopped with it.
        self._notifier: asyncio.Task[None] | None = None
        self._notifier_loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._reset_bucket()
        self._reset_start_bucket()
        self.add_jobs(jobs)

    # --- lifecycle -------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://host:port`` once started; pass it as ``endpoint_url``."""
        if self._url is None:
            raise RuntimeError("emulator is not started")
        return self._url

    def make_app(self) -> web.Application:
        """The aiohttp application (for embedding in another server or aiohttp's test utilities)."""
        # Job uploads carry whole fixtures: a 2500-face ALL job is ~9 MB of JSON.
        app = web.Application(client_max_size=1024**3)
        app.router.add_post("/", self._handle_api)
        app.router.add_get("/_emulator/stats", self._handle_stats)
        app.router.add_post("/_emulator/stats/reset", self._handle_reset_stats)
        app.router.add_get("/_emulator/config", self._handle_get_config)
        app.router.add_post("/_emulator/config", self._handle_config)
        app.router.add_post("/_emulator/jobs", self._handle_add_jobs)
        app.router.add_delete("/_emulator/jobs/{job_id}", self._handle_remove_job)
        app.router.add_post("/_emulator/occupy", self._handle_occupy)
        app.on_startup.append(self._start_notifier)
        app.on_cleanup.append(self._stop_notifier)
        return app

    async def _start_notifier(self, app: web.Application) -> None:
        if self._notifier is not None:
            return
        self._wake = asyncio.Event()
        self._notifier_loop = asyncio.get_running_loop()
        self._notifier = asyncio.create_task(deliver_notifications(
            settle=self._settle, delivered=self._delivered, endpoint_url=lambda: self._config.sqs_endpoint_url,
            wake=self._wake, clock=self._clock,
        ), name="rekognition-emulator-notifications")

    async def _stop_notifier(self, app: web.Application) -> None:
        task, self._notifier = self._notifier, None
        self._notifier_loop = self._wake = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 picks a free port) and return the URL."""
        if self._runner is not None:
            return self.url
        runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self._url = f"http://{shown}:{bound_port}"
        return self._url

    async def stop(self) -> None:
        """Stop listening and the notification task (cancelled and awaited); idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._url = None

    async def __aenter__(self) -> RekognitionEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- configuration ---------------------------------------------------------------------------------

    @property
    def config(self) -> EmulatorConfig:
        return self._config

    def configure(self, new: EmulatorConfig | None = None, /, **changes: Any) -> EmulatorConfig:
        """Replace the config (whole, or some fields); a quota change starts a full bucket."""
        with self._lock:
            old = self._config
            config = replace(new or old, **changes)
            self._config = config
            if config.quota_tps != old.quota_tps:
                self._reset_bucket()
            if config.start_quota_tps != old.start_quota_tps:
                self._reset_start_bucket()
            if config.seed != old.seed:
                self._fault_rng = random.Random(config.seed)
            return config

    def _reset_bucket(self) -> None:
        quota = self._config.quota_tps
        self._bucket = None if quota is None else _TokenBucket(quota, self._clock())

    def _reset_start_bucket(self) -> None:
        quota = self._config.start_quota_tps
        self._start_bucket = None if quota is None else _TokenBucket(quota, self._clock())

    # --- jobs ------------------------------------------------------------------------------------------

    def add_job(self, fixture: JobFixture) -> None:
        """Add or replace a job; tokens issued for an earlier job with this id stop working."""
        with self._lock:
            self._epochs += 1
            self._jobs[fixture.job_id] = _Job(fixture=fixture, epoch=self._epochs)

    def add_jobs(self, fixtures: Iterable[JobFixture]) -> None:
        for fixture in fixtures:
            self.add_job(fixture)

    def remove_job(self, job_id: str) -> bool:
        """Forget a job (its results "expired"); True if it existed."""
        with self._lock:
            return self._jobs.pop(job_id, None) is not None

    def job_ids(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    def set_status(self, job_id: str, status: JobStatus, message: str | None = None) -> None:
        """Set JobStatus (and StatusMessage) from now on, e.g. IN_PROGRESS -> SUCCEEDED."""
        if status not in JOB_STATUSES:
            raise ValueError(f"status must be one of {JOB_STATUSES} (got {status!r})")
        with self._lock:
            job = self._job(job_id)
            job.fixture = replace(job.fixture, job_status=status, status_message=message)
            job.in_progress_calls_left = 0
            job.reset_views()

    def complete_after(self, job_id: str, calls: int) -> None:
        """Answer IN_PROGRESS to the next ``calls`` Get* calls for the job, then SUCCEEDED."""
        if calls < 0:
            raise ValueError("calls must be >= 0")
        with self._lock:
            job = self._job(job_id)
            job.fixture = replace(job.fixture, job_status="SUCCEEDED")
            job.in_progress_calls_left = calls
            job.reset_views()

    def expire_tokens_once(self, job_id: str) -> None:
        """The next call presenting a NextToken for this job gets InvalidPaginationTokenException."""
        self.reject_tokens(job_id, 1)

    def reject_tokens(self, job_id: str, calls: int | None = None) -> None:
        """The next ``calls`` calls presenting a NextToken (None: all of them) get InvalidPaginationTokenException."""
        if calls is not None and calls < 0:
            raise ValueError("calls must be >= 0 or None")
        with self._lock:
            self._job(job_id).reject_tokens_left = -1 if calls is None else calls

    def in_progress_on_later_pages(self, job_id: str, calls: int) -> None:
        """Answer IN_PROGRESS to the next ``calls`` calls that present a NextToken (the first page still succeeds)."""
        if calls < 0:
            raise ValueError("calls must be >= 0")
        with self._lock:
            self._job(job_id).later_in_progress_left = calls

    def loop_tokens(self, job_id: str, back_to_page: int) -> None:
        """Make the last page's NextToken lead back to page ``back_to_page`` (>= 1), so tokens cycle forever.

        With 3 pages and ``back_to_page=1`` the tokens run A, B, A, B, ...: not a token repeated back to back.
        """
        if back_to_page < 1:
            raise ValueError(f"back_to_page must name a page after the first (got {back_to_page})")
        with self._lock:
            job = self._job(job_id)
            job.loop_to_page = back_to_page
            job.reset_views()

    def _job(self, job_id: str) -> _Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise KeyError(f"no such job: {job_id!r}") from None

    def prerender(self, max_results: int = MAX_RESULTS_CAP, sort_by: str = "TIMESTAMP") -> int:
        """Render every page of every SUCCEEDED job now, so later calls only copy bytes; returns pages."""
        max_results = min(max_results, MAX_RESULTS_CAP)
        pages = 0
        with self._lock:
            for job in self._jobs.values():
                if job.fixture.job_status != "SUCCEEDED" or job.fixture.error is not None:
                    continue
                order = sort_by if job.fixture.api == "GetFaceSearch" else "TIMESTAMP"
                total = len(job.fixture.results)
                for offset in range(0, max(total, 1), max_results):
                    self._page(job, max_results, order, offset)
                    pages += 1
        return pages

    def clear_cache(self) -> None:
        with self._lock:
            for job in self._jobs.values():
                job.reset_views()

    # --- started jobs (worker.local.starts) -------------------------------------------------------------

    def occupy(self, jobs: int, duration_s: float) -> None:
        """Count ``jobs`` more running jobs for ``duration_s``: started by another system in the account,
        they take room under ``max_concurrent_jobs`` and notify nobody here."""
        with self._lock:
            now_s = self._clock()
            self._complete_due(now_s)
            self._starts.occupy(jobs, duration_s, now_s)

    def _complete_due(self, now_s: float) -> None:
        """Complete the started jobs due by ``now_s``: Get* serves their results from now on."""
        config = self._config
        done, drops_used = self._starts.complete_due(
            now_s, queue_url=config.notification_queue_url, drop_next=config.drop_notifications,
            drop_for=config.drop_notifications_for,
        )
        if drops_used:
            self._config = replace(config, drop_notifications=config.drop_notifications - drops_used)
        for started in done:
            job = self._jobs.get(started.job_id)
            if job is not None and job.epoch == self._started_epochs.get(started.job_id):
                job.fixture = started.finished_fixture()
                job.reset_views()
        if self._starts.outbox:
            self._wake_notifier()

    def _wake_notifier(self) -> None:
        loop, wake = self._notifier_loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed under us: nothing left to wake
                loop.call_soon_threadsafe(wake.set)

    def _settle(self) -> tuple[list[Outgoing], float | None]:
        with self._lock:
            self._complete_due(self._clock())
            return self._starts.take_outbox(), self._starts.next_due_s()

    def _delivered(self, outgoing: Outgoing, error: str | None) -> None:
        with self._lock:
            self._starts.delivered(outgoing, error)

    def _start(self, operation: str, params: dict[str, Any]) -> bytes:
        """Answer a Start* call; the caller has completed the jobs due by now."""
        now_s = self._clock()
        request = StartRequest.parse(operation, params)
        config = self._config
        started, created = self._starts.start(
            request, now_s, max_running=config.max_concurrent_jobs, duration_s=config.job_duration_s,
            faces=config.started_job_faces, invalid_videos=config.invalid_videos,
        )
        if created:
            self._epochs += 1
            self._jobs[started.job_id] = _Job(fixture=started.pending_fixture(), epoch=self._epochs)
            self._started_epochs[started.job_id] = self._epochs
            self._wake_notifier()  # its sleep may now end too late
        return orjson.dumps({"JobId": started.job_id})

    # --- counters --------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters so far, per operation and per error code, and the (arrival_s, outcome) call records.

        ``succeeded`` counts every 200 answer, ``in_progress`` the subset that said IN_PROGRESS;
        ``faults`` are InternalServerError answers, ``throttled`` quota rejections (ThrottlingException or
        ProvisionedThroughputExceededException), ``errors`` every other error. These, ``by_error`` and
        ``calls`` cover the Get* traffic; Start* calls appear in ``by_operation`` and in the start keys:
        ``starts_requested`` (every Start* call), ``jobs_created``, ``idempotent_starts`` (a known
        ClientRequestToken), ``limit_exceeded``, ``start_throttled``, ``notifications_sent``,
        ``notifications_dropped``, ``notifications_failed``, ``notifications_pending``, ``running_now``,
        ``peak_running`` (external jobs included), ``peak_running_started`` (started here only) and
        ``started_jobs`` (one record per started job).
        """
        with self._lock:
            self._complete_due(self._clock())
            out: dict[str, Any] = {name: self._counters[name] for name in _COUNTER_NAMES}
            out["by_operation"] = {
                op: {name: counts[name] for name in _COUNTER_NAMES}
                for op, counts in self._by_operation.items()
            }
            out["by_error"] = dict(self._by_error)
            out["calls"] = list(self._calls)
            out.update(self._starts.stats())
            return out

    def reset_stats(self) -> None:
        """Zero the counters and call records; jobs, started or not, stay."""
        with self._lock:
            self._complete_due(self._clock())
            self._starts.reset_stats()
            self._counters.clear()
            self._by_operation.clear()
            self._by_error.clear()
            self._calls.clear()

    def _record(
        self, operation: str, arrival_s: float, outcome: Outcome, code: str | None, in_progress: bool
    ) -> None:
        per_op = self._by_operation.setdefault(operation, Counter())
        if operation in START_OPERATIONS:
            # The Get* counters and call records stay what the account quota saw; starts have their own.
            per_op["requests"] += 1
            per_op[_OUTCOME_COUNTER[outcome]] += 1
            self._starts.counters["starts_requested"] += 1
            if outcome == "throttled":
                self._starts.counters["start_throttled"] += 1
            return
        for counts in (self._counters, per_op):
            counts["requests"] += 1
            counts[_OUTCOME_COUNTER[outcome]] += 1
            if in_progress:
                counts["in_progress"] += 1
        if code is not None:
            self._by_error[code] += 1
        self._calls.append((arrival_s, outcome))

    # --- the API ---------------------------------------------------------------------------------------

    async def _handle_api(self, request: web.Request) -> web.Response:
        arrival_s = self._clock()
        target = request.headers.get("X-Amz-Target", "")
        operation = target.removeprefix(TARGET_PREFIX)
        raw = await request.read()
        with self._lock:
            config = self._config
            rejected = self._admit(request, target, operation, arrival_s)
        if config.latency_s > 0:
            await asyncio.sleep(config.latency_s)
        in_progress = False
        with self._lock:
            if rejected is None:
                try:
                    body, in_progress = self._answer(operation, raw)
                except ServiceError as exc:
                    rejected = exc
            op_key = operation if operation in API_NAMES or operation in START_OPERATIONS else "unknown"
            if rejected is None:
                self._record(op_key, arrival_s, "succeeded", None, in_progress)
            else:
                self._record(op_key, arrival_s, _outcome_of(rejected.code), rejected.code, False)
        request_id = str(uuid.uuid4())
        if rejected is None and operation in START_OPERATIONS and config.start_answer_delay_s > 0:
            await asyncio.sleep(config.start_answer_delay_s)
        if rejected is not None:
            return _error_response(rejected, request_id)
        return web.Response(body=body, content_type=CONTENT_TYPE, headers={"x-amzn-RequestId": request_id})

    def _admit(
        self, request: web.Request, target: str, operation: str, arrival_s: float
    ) -> ServiceError | None:
        """Checks made at arrival, in the service's order: signature, operation, account quota."""
        if self._config.require_auth and not request.headers.get("Authorization", "").startswith(
            "AWS4-HMAC-SHA256"
        ):
            return ServiceError("MissingAuthenticationTokenException", "Missing Authentication Token")
        starting = operation in START_OPERATIONS
        if not target.startswith(TARGET_PREFIX) or (operation not in API_NAMES and not starting):
            return ServiceError("UnknownOperationException", f"Unknown operation {target!r}")
        if self._config.access_denied:
            return ServiceError("AccessDeniedException", "User: arn:aws:sts::123456789012:assumed-role/ingest/worker "
                                f"is not authorized to perform: rekognition:{operation}")
        # A throttled call takes nothing from the bucket: only admitted calls spend a token.
        if starting:
            if self._start_bucket is not None and not self._start_bucket.try_take(arrival_s):
                return ServiceError("ThrottlingException")
        elif self._bucket is not None and not self._bucket.try_take(arrival_s):
            return ServiceError(self._config.throttle_error, status=self._config.throttle_http_status)
        return None

    def _answer(self, operation: str, raw: bytes) -> tuple[bytes, bool]:
        """The response body for an admitted call, and whether it said IN_PROGRESS; raises ServiceError."""
        self._complete_due(self._clock())  # Get* answers agree with the clock, notification task or not
        if operation in START_OPERATIONS:
            # fault_rate stays a Get* knob: starts draw nothing from its seeded sequence.
            try:
                return self._start(operation, _parse_params(raw)), False
            except StartRejected as exc:
                raise ServiceError(exc.code, exc.message) from None
        if self._config.fault_rate > 0 and self._fault_rng.random() < self._config.fault_rate:
            raise ServiceError("InternalServerError")
        params = _parse_params(raw)
        job_id = params.get("JobId")
        if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
            raise ServiceError("InvalidParameterException", "JobId must match ^[a-zA-Z0-9-_]{1,64}$")
        job = self._jobs.get(job_id)
        if job is None or job.fixture.api != operation:
            raise ServiceError("ResourceNotFoundException")
        if job.fixture.error is not None:
            raise ServiceError(job.fixture.error)
        max_results = _max_results(params.get("MaxResults", MAX_RESULTS_CAP))
        sort_by = "TIMESTAMP"
        if operation == "GetFaceSearch":
            sort_by = params.get("SortBy", "TIMESTAMP")
            if sort_by not in SORT_BYS:
                raise ServiceError(
                    "InvalidParameterException", f"SortBy must be INDEX or TIMESTAMP (got {sort_by!r})"
                )
        token = params.get("NextToken")
        if token is not None and (not isinstance(token, str) or not 0 < len(token) <= TOKEN_MAX_CHARS):
            raise ServiceError("InvalidParameterException", "NextToken must be 1..255 characters")

        if job.in_progress_calls_left > 0:
            job.in_progress_calls_left -= 1
            return orjson.dumps(_status_body(replace(job.fixture, job_status="IN_PROGRESS"))), True
        if job.fixture.job_status in ("IN_PROGRESS", "FAILED"):
            return orjson.dumps(_status_body(job.fixture)), job.fixture.job_status == "IN_PROGRESS"
        # SUCCEEDED, or a status newer than the published model: served with its results.
        offset = 0 if token is None else self._token_offset(job, token, sort_by)
        if offset is None:
            return orjson.dumps(_status_body(replace(job.fixture, job_status="IN_PROGRESS"))), True
        return self._page(job, max_results, sort_by, offset), False

    def _token_offset(self, job: _Job, token: str, sort_by: str) -> int | None:
        """Where a NextToken leads, None for an IN_PROGRESS answer; raises for a rejected token."""
        if job.reject_tokens_left != 0:
            if job.reject_tokens_left > 0:
                job.reject_tokens_left -= 1
            raise ServiceError("InvalidPaginationTokenException", "Pagination token has expired")
        offset = self._decode_token(token, job, sort_by)
        if job.later_in_progress_left > 0:
            job.later_in_progress_left -= 1
            return None
        return offset

    def _page(self, job: _Job, max_results: int, sort_by: str, offset: int) -> bytes:
        key = (max_results, sort_by, offset)
        cached = job.pages.get(key)
        if cached is None:
            items = job.ordered(sort_by)
            stop = min(len(items), offset + max_results)
            token = self._encode_token(job, stop, sort_by) if stop < len(items) else None
            if token is None and job.loop_to_page is not None and job.loop_to_page * max_results < len(items):
                token = self._encode_token(job, job.loop_to_page * max_results, sort_by)
            cached = orjson.dumps(page_body(job.fixture, offset, stop, token, results=items))
            job.pages[key] = cached
        return cached

    def _mac(self, payload: bytes) -> str:
        digest = hmac.new(self._token_key, payload, hashlib.sha256).digest()[:12]
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def _encode_token(self, job: _Job, offset: int, sort_by: str) -> str:
        payload = f"{job.fixture.job_id}|{job.epoch}|{offset}|{sort_by[0]}".encode()
        token = base64.urlsafe_b64encode(payload).decode().rstrip("=") + "." + self._mac(payload)
        assert len(token) <= TOKEN_MAX_CHARS  # 64-char JobId + counters stay well under the limit
        return token

    def _decode_token(self, token: str, job: _Job, sort_by: str) -> int:
        invalid = ServiceError("InvalidPaginationTokenException", "Invalid pagination token")
        encoded, _, mac = token.partition(".")
        try:
            payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except (binascii.Error, ValueError):
            raise invalid from None
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise invalid
        try:
            job_id, epoch, offset, sort_code = payload.decode().split("|")
            position = int(offset)
            same_job = job_id == job.fixture.job_id and int(epoch) == job.epoch
        except ValueError:
            raise invalid from None
        if not same_job or sort_code != sort_by[0]:
            raise invalid  # another job's token, a replaced job's, or one issued for the other SortBy
        if not 0 < position < len(job.fixture.results):
            raise invalid
        return position

    # --- control endpoints (not part of the AWS API; no auth, not counted) ------------------------------

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats(), dumps=_dumps)

    async def _handle_reset_stats(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return web.json_response({"ok": True}, dumps=_dumps)

    async def _handle_get_config(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.config), dumps=_dumps)

    async def _handle_config(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object of EmulatorConfig fields")
            config = self.configure(**changes)
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400, dumps=_dumps)
        return web.json_response(asdict(config), dumps=_dumps)

    async def _handle_add_jobs(self, request: web.Request) -> web.Response:
        """Body: one JobFixture object (snake_case fields), a list of them, or ``{"jobs": [...]}``."""
        try:
            data = orjson.loads(await request.read())
            items = data.get("jobs", [data]) if isinstance(data, dict) else data
            if not isinstance(items, list):
                raise ValueError("expected a fixture object or a list of fixtures")
            fixtures = [JobFixture.from_dict(item) for item in items]
        except (TypeError, ValueError, AttributeError) as exc:
            return web.json_response({"error": str(exc)}, status=400, dumps=_dumps)
        self.add_jobs(fixtures)
        return web.json_response({"added": [f.job_id for f in fixtures]}, dumps=_dumps)

    async def _handle_occupy(self, request: web.Request) -> web.Response:
        """Body: ``{"jobs": N, "duration_s": D}``."""
        try:
            data = orjson.loads(await request.read())
            if not isinstance(data, dict) or set(data) != {"jobs", "duration_s"}:
                raise ValueError('expected {"jobs": N, "duration_s": D}')
            jobs, duration_s = data["jobs"], data["duration_s"]
            if type(jobs) is not int or isinstance(duration_s, bool) or not isinstance(duration_s, int | float):
                raise ValueError("jobs must be an integer and duration_s a number")
            self.occupy(jobs, float(duration_s))
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400, dumps=_dumps)
        return web.json_response({"running_now": self.stats()["running_now"]}, dumps=_dumps)

    async def _handle_remove_job(self, request: web.Request) -> web.Response:
        removed = self.remove_job(request.match_info["job_id"])
        return web.json_response({"removed": removed}, status=200 if removed else 404, dumps=_dumps)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _status_body(fixture: JobFixture) -> Json:
    # A job that is not SUCCEEDED has no results and no analysed video metadata yet.
    return page_body(replace(fixture, video_metadata={}), 0, 0, None)


def _parse_params(raw: bytes) -> dict[str, Any]:
    try:
        params = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise ServiceError("SerializationException", "Request body is not valid JSON") from None
    if not isinstance(params, dict):
        raise ServiceError("SerializationException", "Request body must be a JSON object")
    return params


def _max_results(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ServiceError("SerializationException", "MaxResults must be an integer")
    if value < 1:
        raise ServiceError("InvalidParameterException", "MaxResults must be >= 1")
    return min(value, MAX_RESULTS_CAP)  # the service caps rather than rejects large values


def _error_response(error: ServiceError, request_id: str) -> web.Response:
    body = {"__type": error.code, "Message": error.message}
    return web.Response(
        body=orjson.dumps(body),
        status=error.status,
        content_type=CONTENT_TYPE,
        headers={"x-amzn-RequestId": request_id, "x-amzn-ErrorType": error.code},
    )


class EmulatorThread:
    """The emulator on its own event loop in a daemon thread, for synchronous callers.

    ``with EmulatorThread(config, jobs=[...]) as emu: client(endpoint_url=emu.url)``. Job control,
    configuration and counters may be used from any thread: the emulator's state is lock-protected.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        jobs: Iterable[JobFixture] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.emulator = RekognitionEmulator(config, jobs=jobs, clock=clock)
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 10.0) -> str:
        if self._thread is not None:
            return self.url
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run, args=(loop,), name="rekognition-emulator", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self.emulator.start(self._host, self._port), loop).result(
                timeout_s
            )
        except BaseException:
            self.stop(timeout_s)
            raise
        return self.url

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving and join the thread; idempotent."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.emulator.stop(), loop).result(timeout_s)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout_s)

    def __enter__(self) -> EmulatorThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Delegates, so callers need not reach through ``.emulator``.
    @property
    def url(self) -> str:
        return self.emulator.url

    @property
    def config(self) -> EmulatorConfig:
        return self.emulator.config

    def configure(self, new: EmulatorConfig | None = None, /, **changes: Any) -> EmulatorConfig:
        return self.emulator.configure(new, **changes)

    def add_job(self, fixture: JobFixture) -> None:
        self.emulator.add_job(fixture)

    def add_jobs(self, fixtures: Iterable[JobFixture]) -> None:
        self.emulator.add_jobs(fixtures)

    def remove_job(self, job_id: str) -> bool:
        return self.emulator.remove_job(job_id)

    def set_status(self, job_id: str, status: JobStatus, message: str | None = None) -> None:
        self.emulator.set_status(job_id, status, message)

    def complete_after(self, job_id: str, calls: int) -> None:
        self.emulator.complete_after(job_id, calls)

    def expire_tokens_once(self, job_id: str) -> None:
        self.emulator.expire_tokens_once(job_id)

    def reject_tokens(self, job_id: str, calls: int | None = None) -> None:
        self.emulator.reject_tokens(job_id, calls)

    def in_progress_on_later_pages(self, job_id: str, calls: int) -> None:
        self.emulator.in_progress_on_later_pages(job_id, calls)

    def loop_tokens(self, job_id: str, back_to_page: int) -> None:
        self.emulator.loop_tokens(job_id, back_to_page)

    def prerender(self, max_results: int = MAX_RESULTS_CAP, sort_by: str = "TIMESTAMP") -> int:
        return self.emulator.prerender(max_results, sort_by)

    def occupy(self, jobs: int, duration_s: float) -> None:
        self.emulator.occupy(jobs, duration_s)

    def stats(self) -> dict[str, Any]:
        return self.emulator.stats()

    def reset_stats(self) -> None:
        self.emulator.reset_stats()


# --- command line --------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m worker.local.emulator",
        description="Local Rekognition Video emulator (Start/GetFaceDetection, Start/GetFaceSearch). "
        "Prints 'READY <url>' once listening; stops on SIGTERM or SIGINT.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--quota-tps", type=float, default=None, help="account quota, calls per second")
    parser.add_argument(
        "--throttle-error", choices=THROTTLE_ERRORS, default="ProvisionedThroughputExceededException"
    )
    parser.add_argument("--throttle-http-status", type=int, default=400)
    parser.add_argument("--fault-rate", type=float, default=0.0, help="probability of InternalServerError")
    parser.add_argument("--latency-s", type=float, default=0.0, help="delay added to every answer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-auth", action="store_true", help="accept unsigned requests")
    parser.add_argument("--demo-jobs", action="store_true", help="load synth.demo_jobs()")
    parser.add_argument("--future-values", action="store_true",
                        help="with --demo-jobs: results carry enum values no published model lists "
                             "(synth.with_future_values), to check a consumer's forward compatibility")
    parser.add_argument("--prerender", action="store_true", help="render all 1000-result pages before READY")
    parser.add_argument("--max-concurrent-jobs", type=int, default=20, help="account's concurrent-job limit")
    parser.add_argument("--job-duration-s", type=float, default=1.0, help="how long a started job runs")
    parser.add_argument("--start-quota-tps", type=float, default=None, help="Start* quota, calls per second")
    parser.add_argument("--notification-queue-url", default=None,
                        help="SQS queue that receives completion notifications (SNS-enveloped)")
    parser.add_argument("--sqs-endpoint-url", default=None,
                        help="SQS endpoint for notifications (default: botocore's, AWS_ENDPOINT_URL_SQS included)")
    parser.add_argument("--drop-notifications", type=int, default=0, help="lose the next N notifications")
    parser.add_argument("--started-job-faces", type=int, default=40, help="result elements per started job")
    return parser.parse_args(argv)


def _config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    return EmulatorConfig(
        quota_tps=args.quota_tps,
        throttle_error=args.throttle_error,
        throttle_http_status=args.throttle_http_status,
        fault_rate=args.fault_rate,
        latency_s=args.latency_s,
        seed=args.seed,
        require_auth=not args.no_auth,
        max_concurrent_jobs=args.max_concurrent_jobs,
        job_duration_s=args.job_duration_s,
        start_quota_tps=args.start_quota_tps,
        notification_queue_url=args.notification_queue_url,
        sqs_endpoint_url=args.sqs_endpoint_url,
        drop_notifications=args.drop_notifications,
        started_job_faces=args.started_job_faces,
    )


async def _serve(config: EmulatorConfig, args: argparse.Namespace) -> int:
    jobs = demo_jobs(args.seed) if args.demo_jobs else []
    if args.future_values:
        jobs = [with_future_values(job) if job.job_status == "SUCCEEDED" else job for job in jobs]
    emulator = RekognitionEmulator(config, jobs=jobs)
    if args.prerender:
        emulator.prerender()
    # Signal handlers only set the event; shutdown happens below, in order.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    url = await emulator.start(args.host, args.port)
    print(f"READY {url}", flush=True)
    try:
        await stopping.wait()
    finally:
        await emulator.stop()
    summary = {k: v for k, v in emulator.stats().items() if k not in ("calls", "started_jobs")}
    print(f"stopped {orjson.dumps(summary).decode()}", file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        config = _config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(config, args))


if __name__ == "__main__":
    raise SystemExit(main())
