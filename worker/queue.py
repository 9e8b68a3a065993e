"""What happens to one SQS message: receive, heartbeat, settle (delete, retry, requeue, dead-letter), and the
pure :func:`decide` that picks a message's fate.

Only unusable messages ever reach the dead-letter queue: a job that is merely not ready yet, or held up by
an outage, is sent again as a fresh copy on the delivery the redrive policy would count as its last. That
requeue (send the copy, then delete the original) retries both calls; while it cannot finish, the original
is held invisible for as long as SQS allows and the requeue goes on in the background; and once started it
finishes even when shutdown cancels its job (within a deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from worker import logsafe, metrics
from worker.config import Settings
from worker.errors import aws_error
from worker.logs import get_logger
from worker.ratelimit import Sleep, full_jitter_backoff_s

log = get_logger(__name__)

MAX_VISIBILITY_S = 12 * 60 * 60  # SQS's ceiling for a visibility timeout
MAX_SEND_DELAY_S = 900  # SQS's ceiling for DelaySeconds
MAX_MESSAGE_ATTRIBUTES = 10  # SQS's ceiling per message
# Carried by a requeued copy: deliveries of the earlier copies, so its backoff keeps growing.
EARLIER_RECEIVES_ATTRIBUTE = "IngestEarlierReceives"
SQS_ERRORS = (ClientError, BotoCoreError, OSError)
# Answers that no retry changes: the message (its receipt handle) or the whole queue is gone.
GONE_CODES = frozenset({"ReceiptHandleIsInvalid", "QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue"})
# Stamped on each received message: when this worker received it (its clock), which bounds how long it can
# be held invisible (SQS counts the 12 h from the receive).
RECEIVED_AT = "_IngestReceivedAt"
HOLD_MARGIN_S = 60
# A copy counts as pending this long past its delay, so that the receive which takes it has happened.
OWN_COPY_MARGIN_S = 2.0

# Outcomes that are worth another try later; "error" (an unexpected exception) is retried too,
# but without a fresh copy, so a message that keeps crashing the handler ends in the DLQ. "released":
# handed back unfinished at shutdown, for another replica to take at once.
# "waiting": a start request of `submit` while submissions are open (it comes back, and never dead-letters).
# "blocked": the same, while this replica cannot start any submission (no notification channel): it comes back
# rarely, since nothing changes until the deployment's settings do.
RETRY_OUTCOMES = frozenset({"not_ready", "busy", "transient", "released", "waiting", "blocked"})
# "other_api": a notification of another Rekognition API, dropped because OTHER_API_NOTIFICATIONS=delete.
# "submissions_done": a start request once no submission is open. "tombstoned": a notification of a job that
# was deleted or expired (worker/tombstones.py), settled without ingesting it.
DONE_OUTCOMES = frozenset({"ingested", "duplicate", "failed", "other_api", "submissions_done", "tombstoned"})


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
    # A start request comes back this often while submissions are open: hidden, it still counts for the
    # autoscaler (in flight), and once none is open the next receive deletes it.
    waiting_s: int = 5
    # ... and this often while no submission can start (the settings must change first): one request waits
    # without churning the queue; it still counts for the autoscaler (in flight), and the alert fires meanwhile.
    blocked_s: int = 900


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
    elif outcome == "released":
        delay = 0
    elif outcome == "waiting":
        delay = policy.waiting_s
    elif outcome == "blocked":
        delay = policy.blocked_s
    else:  # transient, error, or an outcome this worker does not know
        delay = retry_delay_s(attempt, base_s=policy.transient_base_s, cap_s=policy.transient_cap_s)
    last_life = max_receive_count is not None and receive_count >= max_receive_count
    if outcome in RETRY_OUTCOMES and last_life:
        # The next receive would move a good message to the DLQ: send a fresh copy instead.
        return Action("requeue", min(delay, MAX_SEND_DELAY_S))
    return Action("retry", delay)


@dataclass(frozen=True, slots=True)
class RequeueRetry:
    """How a requeue (send a fresh copy, then delete the original) retries its two SQS calls."""

    attempts: int = 5  # tries of each call before the original is held and the requeue goes on in the background
    base_s: float = 0.5  # full-jitter backoff between tries
    cap_s: float = 8.0
    background_cap_s: float = 60.0  # backoff cap of the background tries
    # How long a settle cut short by shutdown may still run (below _drain's wait for cancelled jobs).
    shutdown_deadline_s: float = 8.0


DEFAULT_REQUEUE_RETRY = RequeueRetry()


@dataclass
class QueueInfo:
    url: str
    max_receive_count: int | None = None
    dead_letter_arn: str | None = None
    arn: str = ""


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
        if outcome == "tombstoned":
            metrics.TOMBSTONED_NOTIFICATIONS.inc()


def receive_count(message: dict[str, Any]) -> int:
    try:
        return max(1, int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1")))
    except (TypeError, ValueError):
        return 1


def earlier_receives(message: dict[str, Any]) -> int:
    raw = message.get("MessageAttributes", {}).get(EARLIER_RECEIVES_ATTRIBUTE, {}).get("StringValue")
    try:
        return min(max(0, int(raw)), 1000) if raw is not None else 0
    except (TypeError, ValueError):
        return 0


def body_fields(message: dict[str, Any]) -> dict[str, Any]:
    """Log fields that describe a message's body without its text, which may name a video (worker/logsafe.py)."""
    return logsafe.body_fields(message.get("Body") or "")


