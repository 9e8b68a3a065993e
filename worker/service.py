"""The SQS worker: completion notifications in, jobs ingested, nothing lost, clean shutdown.

Lifecycle (after saq and arq): signal handlers only set an event; the poll loop asks SQS for no
more messages than there are free job slots; each message runs in its own task with a visibility
heartbeat; on stop, polling ends first (an in-flight receive is allowed to finish and whatever it
returns is released), running jobs get what is left of SHUTDOWN_GRACE_S (counted from the stop
request) to finish, and the rest are cancelled and their messages released (visibility 0, or a fresh
copy on a message's last receive) so another replica picks them up at once. A message being settled
when its job is cancelled is settled to the end, within a deadline.

What happens to one message (its heartbeat, and the pure :func:`decide` that settles it) lives in
worker/queue.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from aiobotocore.session import get_session

from worker import metrics
from worker.config import Settings
from worker.credentials import CredentialsGate, rekognition_probe
from worker.db.migrate import head_revision
from worker.db.submissions import SchedulerStore
from worker.errors import ConfigError, InvalidInput
from worker.events.publisher import flush_before_exit, run_publisher
from worker.expiry import watch_pending_jobs
from worker.health import HealthServer
from worker.ingest import JobOutcome
from worker.lifecycle import retention_loop
from worker.logs import get_logger
from worker.messages import JobRef, OtherApiNotification, is_start_request, parse_message_body
from worker.queue import (
    DEFAULT_REQUEUE_RETRY,
    DEFAULT_RETRY_POLICY,
    MAX_SEND_DELAY_S,
    MAX_VISIBILITY_S,
    Action,
    Counters,
    QueueInfo,
    RequeueRetry,
    RetryPolicy,
    SqsQueue,
    decide,
    describe_queue,
    retry_delay_s,
    watch_depth,
)
from worker.queue import earlier_receives as _earlier_receives
from worker.queue import receive_count as _receive_count
from worker.runtime import Runtime, open_runtime
from worker.scheduler import Scheduler, open_start_limiter
from worker.sweep import sweep_loop

log = get_logger(__name__)

# decide() and its parts moved to worker/queue.py; still importable from here.
__all__ = ["DEFAULT_RETRY_POLICY", "MAX_SEND_DELAY_S", "MAX_VISIBILITY_S", "Action", "Counters", "QueueInfo",
           "RequeueRetry", "RetryPolicy", "SqsWorker", "decide", "describe_queue", "retry_delay_s", "run_service"]


def _is_transient_exception(exc: BaseException) -> bool:
    """The database (or the network) is unreachable: worth retrying, not the message's fault."""
    module = type(exc).__module__ or ""
    return isinstance(exc, OSError) or module.startswith(("asyncpg", "sqlalchemy"))


