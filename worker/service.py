"""The SQS worker: completion notifications in, jobs ingested, nothing lost, clean shutdown.

Lifecycle (after saq and arq): signal handlers only set an event; the poll loop asks SQS for no
more messages than there are free job slots; each message runs in its own task with a visibility
heartbeat; on stop, polling ends first (an in-flight receive is allowed to finish and whatever it
returns is released), running jobs get what is left of SHUTDOWN_GRACE_S (counted from the stop
request) to finish, and the rest are cancelled and their messages released (visibility 0) so
another replica picks them up at once.

A message's fate is decided by the pure :func:`decide`. Only unusable messages ever reach the
dead-letter queue: a job that is merely not ready yet, or held up by an outage, is sent again as a
fresh copy on the delivery the redrive policy would count as its last.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from worker import metrics
from worker.config import Settings
from worker.db.migrate import head_revision
from worker.errors import ConfigError, InvalidInput, WorkerError
from worker.health import HealthServer
from worker.ingest import JobOutcome
from worker.logs import get_logger
from worker.messages import JobRef, parse_message_body
from worker.normalize import JobMeta, parse_meta
from worker.runtime import Runtime, open_runtime

log = get_logger(__name__)

MAX_VISIBILITY_S = 12 * 60 * 60  # SQS's ceiling for a visibility timeout
MAX_SEND_DELAY_S = 900  # SQS's ceiling for DelaySeconds
MAX_MESSAGE_ATTRIBUTES = 10  # SQS's ceiling per message
# Carried by a requeued copy: deliveries of the earlier copies, so its backoff keeps growing.
EARLIER_RECEIVES_ATTRIBUTE = "IngestEarlierReceives"
_SQS_ERRORS = (ClientError, BotoCoreError, OSError)

# Outcomes that are worth another try later; "error" (an unexpected exception) is retried too,
# but without a fresh copy, so a message that keeps crashing the handler ends in the DLQ.
RETRY_OUTCOMES = frozenset({"not_ready", "busy", "transient"})
DONE_OUTCOMES = frozenset({"ingested", "duplicate", "failed"})


def retry_delay_s(receive_count: int, *, base_s: int, cap_s: int) -> int:
    """Visibility delay before the next try: doubles with each receive, capped."""
    exponent = max(0, min(receive_count - 1, 20))
    return int(min(cap_s, base_s * (2 ** exponent), MAX_VISIBILITY_S))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff bases and caps (seconds) of the outcomes retried later; not_ready's come from Settings."""

    busy_base_s: int = 5  # another writer holds the job: it is a duplicate by the time this copy returns
    busy_cap_s: int = 120
    transient_base_s: int = 10
    transient_cap_s: int = 900
    # An unusable message on a queue without a dead-letter queue is kept, visible again this rarely.
    unusable_base_s: int = 60


DEFAULT_RETRY_POLICY = RetryPolicy()


@dataclass(frozen=True, slots=True)
class Action:
    """What to do with a message after its job ran.

    ``kind``: "delete"; "retry" (visible again after ``delay_s``); "requeue" (send a fresh copy delayed by
    ``delay_s``, then delete this one); "dead_letter" (visible now, so the redrive policy moves it to the
    DLQ); "keep" (unusable but there is no DLQ: visible again after ``delay_s``, never deleted).
    """

    kind: str
    delay_s: int = 0


def decide(outcome: str, receive_count: int, settings: Settings, *, max_receive_count: int | None = None,
           earlier_receives: int = 0, has_dead_letter_queue: bool = True,
           policy: RetryPolicy = DEFAULT_RETRY_POLICY) -> Action:
    """Pure: a job outcome and the message's delivery history -> the message's fate."""
    attempt = receive_count + max(0, earlier_receives)
    if outcome in DONE_OUTCOMES:
        return Action("delete")
    if outcome == "invalid":
        if has_dead_letter_queue:
            return Action("dead_letter")
        return Action("keep", retry_delay_s(attempt, base_s=policy.unusable_base_s, cap_s=MAX_VISIBILITY_S))
    if outcome == "not_ready":
        delay = retry_delay_s(attempt, base_s=settings.not_ready_delay_s, cap_s=settings.not_ready_max_delay_s)
    elif outcome == "busy":
        delay = retry_delay_s(attempt, base_s=policy.busy_base_s, cap_s=policy.busy_cap_s)
    else:  # transient, error, or an outcome this worker does not know
        delay = retry_delay_s(attempt, base_s=policy.transient_base_s, cap_s=policy.transient_cap_s)
    last_life = max_receive_count is not None and receive_count >= max_receive_count
    if outcome in RETRY_OUTCOMES and last_life:
        # The next receive would move a good message to the DLQ: send a fresh copy instead.
        return Action("requeue", min(delay, MAX_SEND_DELAY_S))
    return Action("retry", delay)


