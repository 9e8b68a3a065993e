"""`run`'s scheduler: starts submitted videos under the account's limits, and finds lost notifications.

Every replica runs one. Each pass:

1. **Starts** as many submissions as slots allow. A slot is claimed in PostgreSQL (worker/db/submissions.py:
   never more than MAX_REKOGNITION_JOBS of this deployment's jobs starting or running, across replicas),
   then the Start* call waits for the Start* rate limiter (REKOGNITION_START_TPS, its own budget, shared by
   the fleet with RATE_LIMIT_SCOPE=fleet) and is sent with the submission's ClientRequestToken. A
   ``LimitExceededException`` (the account's concurrent-job limit, shared with every other system in it)
   hands the submission back and pauses this replica's starts with backoff; it never fails a video. A
   completion notification handled here ends the pause at once, since it freed a slot.
2. **Sweeps**: a started job with no notification after SUBMIT_SWEEP_AFTER_S gets one Get* call with
   MaxResults 1, through the Get* limiter. Finished: a notification is put on the queue for it, and the
   job is ingested as if Rekognition had sent it. Still running: probed again later, the wait doubling.
   A job that has run three times longer than this deployment's recent jobs (90th percentile of the last
   50 notified ones, at least 3 of them, and at least EARLY_PROBE_MIN_S) gets its first probe sooner: with
   a long SUBMIT_SWEEP_AFTER_S, a lost notification among short videos then costs minutes, not the full wait.

Between passes it sleeps SUBMIT_POLL_INTERVAL_S, or less when woken: by a start request from `submit`, or
by a completion notification (a slot is free).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import orjson
from botocore.exceptions import ClientError

from worker import logsafe, metrics
from worker.config import Settings
from worker.db.submissions import Claim, Probe, SchedulerStore
from worker.errors import PermanentJobError, WorkerError, aws_error, aws_message, aws_status
from worker.logs import get_logger
from worker.messages import Api
from worker.ratelimit import Limiter
from worker.rekognition import (
    CALL_ERRORS,
    CREDENTIAL_CODES,
    CREDENTIAL_EXCEPTIONS,
    FAULT_CODES,
    THROTTLE_CODES,
    Fetcher,
    error_code,
    raw_body,
)
from worker.runtime import open_limiter

log = get_logger(__name__)

LIMIT_CODES = frozenset({"LimitExceededException"})
# The video or its options can never start as submitted: the submission fails with AWS's reason.
REFUSED_CODES = frozenset({
    "InvalidParameterException", "InvalidS3ObjectException", "VideoTooLargeException", "ResourceNotFoundException",
    "IdempotentParameterMismatchException", "InvalidVideoException",
})
# An error this version does not know fails the submission only after this many starts answered it.
MAX_UNKNOWN_ERROR_STARTS = 5
# The early first probe (module docstring): how many notified jobs it needs, how many times their 90th
# percentile run a job must exceed, and never sooner than this after the start.
EARLY_PROBE_MIN_JOBS = 3
EARLY_PROBE_FACTOR = 3.0
EARLY_PROBE_MIN_S = 30.0


@dataclass(frozen=True, slots=True)
class StartBackoff:
    """Waits (seconds) after refused starts: the account full (LimitExceeded), throttled, failing."""

    limit_base_s: float = 2.0
    limit_cap_s: float = 60.0
    throttle_s: float = 1.0
    fault_base_s: float = 2.0
    fault_cap_s: float = 120.0
    credentials_s: float = 30.0

    def limit_s(self, streak: int, rng: random.Random) -> float:
        return _equal_jitter(self.limit_base_s, self.limit_cap_s, streak, rng)

    def fault_s(self, attempts: int, rng: random.Random) -> float:
        return _equal_jitter(self.fault_base_s, self.fault_cap_s, attempts, rng)


def _equal_jitter(base_s: float, cap_s: float, attempt: int, rng: random.Random) -> float:
    """Half fixed, half random: replicas refused together do not all come back together."""
    ceiling = min(cap_s, base_s * 2 ** min(max(attempt - 1, 0), 20))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


async def open_start_limiter(settings: Settings, stack: AsyncExitStack, region: str | None) -> Limiter:
    """The Start* budget (REKOGNITION_START_TPS), apart from the Get* budget: its own bucket, per region."""
    return await open_limiter(settings, stack, bucket=f"rekognition-start:{region or 'default'}",
                              ceiling_per_s=settings.rekognition_start_tps)


def sweep_notification(probe: Probe, status: str | None) -> str:
    """The completion notification Rekognition would have sent, for a job a probe found finished.

    ``Timestamp`` is the job's start: the earliest it can have completed, so the 7-day clock errs early.
    """
    doc: dict[str, Any] = {
        "JobId": probe.job_id,
        "API": "StartFaceDetection" if probe.options.api is Api.FACE_DETECTION else "StartFaceSearch",
        "Timestamp": int(probe.started_at.timestamp() * 1000),
        "Video": {"S3ObjectName": probe.video.name, "S3Bucket": probe.video.bucket},
        "Source": "worker-sweep",
    }
    if status in ("SUCCEEDED", "FAILED"):
        doc["Status"] = status
    if probe.options.job_tag is not None:
        doc["JobTag"] = probe.options.job_tag
    return orjson.dumps(doc).decode()


class Scheduler:
    """Starts and sweeps submissions for one replica (see the module docstring)."""

    def __init__(self, settings: Settings, store: SchedulerStore, client: Any, fetcher: Fetcher,
                 start_limiter: Limiter, enqueue: Callable[[str], Awaitable[Any]], *,
                 backoff: StartBackoff | None = None, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, early_probe_min_s: float = EARLY_PROBE_MIN_S) -> None:
        self.settings = settings
        self.store = store
        self._client = client
        self._fetcher = fetcher
        self._limiter = start_limiter
        self._enqueue = enqueue
        self._backoff = backoff or StartBackoff()
        self._clock = clock
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._paused_until = 0.0
        self._limit_streak = 0
        self._channel_warned = False
        self._blocked: str | None = None
        self._counted_at = float("-inf")
        self._early_probe_after_s: float | None = None
        self._early_probe_min_s = early_probe_min_s
        # Every series exists from the start (at 0), so alerts on their increase see the first event.
        for api in Api:
            for outcome in ("started", "limit_exceeded", "throttled", "credentials_error", "error", "failed"):
                metrics.STARTS.labels(api.value, outcome)
        for result in ("in_progress", "finished", "failed", "error"):
            metrics.PROBES.labels(result)

    @property
    def notification_channel(self) -> dict[str, str] | None:
        s = self.settings
        if s.rekognition_sns_topic_arn and s.rekognition_role_arn:
            return {"SNSTopicArn": s.rekognition_sns_topic_arn, "RoleArn": s.rekognition_role_arn}
        return None

    def wake(self, *, slot_freed: bool = False) -> None:
        """Run a pass now; ``slot_freed``: a job of ours finished, so a LimitExceeded pause may end."""
        if slot_freed:
            self._paused_until = 0.0
        self._wake.set()

    @property
    def blocked(self) -> str | None:
        """Why submitted videos cannot start at all (no notification channel configured), as of the last pass;
        None when nothing waits or they can start."""
        return self._blocked

    def _missing_channel_settings(self) -> list[str]:
        s = self.settings
        return [name for name, value in (("REKOGNITION_SNS_TOPIC_ARN", s.rekognition_sns_topic_arn),
                                         ("REKOGNITION_ROLE_ARN", s.rekognition_role_arn)) if not value]

    async def has_open(self) -> bool:
        return await self.store.open_count() > 0

    async def run(self, stopping: asyncio.Event) -> None:
        """Passes until ``stopping``; a failed pass (the database, say) is logged and tried again."""
        try:
            while not stopping.is_set():
                self._wake.clear()
                try:
                    await self.run_pass()
                except Exception as exc:  # the database or the network: the next pass tries again
                    log.warning("submission pass failed", error=f"{type(exc).__name__}: {exc}"[:300])
                await self._sleep_until_woken(stopping)
        finally:
            await self.store.close()

    async def _sleep_until_woken(self, stopping: asyncio.Event) -> None:
        """Until the poll interval ends, the LimitExceeded pause ends, or :meth:`wake` (the worker's stop
        wakes it too). No helper tasks: an idle replica's task count stays flat."""
        wait_s = self.settings.submit_poll_interval_s
        if self._paused_until > self._clock():
            wait_s = min(wait_s, self._paused_until - self._clock())
        if stopping.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(wait_s, 0.0)):
                await self._wake.wait()

    async def run_pass(self) -> None:
        await self._start_some()
        await self._sweep_some()
        if self._clock() - self._counted_at >= self.settings.queue_depth_interval_s:
            self._counted_at = self._clock()
            counts = await self.store.counts()
            for state, n in counts.items():
                metrics.SUBMISSIONS.labels(state).set(n)
            metrics.REKOGNITION_JOBS_RUNNING.set(counts["starting"] + counts["started"])
            p90_run_s, jobs = await self.store.recent_run_s()
            self._early_probe_after_s = early_probe_after_s(p90_run_s, jobs, min_s=self._early_probe_min_s)

    # --- starting --------------------------------------------------------------------------------------

    async def _start_some(self) -> None:
        channel = self.notification_channel
        while self._clock() >= self._paused_until:
            if channel is None:
                waiting = await self.store.waiting_count()
                missing = " and ".join(self._missing_channel_settings())
                self._blocked = (f"{waiting} submitted video(s) wait to be started, but nothing can start them: set "
                                 f"{missing} (the jobs' NotificationChannel)") if waiting else None
                if self._blocked is not None and not self._channel_warned:
                    self._channel_warned = True  # once: the metric and its alert carry it from here
                    log.error("submissions are waiting but nothing starts them", reason=self._blocked,
                              missing_settings=missing, submissions_waiting=waiting)
                return
            claim = await self.store.claim(self.settings.max_rekognition_jobs, self.settings.submit_start_lease_s)
            if claim is None:
                return
            await self._start(claim, channel)

    async def _start(self, claim: Claim, channel: dict[str, str]) -> None:
        api = claim.options.api
        # The object key is hashed: video names often name people (worker/logsafe.py).
        bound = {"video": logsafe.video(claim.video.bucket, claim.video.name), "api": api.value,
                 "start_attempt": claim.attempts}
        params = claim.options.start_request(claim.video, claim.token, channel)
        call = self._client.start_face_detection if api is Api.FACE_DETECTION else self._client.start_face_search
        async with self._limiter as permit:
            try:
                response = await call(**params)
            except CALL_ERRORS as exc:
                failure: BaseException | None = exc
            else:
                failure = None
        if failure is None:
            self._limiter.record_success(permit)
            job_id = str(response["JobId"])
            self._limit_streak = 0
            await self.store.started(claim, job_id, self.settings.submit_sweep_after_s)
            metrics.STARTS.labels(api.value, "started").inc()
            log.info("video started", job_id=job_id, **bound)
            return
        code = error_code(failure) if isinstance(failure, ClientError) else None
        if code in LIMIT_CODES:
            self._limit_streak += 1
            delay_s = self._backoff.limit_s(self._limit_streak, self._rng)
            self._paused_until = self._clock() + delay_s
            await self.store.retry_later(claim, delay_s)
            metrics.STARTS.labels(api.value, "limit_exceeded").inc()
            log.info("account's concurrent job limit reached: starts paused", retry_in_s=round(delay_s, 1),
                     **bound, **aws_error(failure))
        elif code in THROTTLE_CODES:
            await self._limiter.record_throttle(permit)
            await self.store.retry_later(claim, self._backoff.throttle_s)
            metrics.STARTS.labels(api.value, "throttled").inc()
        elif isinstance(failure, CREDENTIAL_EXCEPTIONS) or code in CREDENTIAL_CODES:
            self._paused_until = self._clock() + self._backoff.credentials_s
            await self.store.retry_later(claim, self._backoff.credentials_s)
            metrics.STARTS.labels(api.value, "credentials_error").inc()
            log.error("Start* refused the deployment's credentials or permissions: starts paused",
                      retry_in_s=self._backoff.credentials_s, **bound, **aws_error(failure))
        elif code in REFUSED_CODES or (code is not None and aws_status(failure) < 500 and code not in FAULT_CODES
                                       and claim.attempts >= MAX_UNKNOWN_ERROR_STARTS):
            reason = f"{api.value.lower()} start refused: {code}: {aws_message(failure) or failure}"
            await self.store.start_failed(claim, reason)
            metrics.STARTS.labels(api.value, "failed").inc()
            log.error("video could not be started", reason=reason, **bound, **aws_error(failure))
        else:
            delay_s = self._backoff.fault_s(claim.attempts, self._rng)
            await self.store.retry_later(claim, delay_s)
            metrics.STARTS.labels(api.value, "error").inc()
            log.warning("Start* failed; retried later", retry_in_s=round(delay_s, 1), **bound, **aws_error(failure))

    # --- the sweep -------------------------------------------------------------------------------------

    async def _sweep_some(self) -> None:
        cap_s = max(self.settings.submit_sweep_after_s, 3600.0)
        while (probe := await self.store.claim_probe(self.settings.submit_sweep_after_s, cap_s,
                                                     self._early_probe_after_s)) is not None:
            await self._probe(probe)

    async def _probe(self, probe: Probe) -> None:
        bound = {"job_id": probe.job_id, "video": logsafe.video(probe.video.bucket, probe.video.name),
                 "probe": probe.probes}
        api = probe.options.api
        try:
            response = await self._fetcher.fetch_response(api, probe.job_id, None, max_results=1)
            status = orjson.loads(raw_body(response)).get("JobStatus")
        except PermanentJobError as exc:
            reason = f"no completion notification, and {exc}"
            await self.store.probed_failed(probe, reason)
            metrics.PROBES.labels("failed").inc()
            log.error("started job unknown to Rekognition", reason=reason, **bound)
            return
        except (WorkerError, ValueError) as exc:  # ValueError: a 200 answer whose body is not JSON
            metrics.PROBES.labels("error").inc()
            log.warning("probe of a job without notification failed; tried again later", error=str(exc)[:300],
                        **bound)
            return
        if status == "IN_PROGRESS":
            metrics.PROBES.labels("in_progress").inc()
            log.info("job without notification still running", **bound)
            return
        # Queued first, marked second: a crash between the two probes again and queues a duplicate, which
        # the worker settles as one.
        await self._enqueue(sweep_notification(probe, status if isinstance(status, str) else None))
        await self.store.probed_finished(probe)
        metrics.PROBES.labels("finished").inc()
        log.warning("completion notification never arrived: the job is ingested from a probe", job_status=status,
                    **bound)


def early_probe_after_s(p90_run_s: float | None, jobs: int, *, min_s: float = EARLY_PROBE_MIN_S) -> float | None:
    """When a started job is overdue judging by this deployment's recent jobs; None without enough of them."""
    if p90_run_s is None or jobs < EARLY_PROBE_MIN_JOBS:
        return None
    return max(min_s, EARLY_PROBE_FACTOR * p90_run_s)