class SqsWorker:
    """Consumes completion notifications from one queue with bounded concurrency."""

    def __init__(self, settings: Settings, runtime: Runtime, sqs: Any, queue: QueueInfo, *,
                 health: HealthServer | None = None, clock: Callable[[], float] = time.monotonic,
                 retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
                 requeue_retry: RequeueRetry = DEFAULT_REQUEUE_RETRY, scheduler: Scheduler | None = None) -> None:
        if settings.heartbeat_interval_s >= settings.visibility_timeout_s:
            raise ConfigError("HEARTBEAT_INTERVAL_S must be shorter than VISIBILITY_TIMEOUT_S")
        self.settings = settings
        self.rt = runtime
        self.sqs = sqs
        self.queue = queue
        self.health = health
        self.retry_policy = retry_policy
        self._clock = clock
        self.stopping = asyncio.Event()
        self._stop_requested_at: float | None = None
        self._in_flight: dict[asyncio.Task[None], dict[str, Any]] = {}
        self._jobs_in_flight: set[str] = set()
        self._slot_freed = asyncio.Event()
        self.counters = Counters()
        # Starts submitted videos and sweeps for lost notifications (None: this worker only collects).
        self.scheduler = scheduler
        self.sqs_queue = SqsQueue(sqs, queue, settings, self.counters, retry=requeue_retry, clock=clock)
        # Paused after a run of credential failures; probes through the runtime's fetcher (None in unit tests).
        self.credentials = CredentialsGate(
            pause_after=settings.credentials_pause_after, probe_interval_s=settings.credentials_probe_interval_s,
            probe=rekognition_probe(runtime.fetcher) if runtime is not None else None)

    @property
    def in_flight(self) -> int:
        """Messages being worked on now (each holds one of the MAX_CONCURRENT_JOBS slots)."""
        return len(self._in_flight)

    # --- lifecycle -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Idempotent; the first call starts the graceful shutdown (and its grace period)."""
        if not self.stopping.is_set():
            log.info("shutdown requested: no new messages will be taken", in_flight=len(self._in_flight))
            self._stop_requested_at = self._clock()
            self.stopping.set()
            if self.scheduler is not None:
                self.scheduler.wake()

    async def run(self, *, exit_when_idle: bool = False) -> int:
        started = self._clock()
        depth = asyncio.create_task(
            watch_depth(self.sqs, self.queue, self.settings.queue_depth_interval_s, self.stopping), name="queue-depth")
        pending = asyncio.create_task(watch_pending_jobs(
            self.rt.store.oldest_pending_age_s, self.settings.queue_depth_interval_s, self.stopping),
            name="pending-jobs")
        background = [depth, pending]
        if self.scheduler is not None:
            background.append(asyncio.create_task(self.scheduler.run(self.stopping), name="scheduler"))
        try:
            await self._poll_loop(exit_when_idle)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.credentials.close()
            await self._drain()
            await self.sqs_queue.close()
            c = self.counters
            log.info("worker stopped", received=c.received, outcomes=c.by_outcome,
                     visibility_extensions=c.visibility_extensions,
                     visibility_extension_failures=c.visibility_extension_failures,
                     peak_in_flight=c.peak_in_flight, uptime_s=round(self._clock() - started, 1))
        return 0

    async def _poll_loop(self, exit_when_idle: bool) -> None:
        while not self.stopping.is_set():
            if self.health is not None:
                self.health.beat()
            if self.credentials.paused:
                # Running jobs finish; no new message is taken (and so none nears its redrive limit).
                await self.credentials.wait_until_open(self.stopping)
                continue
            free = self.settings.max_concurrent_jobs - len(self._in_flight)
            if free <= 0:
                await self._wait_for_slot()
                continue
            messages = await self.sqs_queue.receive(min(10, free), self.stopping)
            if self.stopping.is_set():
                # Received while stopping: hand them straight back rather than start them.
                await asyncio.gather(*(self._release(m) for m in messages))
                break
            for message in messages:
                self._start(message)
            if exit_when_idle and self.scheduler is not None and (why := self.scheduler.blocked) is not None:
                # Idle can never come: waiting here would be a silent wait for settings that cannot change.
                raise ConfigError(f"run --exit-when-idle: {why}")
            if not messages and exit_when_idle and not self._in_flight and await self._idle():
                log.info("queue is empty and nothing is in flight: exiting")
                break

    async def _idle(self) -> bool:
        """Nothing to receive, and no submission left to start or waiting for its job to finish."""
        if not await self.sqs_queue.is_empty():
            return False
        try:
            return self.scheduler is None or not await self.scheduler.has_open()
        except Exception as exc:  # the database: not idle as far as anyone can tell
            log.warning("open submissions unknown", error=f"{type(exc).__name__}: {exc}"[:300])
            return False

    async def _wait_for_slot(self) -> None:
        self._slot_freed.clear()
        stop = asyncio.create_task(self.stopping.wait())
        freed = asyncio.create_task(self._slot_freed.wait())
        try:
            await asyncio.wait({stop, freed}, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stop, freed):
                t.cancel()
            await asyncio.gather(stop, freed, return_exceptions=True)

    def _start(self, message: dict[str, Any]) -> None:
        task = asyncio.create_task(self._handle(message))
        self._in_flight[task] = message
        self.counters.peak_in_flight = max(self.counters.peak_in_flight, len(self._in_flight))
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            # _handle catches everything it can act on; anything here is a bug worth a loud line.
            log.error("message task crashed", error=repr(task.exception()))

    async def _drain(self) -> None:
        if not self._in_flight:
            return
        tasks = set(self._in_flight)
        grace_s = self.settings.shutdown_grace_s
        if self._stop_requested_at is not None:
            # The grace period runs from the stop request, not from the end of the last receive.
            grace_s = max(0.0, grace_s - (self._clock() - self._stop_requested_at))
        log.info("waiting for running jobs", jobs=len(tasks), grace_s=round(grace_s, 1))
        done, pending = await asyncio.wait(tasks, timeout=grace_s) if grace_s > 0 else (set(), tasks)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("grace period over: releasing unfinished jobs", jobs=len(pending))
            # Each releases its message, or finishes settling it, within the shutdown deadline.
            await asyncio.wait(pending, timeout=self.sqs_queue.retry.shutdown_deadline_s + 2.0)
        for task in done | pending:
            if task.done() and not task.cancelled():
                task.exception()  # observed; already logged by _task_done

    # --- one message -----------------------------------------------------------------------------

    async def _handle(self, message: dict[str, Any]) -> None:
        receive_count = _receive_count(message)
        earlier = _earlier_receives(message)
        structlog.contextvars.bind_contextvars(message_id=message.get("MessageId"), receive_count=receive_count)
        if earlier:
            structlog.contextvars.bind_contextvars(earlier_receives=earlier)
        ref: JobRef | None = None
        try:
            if is_start_request(message.get("Body") or ""):
                await self._handle_start_request(message, receive_count, earlier)
                return
            try:
                ref = parse_message_body(message.get("Body") or "")
            except OtherApiNotification as exc:
                # Another API's job on a shared topic: a subscription filter policy keeps these out
                # (docs/runbook.md); without one, the operator chooses their fate.
                fate = "other_api" if self.settings.other_api_notifications == "delete" else "invalid"
                if fate == "other_api":
                    log.info("notification of another Rekognition API dropped", api=exc.api)
                await self._settle(message, fate, receive_count, earlier, reason=str(exc))
                return
            except InvalidInput as exc:
                await self._settle(message, "invalid", receive_count, earlier, reason=str(exc))
                return
            structlog.contextvars.bind_contextvars(job_id=ref.job_id, api=ref.api.value)
            if ref.job_tag is not None:
                structlog.contextvars.bind_contextvars(job_tag=ref.job_tag)
            if await self._turned_away(message, ref, receive_count, earlier):
                return
            self._jobs_in_flight.add(ref.job_id)
            try:
                async with self.sqs_queue.heartbeat(message):
                    outcome = await self._ingest_notified(ref)
            finally:
                self._jobs_in_flight.discard(ref.job_id)
                # The ingestor unbinds job_id and api when it returns; this message's lines still need them.
                structlog.contextvars.bind_contextvars(job_id=ref.job_id, api=ref.api.value)
            self.credentials.record(outcome)
            await self._settle(message, outcome.outcome, receive_count, earlier, reason=outcome.reason)
        except asyncio.CancelledError:
            # Shutdown deadline: the job's transaction rolled back; let another replica take it now.
            if not self.sqs_queue.was_cut_short(message):  # else it was being settled, and that finished
                await self._release(message)
            raise
        except Exception as exc:
            kind = "transient" if _is_transient_exception(exc) else "error"
            log.error("message handling failed; it will be retried", outcome=kind,
                      error=f"{type(exc).__name__}: {exc}"[:500], exc_info=kind == "error")
            if kind == "error" and ref is not None:
                # Counted as the ingestor counts its own: the same error every time ends the job as failed.
                kind = await self._count_failure(ref, exc)
            await self._settle(message, kind, receive_count, earlier, reason=str(exc)[:500])
        finally:
            structlog.contextvars.unbind_contextvars("message_id", "receive_count", "earlier_receives", "job_id", "api",
                                                     "job_tag")

    async def _turned_away(self, message: dict[str, Any], ref: JobRef, receive_count: int, earlier: int) -> bool:
        """Settle a notification that needs no ingest now (True); else record the job pending (False)."""
        if (stone := await self.rt.store.tombstone(ref.job_id)) is not None:
            # Deleted or expired (worker/tombstones.py): not recorded pending again, not fetched; counted as
            # outcome "tombstoned" (worker_tombstoned_notifications_total).
            metrics.JOBS.labels(ref.api.value, "tombstoned").inc()
            log.info("notification of a deleted job settled without ingesting", outcome="tombstoned",
                     tombstone_reason=stone.reason, deleted_at=stone.deleted_at.isoformat())
            await self._settle(message, "tombstoned", receive_count, earlier, reason=str(stone))
            return True
        await self._note_pending(ref)
        if ref.job_id in self._jobs_in_flight:
            # Another copy of this notification is running here: by the time this one returns it is
            # a duplicate. Settled without a Get* call, which would only find the job's lock taken.
            reason = "another copy of this job is running in this worker"
            metrics.JOBS.labels(ref.api.value, "busy").inc()
            log.info("job finished", outcome="busy", pages=0, rows=0, seconds=0.0, reason=reason)
            await self._settle(message, "busy", receive_count, earlier, reason=reason)
            return True
        return False

    async def _ingest_notified(self, ref: JobRef) -> JobOutcome:
        """Whatever Status the notification claims, Rekognition's own JobStatus (the first Get* page, read by
        the ingestor) decides: FAILED records the failure, SUCCEEDED ingests (or settles a duplicate), no
        answer is transient. A message never deletes data on its own word."""
        claims_failed = ref.notified_status in ("FAILED", "ERROR")
        # An ingested job SUCCEEDED at Rekognition, whenever it was: a FAILED claim about it is a duplicate,
        # settled without a Get* call (a flood of forged copies costs no quota and no re-ingest).
        since_ms = 0 if claims_failed else ref.notified_at_ms
        outcome = await self.rt.ingestor.ingest(ref, skip_if_ingested_since_ms=since_ms)
        if claims_failed and outcome.ok:
            metrics.NOTIFIED_FAILED_CONTRADICTED.inc()
            log.warning("the notification says the job failed but Rekognition reports it succeeded: settled as a "
                        "completion", notified_status=ref.notified_status, outcome=outcome.outcome)
        return outcome

    async def _note_pending(self, ref: JobRef) -> None:
        # The 7-day clock starts here, in the database; an outage is transient like any other in _handle.
        await self.rt.store.note_pending(ref)
        if self.scheduler is not None:
            # Rekognition finished a job: if it was one of ours, its slot is free now.
            self.scheduler.wake(slot_freed=True)

    async def _handle_start_request(self, message: dict[str, Any], receive_count: int, earlier: int) -> None:
        """`submit`'s start request: wakes the scheduler, and stays in the queue while submissions are open,
        so that the autoscaler keeps (or brings back) a replica to start them and to sweep their jobs."""
        if self.scheduler is None:
            await self._settle(message, "waiting", receive_count, earlier, reason="this worker starts no jobs")
            return
        self.scheduler.wake()
        if not await self.scheduler.has_open():
            outcome = "submissions_done"
        else:
            # Blocked: nothing starts them until the settings change, so the request is not handed back every
            # few seconds (the scheduler's own pass still notices new submissions every SUBMIT_POLL_INTERVAL_S).
            outcome = "blocked" if self.scheduler.blocked is not None else "waiting"
        await self._settle(message, outcome, receive_count, earlier)

    async def _count_failure(self, ref: JobRef, exc: Exception) -> str:
        """The outcome of an unexpected error once counted toward MAX_IDENTICAL_FAILURES ("error" or "failed")."""
        try:
            return (await self.rt.ingestor.count_failure(ref, exc)).outcome
        except Exception as count_exc:  # counting is best effort here: the message is retried regardless
            log.warning("could not count the failure", error=f"{type(count_exc).__name__}: {count_exc}"[:300])
            return "error"

    async def _settle(self, message: dict[str, Any], outcome: str, receive_count: int, earlier: int, *,
                      reason: str | None = None, deadline_s: float | None = None) -> None:
        self.counters.add(outcome)
        action = decide(outcome, receive_count, self.settings, max_receive_count=self.queue.max_receive_count,
                        earlier_receives=earlier, has_dead_letter_queue=self.queue.dead_letter_arn is not None,
                        policy=self.retry_policy)
        await self.sqs_queue.settle(message, action, outcome, receive_count + earlier, reason=reason,
                                    deadline_s=deadline_s)

    async def _release(self, message: dict[str, Any]) -> None:
        """Hand an unfinished message back at shutdown: visible now, or a fresh copy on its last receive.
        Runs on cancel paths, so bounded by the shutdown deadline."""
        await self._settle(message, "released", _receive_count(message), _earlier_receives(message),
                           deadline_s=self.sqs_queue.retry.shutdown_deadline_s)