@dataclass
class QueueInfo:
    url: str
    max_receive_count: int | None = None
    dead_letter_arn: str | None = None


@dataclass
class Counters:
    """What this worker did since it started (tests and the closing summary line read it)."""

    received: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)
    visibility_extensions: int = 0
    visibility_extension_failures: int = 0
    peak_in_flight: int = 0

    def add(self, outcome: str) -> None:
        self.by_outcome[outcome] = self.by_outcome.get(outcome, 0) + 1
        metrics.MESSAGES.labels(outcome).inc()


def _receive_count(message: dict[str, Any]) -> int:
    try:
        return max(1, int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1")))
    except (TypeError, ValueError):
        return 1


def _earlier_receives(message: dict[str, Any]) -> int:
    raw = message.get("MessageAttributes", {}).get(EARLIER_RECEIVES_ATTRIBUTE, {}).get("StringValue")
    try:
        return min(max(0, int(raw)), 1000) if raw is not None else 0
    except (TypeError, ValueError):
        return 0


def _is_transient_exception(exc: BaseException) -> bool:
    """The database (or the network) is unreachable: worth retrying, not the message's fault."""
    module = type(exc).__module__ or ""
    return isinstance(exc, OSError) or module.startswith(("asyncpg", "sqlalchemy"))


class SqsWorker:
    """Consumes completion notifications from one queue with bounded concurrency."""

    def __init__(self, settings: Settings, runtime: Runtime, sqs: Any, queue: QueueInfo, *,
                 health: HealthServer | None = None, clock: Callable[[], float] = time.monotonic,
                 retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY) -> None:
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

    async def run(self, *, exit_when_idle: bool = False) -> int:
        started = self._clock()
        try:
            await self._poll_loop(exit_when_idle)
        finally:
            await self._drain()
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
            free = self.settings.max_concurrent_jobs - len(self._in_flight)
            if free <= 0:
                await self._wait_for_slot()
                continue
            messages = await self._receive(min(10, free))
            if self.stopping.is_set():
                # Received while stopping: hand them straight back rather than start them.
                await asyncio.gather(*(self._set_visibility(m, 0, "released at shutdown") for m in messages))
                for _ in messages:
                    self.counters.add("released")
                break
            for message in messages:
                self._start(message)
            if not messages and exit_when_idle and not self._in_flight and await self._queue_is_empty():
                log.info("queue is empty and nothing is in flight: exiting")
                break

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

    async def _receive(self, max_messages: int) -> list[dict[str, Any]]:
        try:
            resp = await self.sqs.receive_message(
                QueueUrl=self.queue.url,
                MaxNumberOfMessages=max_messages,
                WaitTimeSeconds=self.settings.poll_wait_s,
                VisibilityTimeout=self.settings.visibility_timeout_s,
                MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
                MessageAttributeNames=["All"],
            )
        except _SQS_ERRORS as exc:
            log.warning("receive failed; retrying", error=str(exc)[:300])
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=2.0)
            return []
        messages: list[dict[str, Any]] = resp.get("Messages", [])
        self.counters.received += len(messages)
        now_ms = time.time() * 1000
        sent = [int(m.get("Attributes", {}).get("SentTimestamp", now_ms)) for m in messages]
        # An empty receive means nothing is waiting: a stale age would keep an alert firing.
        metrics.OLDEST_MESSAGE_AGE.set(max(0.0, (now_ms - min(sent)) / 1000) if sent else 0.0)
        return messages

    async def _queue_is_empty(self) -> bool:
        try:
            attrs = (await self.sqs.get_queue_attributes(
                QueueUrl=self.queue.url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                                "ApproximateNumberOfMessagesDelayed"],
            ))["Attributes"]
        except _SQS_ERRORS as exc:
            log.warning("queue attributes unavailable", error=str(exc)[:300])
            return False
        return all(int(v) == 0 for v in attrs.values())

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
            await asyncio.wait(pending, timeout=10.0)
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
            try:
                ref = parse_message_body(message.get("Body") or "")
            except InvalidInput as exc:
                await self._settle(message, "invalid", receive_count, earlier, reason=str(exc))
                return
            structlog.contextvars.bind_contextvars(job_id=ref.job_id, api=ref.api.value)
            if ref.job_id in self._jobs_in_flight:
                # Another copy of this notification is running here: by the time this one returns it is
                # a duplicate. Settled without a Get* call, which would only find the job's lock taken.
                reason = "another copy of this job is running in this worker"
                metrics.JOBS.labels(ref.api.value, "busy").inc()
                log.info("job finished", outcome="busy", pages=0, rows=0, seconds=0.0, reason=reason)
                await self._settle(message, "busy", receive_count, earlier, reason=reason)
                return
            self._jobs_in_flight.add(ref.job_id)
            try:
                async with self._heartbeat(message):
                    if ref.notified_status in ("FAILED", "ERROR"):
                        outcome = await self._record_notified_failure(ref)
                    else:
                        outcome = await self.rt.ingestor.ingest(ref, skip_if_ingested_since_ms=ref.notified_at_ms)
            finally:
                self._jobs_in_flight.discard(ref.job_id)
                # The ingestor unbinds job_id and api when it returns; this message's lines still need them.
                structlog.contextvars.bind_contextvars(job_id=ref.job_id, api=ref.api.value)
            await self._settle(message, outcome.outcome, receive_count, earlier, reason=outcome.reason)
        except asyncio.CancelledError:
            # Shutdown deadline: the job's transaction rolled back; let another replica take it now.
            await asyncio.shield(self._set_visibility(message, 0, "released at shutdown"))
            self.counters.add("released")
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
            structlog.contextvars.unbind_contextvars("message_id", "receive_count", "earlier_receives", "job_id", "api")

    async def _count_failure(self, ref: JobRef, exc: Exception) -> str:
        """The outcome of an unexpected error once counted toward MAX_IDENTICAL_FAILURES ("error" or "failed")."""
        try:
            return (await self.rt.ingestor.count_failure(ref, exc)).outcome
        except Exception as count_exc:  # counting is best effort here: the message is retried regardless
            log.warning("could not count the failure", error=f"{type(count_exc).__name__}: {count_exc}"[:300])
            return "error"

    async def _record_notified_failure(self, ref: JobRef) -> JobOutcome:
        """Status FAILED or ERROR in the notification: record the job as failed, with Rekognition's reason."""
        started = self._clock()
        meta = await self._failed_job_meta(ref)
        if meta is not None and meta.status_message:
            code, reason = "JobFailed", meta.status_message
        else:
            code = f"Notification{(ref.notified_status or 'FAILED').title()}"
            reason = f"completion notification reported Status={ref.notified_status}"
        await self.rt.store.record_failure(ref, code=code, reason=reason, meta=meta, rekognition_failed=True)
        outcome = JobOutcome(ref.job_id, ref.api.value, "failed", reason=reason,
                             seconds=round(self._clock() - started, 3))
        metrics.JOBS.labels(ref.api.value, "failed").inc()
        log.info("job finished", outcome="failed", pages=0, rows=0, seconds=outcome.seconds, reason=reason)
        return outcome

    async def _failed_job_meta(self, ref: JobRef) -> JobMeta | None:
        """Best effort: the failed job's StatusMessage and video, which the notification does not carry."""
        try:
            meta = parse_meta(await self.rt.fetcher.fetch(ref.api, ref.job_id, None))
        except (WorkerError, ValueError) as exc:  # ValueError: a 200 answer whose body is not JSON
            log.warning("could not read the failed job's status from Rekognition; recording the notification's",
                        error=str(exc)[:300])
            return None
        return meta if meta.job_status == "FAILED" else None

    @contextlib.asynccontextmanager
    async def _heartbeat(self, message: dict[str, Any]) -> AsyncIterator[None]:
        """Keep the message invisible while the block runs, so a long job is not delivered again mid-way."""
        task = asyncio.create_task(self._extend_visibility(message))
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _extend_visibility(self, message: dict[str, Any]) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            try:
                await self.sqs.change_message_visibility(
                    QueueUrl=self.queue.url, ReceiptHandle=message["ReceiptHandle"],
                    VisibilityTimeout=self.settings.visibility_timeout_s,
                )
            except _SQS_ERRORS as exc:
                self.counters.visibility_extension_failures += 1
                metrics.HEARTBEAT_FAILURES.inc()
                log.warning("visibility extension failed; the message may be delivered again before the job ends",
                            error=str(exc)[:300])
            else:
                self.counters.visibility_extensions += 1
                log.debug("visibility extended", visibility_timeout_s=self.settings.visibility_timeout_s)

    async def _settle(self, message: dict[str, Any], outcome: str, receive_count: int, earlier: int, *,
                      reason: str | None = None) -> None:
        self.counters.add(outcome)
        action = decide(outcome, receive_count, self.settings, max_receive_count=self.queue.max_receive_count,
                        earlier_receives=earlier, has_dead_letter_queue=self.queue.dead_letter_arn is not None,
                        policy=self.retry_policy)
        if action.kind == "delete":
            await self._delete(message)
        elif action.kind == "requeue":
            await self._requeue(message, action.delay_s, receive_count + earlier, outcome)
        elif action.kind == "dead_letter":
            log.warning("unusable message: made visible again so the queue's redrive policy moves it to the "
                        "dead-letter queue", reason=reason, body_excerpt=_excerpt(message),
                        dead_letter_queue=self.queue.dead_letter_arn)
            await self._set_visibility(message, 0, outcome)
        elif action.kind == "keep":
            # Never deleted unseen; without a DLQ, back off so it does not spin.
            log.error("unusable message and the queue has no dead-letter queue: it stays in the queue",
                      reason=reason, body_excerpt=_excerpt(message), retry_in_s=action.delay_s)
            await self._set_visibility(message, action.delay_s, outcome)
        else:
            await self._set_visibility(message, action.delay_s, outcome)

    async def _delete(self, message: dict[str, Any]) -> None:
        try:
            await self.sqs.delete_message(QueueUrl=self.queue.url, ReceiptHandle=message["ReceiptHandle"])
        except _SQS_ERRORS as exc:
            # The rows are committed; a redelivery will be recognised as a duplicate.
            log.warning("delete failed; the message may be delivered again", error=str(exc)[:300])

    async def _set_visibility(self, message: dict[str, Any], timeout_s: int, why: str) -> None:
        timeout_s = min(max(0, int(timeout_s)), MAX_VISIBILITY_S)
        try:
            await self.sqs.change_message_visibility(
                QueueUrl=self.queue.url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=timeout_s,
            )
            log.info("message returned to the queue", why=why, visible_in_s=timeout_s)
        except _SQS_ERRORS as exc:
            log.warning("visibility change failed; the message returns when its timeout lapses",
                        why=why, error=str(exc)[:300])

    async def _requeue(self, message: dict[str, Any], delay_s: int, receives: int, why: str) -> None:
        attributes = {
            name: {k: v for k, v in value.items() if k in ("DataType", "StringValue", "BinaryValue")}
            for name, value in message.get("MessageAttributes", {}).items() if name != EARLIER_RECEIVES_ATTRIBUTE
        }
        if len(attributes) < MAX_MESSAGE_ATTRIBUTES:
            attributes[EARLIER_RECEIVES_ATTRIBUTE] = {"DataType": "Number", "StringValue": str(receives)}
        try:
            sent = await self.sqs.send_message(QueueUrl=self.queue.url, MessageBody=message["Body"],
                                               DelaySeconds=min(delay_s, MAX_SEND_DELAY_S),
                                               MessageAttributes=attributes)
        except _SQS_ERRORS as exc:
            log.warning("requeue failed; using a visibility delay instead", error=str(exc)[:300])
            await self._set_visibility(message, delay_s, why)
            return
        log.info("last delivery before the dead-letter queue: requeued a fresh copy", why=why,
                 visible_in_s=min(delay_s, MAX_SEND_DELAY_S), new_message_id=sent.get("MessageId"))
        await self._delete(message)


