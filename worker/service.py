"""The SQS worker: completion notifications in, jobs ingested, nothing lost, clean shutdown.

Lifecycle (after saq and arq): signal handlers only set an event; the poll loop asks SQS for no
more messages than there are free job slots; each message runs in its own task with a visibility
heartbeat; on stop, polling ends first (an in-flight receive is allowed to finish and whatever it
returns is released), running jobs get SHUTDOWN_GRACE_S to finish, and the rest are cancelled and
their messages released (visibility 0) so another replica picks them up at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from worker import metrics
from worker.config import Settings
from worker.db.migrate import head_revision
from worker.errors import ConfigError, InvalidInput
from worker.health import HealthServer
from worker.ingest import JobOutcome
from worker.logs import get_logger
from worker.messages import JobRef, parse_message_body
from worker.runtime import Runtime, open_runtime

log = get_logger(__name__)

MAX_VISIBILITY_S = 12 * 60 * 60  # SQS's ceiling for a visibility timeout
MAX_SEND_DELAY_S = 900  # SQS's ceiling for DelaySeconds


def retry_delay_s(receive_count: int, *, base_s: int, cap_s: int) -> int:
    """Visibility delay before the next try: doubles with each receive, capped."""
    exponent = max(0, min(receive_count - 1, 20))
    return int(min(cap_s, base_s * (2 ** exponent), MAX_VISIBILITY_S))


@dataclass(frozen=True, slots=True)
class Action:
    """What to do with a message after its job ran."""

    kind: str  # "delete", "retry" (visibility delay), "release" (visible now, toward the DLQ)
    delay_s: int = 0


def decide(outcome: str, receive_count: int, settings: Settings) -> Action:
    """Pure: a job outcome and the message's receive count -> the message's fate."""
    if outcome in ("ingested", "duplicate", "failed"):
        return Action("delete")
    if outcome == "not_ready":
        return Action("retry", retry_delay_s(receive_count, base_s=settings.not_ready_delay_s,
                                             cap_s=settings.not_ready_max_delay_s))
    if outcome == "busy":
        # Another worker is writing this job; by the time this copy returns it will be a duplicate.
        return Action("retry", retry_delay_s(receive_count, base_s=5, cap_s=120))
    if outcome == "transient":
        return Action("retry", retry_delay_s(receive_count, base_s=10, cap_s=900))
    return Action("release")


@dataclass
class QueueInfo:
    url: str
    max_receive_count: int | None = None
    dead_letter_arn: str | None = None


@dataclass
class Counters:
    received: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)

    def add(self, outcome: str) -> None:
        self.by_outcome[outcome] = self.by_outcome.get(outcome, 0) + 1
        metrics.MESSAGES.labels(outcome).inc()


class SqsWorker:
    """Consumes completion notifications from one queue with bounded concurrency."""

    def __init__(self, settings: Settings, runtime: Runtime, sqs: Any, queue: QueueInfo, *,
                 health: HealthServer | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if settings.heartbeat_interval_s >= settings.visibility_timeout_s:
            raise ConfigError("HEARTBEAT_INTERVAL_S must be shorter than VISIBILITY_TIMEOUT_S")
        self.settings = settings
        self.rt = runtime
        self.sqs = sqs
        self.queue = queue
        self.health = health
        self._clock = clock
        self.stopping = asyncio.Event()
        self._in_flight: dict[asyncio.Task[None], dict[str, Any]] = {}
        self._slot_freed = asyncio.Event()
        self.counters = Counters()

    # --- lifecycle -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Idempotent; the first call starts the graceful shutdown."""
        if not self.stopping.is_set():
            log.info("shutdown requested: no new messages will be taken")
            self.stopping.set()

    async def run(self, *, exit_when_idle: bool = False) -> int:
        started = self._clock()
        try:
            await self._poll_loop(exit_when_idle)
        finally:
            await self._drain()
            c = self.counters
            log.info("worker stopped", received=c.received, outcomes=c.by_outcome,
                     uptime_s=round(self._clock() - started, 1))
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
            )
        except (ClientError, BotoCoreError, OSError) as exc:
            log.warning("receive failed; retrying", error=str(exc)[:300])
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=2.0)
            return []
        messages: list[dict[str, Any]] = resp.get("Messages", [])
        self.counters.received += len(messages)
        now_ms = time.time() * 1000
        sent = [int(m.get("Attributes", {}).get("SentTimestamp", now_ms)) for m in messages]
        if sent:
            metrics.OLDEST_MESSAGE_AGE.set(max(0.0, (now_ms - min(sent)) / 1000))
        return messages

    async def _queue_is_empty(self) -> bool:
        try:
            attrs = (await self.sqs.get_queue_attributes(
                QueueUrl=self.queue.url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                                "ApproximateNumberOfMessagesDelayed"],
            ))["Attributes"]
        except (ClientError, BotoCoreError, OSError) as exc:
            log.warning("queue attributes unavailable", error=str(exc)[:300])
            return False
        return all(int(v) == 0 for v in attrs.values())

    def _start(self, message: dict[str, Any]) -> None:
        task = asyncio.create_task(self._handle(message))
        self._in_flight[task] = message
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
        log.info("waiting for running jobs", jobs=len(tasks), grace_s=self.settings.shutdown_grace_s)
        done, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_s)
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
        receive_count = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
        structlog.contextvars.bind_contextvars(message_id=message.get("MessageId"), receive_count=receive_count)
        try:
            try:
                ref = parse_message_body(message.get("Body") or b"")
            except InvalidInput as exc:
                await self._poison(message, receive_count, str(exc))
                return
            structlog.contextvars.bind_contextvars(job_id=ref.job_id, api=ref.api.value)
            if ref.notified_status in ("FAILED", "ERROR"):
                reason = f"completion notification reported Status={ref.notified_status}"
                await self.rt.store.record_failure(ref, code=f"Notification{ref.notified_status.title()}",
                                                   reason=reason, rekognition_failed=True)
                self.counters.add("failed")
                log.info("job finished", outcome="failed", reason=reason)
                await self._delete(message)
                return
            outcome = await self._ingest_with_heartbeat(ref, message)
            await self._settle(message, receive_count, outcome)
        except asyncio.CancelledError:
            # Shutdown deadline: the job's transaction rolled back; let another replica take it now.
            await asyncio.shield(self._set_visibility(message, 0, "released at shutdown"))
            self.counters.add("released")
            raise
        except Exception as exc:
            # The database was unreachable while recording, or similar: retry the message later.
            log.error("message handling failed; it will be retried", error=f"{type(exc).__name__}: {exc}"[:500])
            self.counters.add("error")
            await self._set_visibility(message, retry_delay_s(receive_count, base_s=10, cap_s=900), "error")
        finally:
            structlog.contextvars.unbind_contextvars("message_id", "receive_count", "job_id", "api")

    async def _ingest_with_heartbeat(self, ref: JobRef, message: dict[str, Any]) -> JobOutcome:
        heartbeat = asyncio.create_task(self._heartbeat(message))
        try:
            return await self.rt.ingestor.ingest(ref, skip_if_ingested_since_ms=ref.notified_at_ms)
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)

    async def _heartbeat(self, message: dict[str, Any]) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            try:
                await self.sqs.change_message_visibility(
                    QueueUrl=self.queue.url, ReceiptHandle=message["ReceiptHandle"],
                    VisibilityTimeout=self.settings.visibility_timeout_s,
                )
            except (ClientError, BotoCoreError, OSError) as exc:
                metrics.HEARTBEAT_FAILURES.inc()
                log.warning("visibility extension failed", error=str(exc)[:300])

    async def _settle(self, message: dict[str, Any], receive_count: int, outcome: JobOutcome) -> None:
        self.counters.add(outcome.outcome)
        action = decide(outcome.outcome, receive_count, self.settings)
        if action.kind == "delete":
            await self._delete(message)
        elif action.kind == "retry":
            last_life = self.queue.max_receive_count is not None and receive_count >= self.queue.max_receive_count
            if outcome.outcome == "not_ready" and last_life:
                # The next receive would move a healthy-but-slow job to the DLQ: requeue a fresh copy.
                await self._requeue(message, action.delay_s)
            else:
                await self._set_visibility(message, action.delay_s, outcome.outcome)
        else:
            await self._set_visibility(message, 0, outcome.outcome)

    async def _poison(self, message: dict[str, Any], receive_count: int, reason: str) -> None:
        self.counters.add("invalid")
        if self.queue.dead_letter_arn:
            log.warning("unusable message: returning it so the redrive policy moves it to the DLQ",
                        reason=reason, dead_letter_queue=self.queue.dead_letter_arn)
            await self._set_visibility(message, 0, "invalid")
        else:
            # Never deleted unseen; without a DLQ, back off so it does not spin.
            delay = retry_delay_s(receive_count, base_s=60, cap_s=MAX_VISIBILITY_S)
            log.error("unusable message and the queue has no dead-letter queue: it stays in the queue",
                      reason=reason, retry_in_s=delay)
            await self._set_visibility(message, delay, "invalid")

    async def _delete(self, message: dict[str, Any]) -> None:
        try:
            await self.sqs.delete_message(QueueUrl=self.queue.url, ReceiptHandle=message["ReceiptHandle"])
        except (ClientError, BotoCoreError, OSError) as exc:
            # The rows are committed; a redelivery will be recognised as a duplicate.
            log.warning("delete failed; the message may be delivered again", error=str(exc)[:300])

    async def _set_visibility(self, message: dict[str, Any], timeout_s: int, why: str) -> None:
        try:
            await self.sqs.change_message_visibility(
                QueueUrl=self.queue.url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=int(timeout_s),
            )
            log.info("message returned to the queue", why=why, visible_in_s=int(timeout_s))
        except (ClientError, BotoCoreError, OSError) as exc:
            log.warning("visibility change failed; the message returns when its timeout lapses",
                        why=why, error=str(exc)[:300])

    async def _requeue(self, message: dict[str, Any], delay_s: int) -> None:
        try:
            await self.sqs.send_message(QueueUrl=self.queue.url, MessageBody=message["Body"],
                                        DelaySeconds=min(delay_s, MAX_SEND_DELAY_S))
        except (ClientError, BotoCoreError, OSError) as exc:
            log.warning("requeue failed; using a visibility delay instead", error=str(exc)[:300])
            await self._set_visibility(message, delay_s, "not_ready")
            return
        log.info("job not ready on the message's last delivery: requeued a fresh copy", delay_s=delay_s)
        await self._delete(message)


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


def _install_signal_handlers(worker: SqsWorker) -> None:
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second signal: exiting at once", signal=signal.Signals(signum).name)
            os._exit(1)
        worker.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


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
    session = get_session()
    async with open_runtime(settings) as rt, session.create_client("sqs", region_name=settings.aws_region) as sqs:
        queue = await describe_queue(sqs, settings.queue_url)
        health = HealthServer(port=settings.health_port, live_within_s=settings.poll_wait_s + 60.0,
                              ready_checks=_readiness_checks(rt, sqs, settings.queue_url))
        await health.start()
        worker = SqsWorker(settings, rt, sqs, queue, health=health)
        _install_signal_handlers(worker)
        log.info("worker started", queue_url=settings.queue_url, max_concurrent_jobs=settings.max_concurrent_jobs,
                 rekognition_tps=settings.rekognition_tps, health_port=health.bound_port)
        if ready is not None:
            ready(worker)
        try:
            return await worker.run(exit_when_idle=exit_when_idle)
        finally:
            await health.stop()
