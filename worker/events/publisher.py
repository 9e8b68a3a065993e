"""Delivering the outbox: SNS Publish and EventBridge PutEvents, at least once, in order per job.

A round claims the oldest deliverable events in one transaction (``FOR UPDATE SKIP LOCKED``, the first
undelivered event of each job only), sends them, marks the delivered ones and counts the failures, and
commits: replicas never send the same event at once, a job's next event waits until the previous one is
delivered, and a process killed mid-round leaves its events pending (its transaction rolls back with the
connection), to be delivered again with the same ``event_id``. While the destination refuses, rounds back
off (:func:`backoff_s`, a pure function of the failures in a row) instead of hammering it.

`run` keeps a publisher going (:func:`run_publisher`): woken by the outbox's NOTIFY, otherwise every
EVENTS_POLL_INTERVAL_S, reading the backlog into the metrics and pruning delivered events past
EVENTS_RETENTION_DAYS. Commands that change data, and `run --exit-when-idle` before it exits, deliver what is
pending for at most EVENTS_FLUSH_TIMEOUT_S (:func:`flush`) and leave the rest to `run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from worker import metrics
from worker.config import Settings
from worker.db.engine import connect
from worker.errors import aws_error
from worker.events import CHANNEL, EVENT_SOURCE, outbox
from worker.events.outbox import Event
from worker.logs import get_logger

log = get_logger(__name__)

BATCH_EVENTS = 20
# Sends in flight at once within a round (each is a different job's event).
SEND_CONCURRENCY = 8
# A round's sends together; the claim's transaction is open meanwhile.
ROUND_TIMEOUT_S = 30.0
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0
PRUNE_INTERVAL_S = 3600.0
# Fewer retries inside botocore: the round's own backoff decides when to try again.
_CLIENT_CONFIG = AioConfig(connect_timeout=5, read_timeout=10, retries={"mode": "standard", "max_attempts": 2})


def backoff_s(failures: int, *, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S,
              rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after ``failures`` failed rounds in a row: doubling from ``base_s`` up to ``cap_s``,
    jittered into [half, all] of it so replicas spread out; 0 after a success."""
    if failures <= 0:
        return 0.0
    ceiling = min(cap_s, base_s * 2.0 ** min(failures - 1, 32))
    return ceiling * (0.5 + 0.5 * rand())


class DeliveryError(Exception):
    """A destination refused an event, or could not be reached."""

    def __init__(self, destination: str, message: str) -> None:
        super().__init__(f"{destination}: {message}")
        self.destination = destination


def sns_message(event: Event, topic_arn: str) -> dict[str, Any]:
    """The SNS Publish arguments of an event: the document as the message, its type as a String attribute
    (for subscription filter policies); a FIFO topic orders by job and deduplicates on the event id."""
    request: dict[str, Any] = {
        "TopicArn": topic_arn,
        "Message": event.payload,
        "MessageAttributes": {"type": {"DataType": "String", "StringValue": event.type}},
    }
    if topic_arn.endswith(".fifo"):
        request["MessageGroupId"] = event.job_id or event.type
        request["MessageDeduplicationId"] = event.event_id
    return request


def eventbridge_entry(event: Event, bus_name: str) -> dict[str, Any]:
    """The PutEvents entry of an event: DetailType is its type, Detail the document."""
    return {"Source": EVENT_SOURCE, "DetailType": event.type, "Detail": event.payload, "EventBusName": bus_name}