def _excerpt(message: dict[str, Any], limit: int = 120) -> str:
    body = message.get("Body") or ""
    return body if len(body) <= limit else body[:limit] + "..."


async def describe_queue(sqs: Any, queue_url: str) -> QueueInfo:
    attrs = (await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["RedrivePolicy"]))
    policy_raw = attrs.get("Attributes", {}).get("RedrivePolicy")
    info = QueueInfo(url=queue_url)
    if policy_raw:
        policy = orjson.loads(policy_raw)
        info.max_receive_count = int(policy.get("maxReceiveCount", 0)) or None
        info.dead_letter_arn = policy.get("deadLetterTargetArn")
    else:
        log.warning("queue has no redrive policy: unusable messages cannot reach a dead-letter queue")
    return info


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
        async with open_runtime(settings) as rt, session.create_client("sqs", region_name=settings.aws_region) as sqs:
            queue = await describe_queue(sqs, settings.queue_url)
            health = HealthServer(port=settings.health_port, live_within_s=settings.poll_wait_s + 60.0,
                                  ready_checks=_readiness_checks(rt, sqs, settings.queue_url))
            await health.start()
            try:
                worker = SqsWorker(settings, rt, sqs, queue, health=health)
                if stop_early:
                    worker.request_stop()
                log.info("worker started", queue_url=settings.queue_url,
                         max_concurrent_jobs=settings.max_concurrent_jobs,
                         rekognition_tps=settings.rekognition_tps, health_port=health.bound_port)
                if ready is not None:
                    ready(worker)
                return await worker.run(exit_when_idle=exit_when_idle)
            finally:
                await health.stop()