@contextlib.contextmanager
def _signal_handlers(on_first: Callable[[], None]) -> Iterator[None]:
    """SIGTERM/SIGINT: the first calls ``on_first`` (which only sets an event); a second exits at once.

    Removed on exit, so a caller's loop (tests, an embedding program) gets its own handling back.
    """
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        name = signal.Signals(signum).name
        if signals_seen > 1:
            log.warning("second signal: exiting at once", signal=name)
            os._exit(128 + signum)
        log.info("signal received: shutting down", signal=name)
        on_first()

    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no Unix signals
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _readiness_checks(rt: Runtime, sqs: Any, queue_url: str) -> dict[str, Any]:
    head = head_revision()

    async def database() -> tuple[bool, str]:
        async with rt.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            version = await raw.driver_connection.fetchval("SELECT version_num FROM alembic_version")  # type: ignore[union-attr]
        return (version == head, "ok" if version == head else f"schema at {version}, expected {head}")

    async def queue() -> tuple[bool, str]:
        await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
        return True, "ok"

    return {"database": database, "queue": queue}


async def open_scheduler(settings: Settings, rt: Runtime, sqs: Any, queue_url: str,
                         stack: contextlib.AsyncExitStack, **options: Any) -> Scheduler:
    """`run`'s scheduler on the runtime's client and Get* limiter, with its Start* limiter (closed with
    ``stack``), putting sweep notifications on ``queue_url``; ``options`` go to :class:`Scheduler`."""
    start_limiter = await open_start_limiter(settings, stack, rt.client.meta.region_name)

    async def enqueue(body: str) -> None:
        await sqs.send_message(QueueUrl=queue_url, MessageBody=body)

    return Scheduler(settings, SchedulerStore(settings.asyncpg_dsn), rt.client, rt.fetcher, start_limiter, enqueue,
                     **options)