class Destinations:
    """The configured SNS topic and EventBridge bus, and their clients (see :func:`open_destinations`)."""

    def __init__(self, *, sns: Any = None, topic_arn: str | None = None, eventbridge: Any = None,
                 bus_name: str | None = None) -> None:
        self.sns, self.topic_arn = sns, topic_arn
        self.eventbridge, self.bus_name = eventbridge, bus_name

    @property
    def enabled(self) -> bool:
        return self.topic_arn is not None or self.bus_name is not None

    async def send(self, event: Event) -> None:
        """Deliver one event to every destination; DeliveryError names the one that refused. The SNS topic
        goes first: when the bus refuses after it, the next attempt publishes to the topic again."""
        if self.sns is not None and self.topic_arn is not None:
            try:
                await self.sns.publish(**sns_message(event, self.topic_arn))
            except Exception as exc:
                metrics.EVENTS_PUBLISH_FAILURES.labels("sns").inc()
                raise DeliveryError("sns", _describe(exc)) from exc
        if self.eventbridge is not None and self.bus_name is not None:
            try:
                answer = await self.eventbridge.put_events(Entries=[eventbridge_entry(event, self.bus_name)])
            except Exception as exc:
                metrics.EVENTS_PUBLISH_FAILURES.labels("eventbridge").inc()
                raise DeliveryError("eventbridge", _describe(exc)) from exc
            if answer.get("FailedEntryCount"):
                metrics.EVENTS_PUBLISH_FAILURES.labels("eventbridge").inc()
                entry = (answer.get("Entries") or [{}])[0]
                raise DeliveryError("eventbridge", f"{entry.get('ErrorCode')}: {entry.get('ErrorMessage')}")


def _describe(exc: BaseException) -> str:
    fields = aws_error(exc)
    code = fields.get("aws_error_code")
    return f"{code}: {fields['error']}" if code else f"{type(exc).__name__}: {fields['error']}"


@contextlib.asynccontextmanager
async def open_destinations(settings: Settings) -> AsyncIterator[Destinations]:
    """Clients for the configured destinations (none when neither is set); endpoints and credentials are
    botocore's own (``AWS_ENDPOINT_URL_SNS``, ``AWS_ENDPOINT_URL_EVENTBRIDGE``, the credential chain)."""
    session = get_session()
    async with contextlib.AsyncExitStack() as stack:
        sns = eventbridge = None
        if settings.events_sns_topic_arn:
            sns = await stack.enter_async_context(
                session.create_client("sns", region_name=settings.aws_region, config=_CLIENT_CONFIG))
        if settings.events_event_bus_name:
            eventbridge = await stack.enter_async_context(
                session.create_client("events", region_name=settings.aws_region, config=_CLIENT_CONFIG))
        yield Destinations(sns=sns, topic_arn=settings.events_sns_topic_arn, eventbridge=eventbridge,
                           bus_name=settings.events_event_bus_name)


@dataclass(slots=True)
class Round:
    """What one round did."""

    claimed: int = 0
    delivered: int = 0
    failed: int = 0