async def describe_queue(sqs: Any, queue_url: str) -> QueueInfo:
    attrs = (await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn", "RedrivePolicy"]))
    policy_raw = attrs.get("Attributes", {}).get("RedrivePolicy")
    info = QueueInfo(url=queue_url, arn=attrs.get("Attributes", {}).get("QueueArn", ""))
    if policy_raw:
        policy = orjson.loads(policy_raw)
        info.max_receive_count = int(policy.get("maxReceiveCount", 0)) or None
        info.dead_letter_arn = policy.get("deadLetterTargetArn")
    else:
        log.warning("queue has no redrive policy: unusable messages cannot reach a dead-letter queue")
    return info


async def queue_url_from_arn(sqs: Any, arn: str) -> str:
    """The URL of the queue ``arn`` names (a redrive policy names its dead-letter queue by ARN)."""
    parts = arn.split(":")
    if len(parts) != 6 or parts[2] != "sqs":
        raise ValueError(f"not an SQS queue ARN: {arn!r}")
    return str((await sqs.get_queue_url(QueueName=parts[5], QueueOwnerAWSAccountId=parts[4]))["QueueUrl"])


_DEPTH_ATTRIBUTES = {"ApproximateNumberOfMessages": "visible", "ApproximateNumberOfMessagesNotVisible": "in_flight",
                     "ApproximateNumberOfMessagesDelayed": "delayed"}


async def watch_depth(sqs: Any, info: QueueInfo, interval_s: float, stopping: asyncio.Event) -> None:
    """Until ``stopping``: the queue's depth by state and its dead-letter queue's depth into gauges, every
    ``interval_s``. The alerts and the dashboard read them; SQS reports them as approximations."""
    dlq_url: str | None = None
    while not stopping.is_set():
        try:
            attrs = (await sqs.get_queue_attributes(QueueUrl=info.url,
                                                    AttributeNames=list(_DEPTH_ATTRIBUTES)))["Attributes"]
            for name, state in _DEPTH_ATTRIBUTES.items():
                metrics.QUEUE_MESSAGES.labels(state).set(int(attrs.get(name, 0)))
            if info.dead_letter_arn is not None:
                dlq_url = dlq_url or await queue_url_from_arn(sqs, info.dead_letter_arn)
                dlq = (await sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=[
                    "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]))["Attributes"]
                metrics.DLQ_MESSAGES.set(sum(int(v) for v in dlq.values()))
        except (*SQS_ERRORS, ValueError, KeyError) as exc:
            # The gauges keep their last reading: an alert on them stays as it was until SQS answers.
            log.warning("queue depth unavailable", **aws_error(exc))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await stopping.wait()


@dataclass
class _Requeue:
    """One requeue in progress: the original, the copy's SendMessage arguments, and how far it got."""

    message: dict[str, Any]
    send_args: dict[str, Any]
    why: str
    hold_until: float  # this worker's clock: the original cannot be held invisible past it
    copy_id: str | None = None
    held: bool = False


_GONE = object()  # _try's answer when SQS says the message or the queue no longer exists


def _is_gone(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in GONE_CODES


class SqsQueue:
    """The SQS calls made on one queue's messages: receive, keep hidden, delete, hand back, requeue."""

    def __init__(self, sqs: Any, info: QueueInfo, settings: Settings, counters: Counters, *,
                 retry: RequeueRetry = DEFAULT_REQUEUE_RETRY, clock: Callable[[], float] = time.monotonic,
                 sleep: Sleep = asyncio.sleep, rng: random.Random | None = None) -> None:
        self.sqs = sqs
        self.info = info
        self.settings = settings
        self.counters = counters
        self.retry = retry
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._background: set[asyncio.Task[None]] = set()
        # Receipt handles of messages whose settling was cut short by shutdown (and then finished).
        self._cut_short: set[str] = set()
        # When the last copy this worker sent becomes receivable: SQS's counts are approximate (moto computes
        # each attribute at a different instant), so a copy whose delay is just ending can be missing from
        # all of them. The worker knows its own copies, so it does not ask SQS about those.
        self._own_copies_due_at = float("-inf")

    @property
    def held(self) -> int:
        """Requeues going on in the background, their originals held invisible."""
        return len(self._background)

    async def receive(self, max_messages: int, stopping: asyncio.Event) -> list[dict[str, Any]]:
        try:
            resp = await self.sqs.receive_message(
                QueueUrl=self.info.url,
                MaxNumberOfMessages=max_messages,
                WaitTimeSeconds=self.settings.poll_wait_s,
                VisibilityTimeout=self.settings.visibility_timeout_s,
                MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
                MessageAttributeNames=["All"],
            )
        except SQS_ERRORS as exc:
            log.warning("receive failed; retrying", **aws_error(exc))
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(2.0):
                    await stopping.wait()
            return []
        messages: list[dict[str, Any]] = resp.get("Messages", [])
        self.counters.received += len(messages)
        received_at = self._clock()
        for message in messages:
            message[RECEIVED_AT] = received_at
        now_ms = time.time() * 1000
        sent = [int(m.get("Attributes", {}).get("SentTimestamp", now_ms)) for m in messages]
        # An empty receive means nothing is waiting: a stale age would keep an alert firing.
        metrics.OLDEST_MESSAGE_AGE.set(max(0.0, (now_ms - min(sent)) / 1000) if sent else 0.0)
        return messages

    async def is_empty(self) -> bool:
        """Nothing to receive now or later: no requeue of ours is pending and SQS counts no message."""
        if self._background or self._clock() < self._own_copies_due_at + OWN_COPY_MARGIN_S:
            return False
        try:
            attrs = (await self.sqs.get_queue_attributes(
                QueueUrl=self.info.url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                                "ApproximateNumberOfMessagesDelayed"],
            ))["Attributes"]
        except SQS_ERRORS as exc:
            log.warning("queue attributes unavailable", **aws_error(exc))
            return False
        return all(int(v) == 0 for v in attrs.values())

    @contextlib.asynccontextmanager
    async def heartbeat(self, message: dict[str, Any]) -> AsyncIterator[None]:
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
                    QueueUrl=self.info.url, ReceiptHandle=message["ReceiptHandle"],
                    VisibilityTimeout=self.settings.visibility_timeout_s,
                )
            except SQS_ERRORS as exc:
                self.counters.visibility_extension_failures += 1
                metrics.HEARTBEAT_FAILURES.inc()
                log.warning("visibility extension failed; the message may be delivered again before the job ends",
                            **aws_error(exc))
            else:
                self.counters.visibility_extensions += 1
                log.debug("visibility extended", visibility_timeout_s=self.settings.visibility_timeout_s)

    async def settle(self, message: dict[str, Any], action: Action, outcome: str, receives: int, *,
                     reason: str | None = None, deadline_s: float | None = None) -> None:
        """Carry out ``action`` (from :func:`decide`) on ``message``, to the end even if the caller is
        cancelled meanwhile (then within ``RequeueRetry.shutdown_deadline_s``): a requeue stopped between
        its send and its delete would leave the original to the DLQ. ``deadline_s`` bounds the wait when
        the caller is already on a cancel path."""
        step = asyncio.ensure_future(self._apply(message, action, outcome, receives, reason))
        step.add_done_callback(_observe)
        try:
            if deadline_s is None:
                await asyncio.shield(step)
            else:
                await self._finish(step, deadline_s)
        except asyncio.CancelledError:
            self._cut_short.add(message.get("ReceiptHandle", ""))
            await self._finish(step, self.retry.shutdown_deadline_s)
            raise

    def was_cut_short(self, message: dict[str, Any]) -> bool:
        """True (once) if shutdown cancelled this message's settling: it is settled, not to be released."""
        handle = message.get("ReceiptHandle", "")
        if handle in self._cut_short:
            self._cut_short.discard(handle)
            return True
        return False

    async def _finish(self, step: asyncio.Future[Any], deadline_s: float) -> None:
        """Let ``step`` run for at most ``deadline_s`` more (never an unbounded wait on a cancel path)."""
        done, _ = await asyncio.wait({step}, timeout=deadline_s)
        if not done:
            step.cancel()
            log.warning("settling the message did not finish within its deadline; abandoned", deadline_s=deadline_s)

    async def _apply(self, message: dict[str, Any], action: Action, outcome: str, receives: int,
                     reason: str | None) -> None:
        if action.kind == "delete":
            await self.delete(message)
        elif action.kind == "requeue":
            await self.requeue(message, action.delay_s, receives, outcome)
        elif action.kind == "dead_letter":
            log.warning("unusable message: made visible again so the queue's redrive policy moves it to the "
                        "dead-letter queue", reason=reason, **body_fields(message),
                        dead_letter_queue=self.info.dead_letter_arn)
            await self.set_visibility(message, 0, outcome)
        elif action.kind == "keep":
            # Never deleted unseen; without a DLQ, back off so it does not spin.
            log.error("unusable message and the queue has no dead-letter queue: it stays in the queue",
                      reason=reason, **body_fields(message), retry_in_s=action.delay_s)
            await self.set_visibility(message, action.delay_s, outcome)
        else:
            await self.set_visibility(message, action.delay_s, outcome)

    async def delete(self, message: dict[str, Any]) -> bool:
        """Delete, retrying SQS faults; False if the message is still there (it may be delivered again)."""
        answer = await self._try("delete", self._delete_call(message), self.retry.attempts)
        if answer is None or answer is _GONE:
            # The outcome is committed; a redelivery will be recognised as a duplicate.
            log.warning("delete failed; the message may be delivered again")
            return False
        return True

    def _delete_call(self, message: dict[str, Any]) -> Callable[[], Awaitable[Any]]:
        return lambda: self.sqs.delete_message(QueueUrl=self.info.url, ReceiptHandle=message["ReceiptHandle"])

    async def _try(self, what: str, call: Callable[[], Awaitable[Any]], attempts: int,
                   on_failure: Callable[[], Awaitable[None]] | None = None) -> Any:
        """``call()``'s answer, tried up to ``attempts`` times with backoff; None if every try failed,
        ``_GONE`` if SQS says the message or queue no longer exists. ``on_failure`` runs after a failed try."""
        for attempt in range(attempts):
            try:
                return await call()
            except SQS_ERRORS as exc:
                gone = _is_gone(exc)
                log.warning(f"{what} failed", attempt=attempt + 1, attempts=attempts, **aws_error(exc))
                if gone:
                    return _GONE
                if on_failure is not None:
                    await on_failure()
                if attempt + 1 < attempts:
                    await self._sleep(self._backoff_s(attempt, self.retry.cap_s))
        return None

    def _backoff_s(self, attempt: int, cap_s: float) -> float:
        return full_jitter_backoff_s(attempt, base_s=self.retry.base_s, cap_s=cap_s, rng=self._rng)

    async def set_visibility(self, message: dict[str, Any], timeout_s: int, why: str) -> None:
        timeout_s = min(max(0, int(timeout_s)), MAX_VISIBILITY_S)
        try:
            await self.sqs.change_message_visibility(
                QueueUrl=self.info.url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=timeout_s,
            )
            log.info("message returned to the queue", why=why, visible_in_s=timeout_s)
        except SQS_ERRORS as exc:
            log.warning("visibility change failed; the message returns when its timeout lapses",
                        why=why, **aws_error(exc))

    async def requeue(self, message: dict[str, Any], delay_s: int, receives: int, why: str) -> None:
        """Send a fresh copy of a message on its last receive, then delete the original.

        Never lets the original become visible again before its copy is sent: that next receive would
        move it to the DLQ. A copy sent twice is harmless (the second finds the job ingested).
        """
        attributes = {
            name: {k: v for k, v in value.items() if k in ("DataType", "StringValue", "BinaryValue")}
            for name, value in message.get("MessageAttributes", {}).items() if name != EARLIER_RECEIVES_ATTRIBUTE
        }
        if len(attributes) < MAX_MESSAGE_ATTRIBUTES:
            attributes[EARLIER_RECEIVES_ATTRIBUTE] = {"DataType": "Number", "StringValue": str(receives)}
        send_args = {"QueueUrl": self.info.url, "MessageBody": message["Body"],
                     "DelaySeconds": min(delay_s, MAX_SEND_DELAY_S), "MessageAttributes": attributes}
        received_at = float(message.get(RECEIVED_AT, self._clock()))
        job = _Requeue(message, send_args, why, hold_until=received_at + MAX_VISIBILITY_S - HOLD_MARGIN_S)
        if await self._send_then_delete(job, self.retry.attempts):
            return
        if not job.held:
            await self._hold(job)
        task = asyncio.create_task(self._in_background(job))
        self._background.add(task)
        metrics.REQUEUES_HELD.set(len(self._background))
        task.add_done_callback(self._background_done)

    async def _send_then_delete(self, job: _Requeue, attempts: int) -> bool:
        """True once the copy is sent and the original deleted (or gone)."""

        async def hold_once() -> None:
            # SQS is failing: hide the original now, so retrying cannot outlast its visibility timeout.
            if not job.held:
                await self._hold(job)

        if job.copy_id is None:
            sent = await self._try("requeue: sending the fresh copy", lambda: self.sqs.send_message(**job.send_args),
                                   attempts, hold_once)
            if sent is None:
                return False
            if sent is _GONE:
                log.error("requeue impossible: the queue no longer exists")
                return True
            job.copy_id = str(sent.get("MessageId"))
            self._own_copies_due_at = max(self._own_copies_due_at, self._clock() + job.send_args["DelaySeconds"])
            log.info("last delivery before the dead-letter queue: requeued a fresh copy", why=job.why,
                     visible_in_s=job.send_args["DelaySeconds"], new_message_id=job.copy_id)
        deleted = await self._try("requeue: deleting the original", self._delete_call(job.message), attempts,
                                  hold_once)
        if deleted is _GONE:
            log.warning("requeue: the original was already gone", new_message_id=job.copy_id)
        return deleted is not None

    async def _hold(self, job: _Requeue) -> None:
        """Keep the original invisible for as long as SQS allows (12 h from its receive)."""
        hold_s = int(min(MAX_VISIBILITY_S, job.hold_until - self._clock()))
        if hold_s <= 0:
            return
        try:
            await self.sqs.change_message_visibility(QueueUrl=self.info.url,
                                                     ReceiptHandle=job.message["ReceiptHandle"],
                                                     VisibilityTimeout=hold_s)
        except SQS_ERRORS as exc:
            log.warning("requeue: could not hold the original invisible", **aws_error(exc))
            return
        job.held = True
        log.warning("requeue not finished: the original is held invisible while it goes on", hidden_for_s=hold_s,
                    copy_sent=job.copy_id is not None)

    async def _in_background(self, job: _Requeue) -> None:
        """Retry the requeue until it is done or the original's hold runs out (it then reaches the DLQ)."""
        attempt = 0
        while self._clock() < job.hold_until:
            await self._sleep(self._backoff_s(attempt, self.retry.background_cap_s))
            attempt += 1
            if not job.held:
                await self._hold(job)
            step = asyncio.ensure_future(self._send_then_delete(job, 1))
            step.add_done_callback(_observe)
            try:
                done = await asyncio.shield(step)
            except asyncio.CancelledError:
                # Stopping: a send must not be left without its delete.
                await self._finish(step, self.retry.shutdown_deadline_s)
                raise
            if done:
                log.info("requeue finished in the background", tries=attempt, new_message_id=job.copy_id)
                return
        log.error("requeue abandoned: the original's hold ran out; it goes to the dead-letter queue on its "
                  "next receive", message_id=job.message.get("MessageId"), **body_fields(job.message))

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        metrics.REQUEUES_HELD.set(len(self._background))
        _observe(task)

    async def close(self) -> None:
        """Stop the background requeues (a try in progress gets its shutdown deadline).

        Their originals stay held: each reaches the dead-letter queue when its hold ends, to be redriven.
        """
        tasks = set(self._background)
        if not tasks:
            return
        log.error("stopping with requeues unfinished: their originals stay hidden, then go to the dead-letter "
                  "queue", messages=len(tasks))
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=self.retry.shutdown_deadline_s + 1.0)


def _observe(task: asyncio.Future[Any]) -> None:
    """Retrieve a finished task's exception so none vanishes; SQS errors are handled inside, others are bugs."""
    if not task.cancelled() and task.exception() is not None:
        log.error("settling a message crashed", error=repr(task.exception()))
