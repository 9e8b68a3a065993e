"""What happens to one SQS message: receive, heartbeat, settle (delete, retry, requeue, dead-letter), and the
pure :func:`decide` that picks a message's fate.

Only unusable messages ever reach the dead-letter queue: a job that is merely not ready yet, or held up by
an outage, is sent again as a fresh copy on the delivery the redrive policy would count as its last.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from worker import metrics
from worker.config import Settings
from worker.logs import get_logger

log = get_logger(__name__)

MAX_VISIBILITY_S = 12 * 60 * 60  # SQS's ceiling for a visibility timeout
MAX_SEND_DELAY_S = 900  # SQS's ceiling for DelaySeconds
MAX_MESSAGE_ATTRIBUTES = 10  # SQS's ceiling per message
# Carried by a requeued copy: deliveries of the earlier copies, so its backoff keeps growing.
EARLIER_RECEIVES_ATTRIBUTE = "IngestEarlierReceives"
SQS_ERRORS = (ClientError, BotoCoreError, OSError)

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


def excerpt(message: dict[str, Any], limit: int = 120) -> str:
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


class SqsQueue:
    """The SQS calls made on one queue's messages: receive, keep hidden, delete, hand back, requeue."""

    def __init__(self, sqs: Any, info: QueueInfo, settings: Settings, counters: Counters) -> None:
        self.sqs = sqs
        self.info = info
        self.settings = settings
        self.counters = counters

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
            log.warning("receive failed; retrying", error=str(exc)[:300])
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=2.0)
            return []
        messages: list[dict[str, Any]] = resp.get("Messages", [])
        self.counters.received += len(messages)
        now_ms = time.time() * 1000
        sent = [int(m.get("Attributes", {}).get("SentTimestamp", now_ms)) for m in messages]
        # An empty receive means nothing is waiting: a stale age would keep an alert firing.
        metrics.OLDEST_MESSAGE_AGE.set(max(0.0, (now_ms - min(sent)) / 1000) if sent else 0.0)
        return messages

    async def is_empty(self) -> bool:
        try:
            attrs = (await self.sqs.get_queue_attributes(
                QueueUrl=self.info.url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                                "ApproximateNumberOfMessagesDelayed"],
            ))["Attributes"]
        except SQS_ERRORS as exc:
            log.warning("queue attributes unavailable", error=str(exc)[:300])
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
                            error=str(exc)[:300])
            else:
                self.counters.visibility_extensions += 1
                log.debug("visibility extended", visibility_timeout_s=self.settings.visibility_timeout_s)

    async def settle(self, message: dict[str, Any], action: Action, outcome: str, receives: int, *,
                     reason: str | None = None) -> None:
        """Carry out ``action`` (from :func:`decide`) on ``message``."""
        if action.kind == "delete":
            await self.delete(message)
        elif action.kind == "requeue":
            await self.requeue(message, action.delay_s, receives, outcome)
        elif action.kind == "dead_letter":
            log.warning("unusable message: made visible again so the queue's redrive policy moves it to the "
                        "dead-letter queue", reason=reason, body_excerpt=excerpt(message),
                        dead_letter_queue=self.info.dead_letter_arn)
            await self.set_visibility(message, 0, outcome)
        elif action.kind == "keep":
            # Never deleted unseen; without a DLQ, back off so it does not spin.
            log.error("unusable message and the queue has no dead-letter queue: it stays in the queue",
                      reason=reason, body_excerpt=excerpt(message), retry_in_s=action.delay_s)
            await self.set_visibility(message, action.delay_s, outcome)
        else:
            await self.set_visibility(message, action.delay_s, outcome)

    async def delete(self, message: dict[str, Any]) -> None:
        try:
            await self.sqs.delete_message(QueueUrl=self.info.url, ReceiptHandle=message["ReceiptHandle"])
        except SQS_ERRORS as exc:
            # The rows are committed; a redelivery will be recognised as a duplicate.
            log.warning("delete failed; the message may be delivered again", error=str(exc)[:300])

    async def set_visibility(self, message: dict[str, Any], timeout_s: int, why: str) -> None:
        timeout_s = min(max(0, int(timeout_s)), MAX_VISIBILITY_S)
        try:
            await self.sqs.change_message_visibility(
                QueueUrl=self.info.url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=timeout_s,
            )
            log.info("message returned to the queue", why=why, visible_in_s=timeout_s)
        except SQS_ERRORS as exc:
            log.warning("visibility change failed; the message returns when its timeout lapses",
                        why=why, error=str(exc)[:300])

    async def requeue(self, message: dict[str, Any], delay_s: int, receives: int, why: str) -> None:
        attributes = {
            name: {k: v for k, v in value.items() if k in ("DataType", "StringValue", "BinaryValue")}
            for name, value in message.get("MessageAttributes", {}).items() if name != EARLIER_RECEIVES_ATTRIBUTE
        }
        if len(attributes) < MAX_MESSAGE_ATTRIBUTES:
            attributes[EARLIER_RECEIVES_ATTRIBUTE] = {"DataType": "Number", "StringValue": str(receives)}
        try:
            sent = await self.sqs.send_message(QueueUrl=self.info.url, MessageBody=message["Body"],
                                               DelaySeconds=min(delay_s, MAX_SEND_DELAY_S),
                                               MessageAttributes=attributes)
        except SQS_ERRORS as exc:
            log.warning("requeue failed; using a visibility delay instead", error=str(exc)[:300])
            await self.set_visibility(message, delay_s, why)
            return
        log.info("last delivery before the dead-letter queue: requeued a fresh copy", why=why,
                 visible_in_s=min(delay_s, MAX_SEND_DELAY_S), new_message_id=sent.get("MessageId"))
        await self.delete(message)