class Publisher:
    """Rounds of delivery on one connection, with backoff between rounds that failed (clock injected)."""

    def __init__(self, destinations: Destinations, *, batch_events: int = BATCH_EVENTS,
                 clock: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random,
                 base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S,
                 round_timeout_s: float = ROUND_TIMEOUT_S) -> None:
        self.destinations = destinations
        self.batch_events = batch_events
        self._clock = clock
        self._rand = rand
        self._base_s, self._cap_s = base_s, cap_s
        self._round_timeout_s = round_timeout_s
        self.failures = 0  # failed rounds in a row
        self.next_attempt_at = 0.0
        self.last_error: str | None = None

    def wait_s(self) -> float:
        """Seconds until the next round may run (0: now)."""
        return max(0.0, self.next_attempt_at - self._clock())

    def note_failure(self) -> float:
        """One more failed round (or an outage of the database): returns the backoff now in force."""
        self.failures += 1
        delay = backoff_s(self.failures, base_s=self._base_s, cap_s=self._cap_s, rand=self._rand)
        self.next_attempt_at = self._clock() + delay
        return delay

    async def deliver_round(self, conn: asyncpg.Connection, *, timeout_s: float | None = None) -> Round:
        """Claim, send (within ``timeout_s``, else the publisher's round timeout), record; one transaction. A
        cancellation or an error mid-round discards the connection (the server rolls back: the events stay
        pending) and propagates."""
        result = Round()
        delivered: list[Event] = []
        tx = conn.transaction()
        await tx.start()
        try:
            events = await outbox.claim(conn, self.batch_events)
            outcomes = await self._send_all(events, timeout_s or self._round_timeout_s) if events else []
            delivered = [e for e, error in zip(events, outcomes, strict=True) if error is None]
            await outbox.mark_published(conn, [e.seq for e in delivered])
            for event, error in zip(events, outcomes, strict=True):
                if error is not None:
                    await outbox.mark_failed(conn, event.seq, error)
            await tx.commit()
        except BaseException:
            # No await here: a cancelled round must end at once; closing the socket rolls the claim back.
            conn.terminate()
            raise
        result.claimed, result.delivered = len(events), len(delivered)
        result.failed = result.claimed - result.delivered
        for event in delivered:
            metrics.EVENTS_PUBLISHED.labels(event.type).inc()
        if result.failed and not result.delivered:
            delay = self.note_failure()
            log.warning("job events not delivered; retrying with backoff", events=result.failed,
                        failures_in_a_row=self.failures, retry_in_s=round(delay, 2), error=self.last_error)
        elif result.failed:
            # Some went: the destinations work, these events did not; they are tried again after the base delay.
            self.failures = 0
            self.next_attempt_at = self._clock() + self._base_s
            log.warning("some job events not delivered", events=result.failed, error=self.last_error)
        else:
            self.failures = 0
            self.next_attempt_at = 0.0
        return result

    async def _send_all(self, events: list[Event], timeout_s: float) -> list[str | None]:
        """Send each event (at most SEND_CONCURRENCY at once); per event None, or why it was not delivered."""
        gate = asyncio.Semaphore(SEND_CONCURRENCY)

        async def one(event: Event) -> str | None:
            async with gate:
                try:
                    await self.destinations.send(event)
                except DeliveryError as exc:
                    self.last_error = str(exc)[:300]
                    return str(exc)
                return None

        tasks = [asyncio.create_task(one(e)) for e in events]
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        outcomes: list[str | None] = []
        for task in tasks:
            if task in pending:
                outcomes.append(f"no answer within {timeout_s:g} s")
                self.last_error = outcomes[-1]
            else:
                outcomes.append(task.result())
        return outcomes


async def _open_listening(settings: Settings, wake: asyncio.Event) -> asyncpg.Connection:
    conn = await connect(settings.asyncpg_dsn, application_name="rekognition-worker-events")
    await conn.add_listener(CHANNEL, lambda *_: wake.set())
    return conn