async def run_service(settings: Settings, *, exit_when_idle: bool = False,
                      ready: Callable[[SqsWorker], None] | None = None) -> int:
    """The `run` command."""
    if not settings.queue_url:
        raise ConfigError("QUEUE_URL is not set")
    worker: SqsWorker | None = None
    stop_early = False

    def stop() -> None:
        nonlocal stop_early
        stop_early = True
        if worker is not None:
            worker.request_stop()

    # Installed before start-up, so a SIGTERM during it is a clean stop too.
    with _signal_handlers(stop):
        session = get_session()
        async with contextlib.AsyncExitStack() as stack:
            rt = await stack.enter_async_context(open_runtime(settings))
            sqs = await stack.enter_async_context(session.create_client("sqs", region_name=settings.aws_region))
            queue = await describe_queue(sqs, settings.queue_url)
            scheduler = await open_scheduler(settings, rt, sqs, queue.url, stack)
            health = HealthServer(port=settings.health_port, live_within_s=settings.poll_wait_s + 60.0,
                                  ready_checks=_readiness_checks(rt, sqs, settings.queue_url), watchdog=rt.watchdog)
            await health.start()
            try:
                worker = SqsWorker(settings, rt, sqs, queue, health=health, scheduler=scheduler)
                health.ready_checks["credentials"] = worker.credentials.readiness
                if stop_early:
                    worker.request_stop()
                log.info("worker started", queue_url=settings.queue_url,
                         max_concurrent_jobs=settings.max_concurrent_jobs,
                         rekognition_tps=settings.rekognition_tps, health_port=health.bound_port)
                if ready is not None:
                    ready(worker)
                retention = (asyncio.create_task(retention_loop(rt.engine, settings, worker.stopping),
                                                 name="retention") if settings.retention_days is not None else None)
                events = asyncio.create_task(run_publisher(settings, worker.stopping), name="events")
                sweep = asyncio.create_task(sweep_loop(rt.engine, settings.stale_sweep_interval_s, worker.stopping),
                                            name="stale-sweep")
                try:
                    code = await worker.run(exit_when_idle=exit_when_idle)
                finally:
                    # A pass in progress rolls back its current transaction and releases its job's lock; a
                    # publishing round in progress rolls back, its events stay pending for the next replica.
                    for task in (retention, sweep, events):
                        if task is not None:
                            task.cancel()
                    await asyncio.gather(*(t for t in (retention, sweep, events) if t is not None),
                                         return_exceptions=True)
                # Idle means delivered too: what is pending goes out now (bounded), or the exit says it did not.
                return await flush_before_exit(settings, code) if exit_when_idle else code
            finally:
                await health.stop()