async def _wait(stop: asyncio.Event, wake: asyncio.Event | None, timeout_s: float) -> None:
    """Until ``stop`` (or ``wake``) is set, or ``timeout_s`` passed."""
    # Named: two at most, owned by the publisher's wait (the soak test tells them from per-job tasks).
    waiters = [asyncio.create_task(stop.wait(), name="events-wait")]
    if wake is not None:
        waiters.append(asyncio.create_task(wake.wait(), name="events-wait"))
    try:
        await asyncio.wait(waiters, timeout=max(0.0, timeout_s), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


async def run_publisher(settings: Settings, stop: asyncio.Event, *, clock: Callable[[], float] = time.monotonic,
                        now: Callable[[], datetime] = lambda: datetime.now(tz=UTC)) -> None:
    """`run`'s events task until ``stop``: deliver (when a destination is set), read the backlog into the
    metrics, prune past EVENTS_RETENTION_DAYS. Never raises for an outage: it backs off and goes on."""
    wake = asyncio.Event()
    conn: asyncpg.Connection | None = None
    last_prune = -PRUNE_INTERVAL_S
    async with open_destinations(settings) as destinations:
        publisher = Publisher(destinations, clock=clock)
        if destinations.enabled:
            log.info("delivering job events", sns_topic_arn=settings.events_sns_topic_arn,
                     event_bus_name=settings.events_event_bus_name)
        try:
            while not stop.is_set():
                more = False
                try:
                    if conn is None or conn.is_closed():
                        conn = await _open_listening(settings, wake)
                    wake.clear()
                    if clock() - last_prune >= PRUNE_INTERVAL_S:
                        await _prune(conn, settings, now(), destinations.enabled)
                        last_prune = clock()
                    if destinations.enabled:
                        if publisher.wait_s() == 0:
                            done = await publisher.deliver_round(conn)
                            more = done.claimed == publisher.batch_events and not done.failed
                        await _read_backlog(conn)
                except Exception as exc:  # the database: back off like a refusing destination
                    delay = publisher.note_failure()
                    log.warning("job events: database unavailable", error=f"{type(exc).__name__}: {exc}"[:300],
                                retry_in_s=round(delay, 2))
                    if conn is not None:
                        conn.terminate()
                    conn = None
                if more:
                    continue
                # Backing off, a NOTIFY does not hurry the next round; the backlog is still read every poll.
                backoff = publisher.wait_s()
                await _wait(stop, wake if backoff == 0 else None,
                            min(backoff, settings.events_poll_interval_s) if backoff > 0
                            else settings.events_poll_interval_s)
        finally:
            if conn is not None:
                conn.terminate()


async def _read_backlog(conn: asyncpg.Connection) -> outbox.Backlog:
    backlog = await outbox.backlog(conn)
    metrics.EVENTS_PENDING.set(backlog.pending)
    metrics.EVENTS_OLDEST_PENDING_AGE.set(backlog.oldest_age_s)
    return backlog


async def _prune(conn: asyncpg.Connection, settings: Settings, now: datetime, enabled: bool) -> None:
    n = await outbox.prune(conn, now - timedelta(days=settings.events_retention_days), undelivered_too=not enabled)
    if n:
        log.info("job events pruned", events=n, retention_days=settings.events_retention_days)


@dataclass(slots=True)
class Flush:
    """What :func:`flush` did: delivered, and still pending when it stopped (None: not known)."""

    delivered: int = 0
    failed: int = 0
    pending: int | None = None


async def flush(settings: Settings, *, timeout_s: float | None = None, batch_events: int = BATCH_EVENTS,
                clock: Callable[[], float] = time.monotonic) -> Flush | None:
    """Deliver what is pending, for at most ``timeout_s`` (EVENTS_FLUSH_TIMEOUT_S); None when no destination
    is configured. Stops early when nothing is left that this process may claim (another replica may be
    delivering the rest). Raises only for the database; a refusing destination leaves the events pending."""
    if not (settings.events_sns_topic_arn or settings.events_event_bus_name):
        return None
    budget_s = settings.events_flush_timeout_s if timeout_s is None else timeout_s
    deadline = clock() + budget_s
    result = Flush()
    async with open_destinations(settings) as destinations:
        publisher = Publisher(destinations, batch_events=batch_events, clock=clock)
        conn = await connect(settings.asyncpg_dsn, application_name="rekognition-worker-events")
        try:
            while clock() < deadline:
                if (wait := publisher.wait_s()) > 0:
                    await asyncio.sleep(min(wait, max(0.0, deadline - clock())))
                    continue
                # A round never outlasts the budget by more than a second.
                done = await publisher.deliver_round(conn, timeout_s=max(1.0, min(ROUND_TIMEOUT_S, deadline - clock())))
                result.delivered += done.delivered
                result.failed += done.failed
                if done.claimed == 0:
                    break
            result.pending = (await outbox.backlog(conn)).pending
        finally:
            conn.terminate()
    if result.delivered or result.failed:
        log.info("job events delivered", delivered=result.delivered, failed_attempts=result.failed,
                 pending=result.pending)
    return result



async def flush_before_exit(settings: Settings, code: int) -> int:
    """`run --exit-when-idle`: deliver what is pending before exiting. Exit code 1 when events stay pending (the
    destination refused for EVENTS_FLUSH_TIMEOUT_S, or the database did): the next `run` delivers them."""
    try:
        done = await flush(settings)
    except Exception as exc:
        log.error("job events not delivered before exit", error=f"{type(exc).__name__}: {exc}"[:300])
        return code or 1
    if done is not None and done.pending:
        log.error("job events not delivered before exit; the next run delivers them", pending=done.pending)
        return code or 1
    return code
