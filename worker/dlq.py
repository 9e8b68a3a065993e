"""Dead-letter queue tools: what is in the DLQ and why (`dlq list`), and moving it back (`dlq redrive`).

The DLQ is found from the main queue's RedrivePolicy, so the tools read exactly the queue the
worker's unusable messages go to. Reading never loses a message and hides none for long: each is
received with a short visibility timeout (so one scan sees every message once, deduplicated by
MessageId) and released (visibility 0) when the scan ends, or lapses back by itself if the process
dies. Moving sends the copy before deleting the original: a crash between the two leaves a harmless
duplicate (the worker recognises duplicates of ingested jobs), never a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError
from rich.console import Console

from worker.config import Settings
from worker.db.engine import connect
from worker.errors import ConfigError, InvalidInput, aws_message, aws_status
from worker.logs import get_logger
from worker.logsafe import redacted_body
from worker.messages import JobRef, parse_message_body
from worker.queue import describe_queue, queue_url_from_arn

log = get_logger(__name__)

# Long enough for one scan of a few thousand messages; a crashed scan hides nothing longer than this.
SCAN_VISIBILITY_S = 30
# Long-poll this long before concluding the DLQ has no more visible messages (a 0 s short poll
# samples only some SQS servers and can come back empty while messages remain).
SCAN_WAIT_S = 1
DEFAULT_SCAN_LIMIT = 1000
# Batches that bring back only messages already seen (their visibility lapsed mid-scan), beyond one
# round of what was seen, before the scan gives up.
_MAX_REPEAT_BATCHES = 3
MOVE_TASK_POLL_S = 2.0
MOVE_TASK_WAIT_S = 600.0
_SQS_ERRORS = (ClientError, BotoCoreError, OSError)
_ATTRIBUTE_KEYS = ("DataType", "StringValue", "BinaryValue")


@dataclass(frozen=True, slots=True)
class DeadLetterTopology:
    """The main queue and the dead-letter queue its redrive policy names."""

    queue_url: str
    queue_arn: str
    dlq_url: str
    dlq_arn: str
    max_receive_count: int | None


async def locate(sqs: Any, queue_url: str) -> DeadLetterTopology:
    """Read the main queue's RedrivePolicy (as the worker does) and resolve the DLQ's URL from its ARN."""
    info = await describe_queue(sqs, queue_url)
    if info.dead_letter_arn is None:
        raise ConfigError(f"queue {queue_url} has no redrive policy: it has no dead-letter queue")
    try:
        dlq_url = await queue_url_from_arn(sqs, info.dead_letter_arn)
    except ValueError:
        raise ConfigError(f"redrive policy of {queue_url} names no SQS queue: {info.dead_letter_arn!r}") from None
    return DeadLetterTopology(queue_url, info.arn, dlq_url, info.dead_letter_arn, info.max_receive_count)


@dataclass(slots=True)
class DeadLetter:
    """One message in the DLQ, and what its body says."""

    message_id: str
    receipt_handle: str
    body: str
    attributes: dict[str, Any]
    message_attributes: dict[str, Any]
    ref: JobRef | None
    parse_error: str | None

    @classmethod
    def from_sqs(cls, message: dict[str, Any]) -> DeadLetter:
        body = message.get("Body") or ""
        ref: JobRef | None = None
        error: str | None = None
        try:
            ref = parse_message_body(body)
        except InvalidInput as exc:
            error = str(exc)
        return cls(message["MessageId"], message["ReceiptHandle"], body, dict(message.get("Attributes", {})),
                   dict(message.get("MessageAttributes", {})), ref, error)

    @property
    def receive_count(self) -> int:
        try:
            return int(self.attributes.get("ApproximateReceiveCount", "0"))
        except ValueError:
            return 0

    @property
    def sent_at(self) -> datetime | None:
        try:
            return datetime.fromtimestamp(int(self.attributes["SentTimestamp"]) / 1000, tz=UTC)
        except (KeyError, ValueError):
            return None


class Scan:
    """Receives every visible message of a queue once; whatever is still held is released on close.

    A message the caller deletes or moves must be passed to :meth:`forget`; every other one is held
    (invisible) until the scan ends, so the next receive returns messages not seen yet.
    """

    def __init__(self, sqs: Any, queue_url: str, *, limit: int = DEFAULT_SCAN_LIMIT,
                 visibility_s: int = SCAN_VISIBILITY_S, wait_s: int = SCAN_WAIT_S) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.limit = limit
        self.visibility_s = visibility_s
        self.wait_s = wait_s
        self.seen: set[str] = set()
        self.received = 0  # deliveries, repeats included
        self.truncated = False
        self._held: dict[str, str] = {}  # MessageId -> latest receipt handle

    async def batches(self) -> AsyncIterator[list[DeadLetter]]:
        """New messages, one receive at a time, until the queue shows nothing new (or ``limit``)."""
        repeats = 0
        # Room for every message to come back once after a lapse, and then some.
        max_rounds = 2 * (self.limit // 10) + 2 * _MAX_REPEAT_BATCHES + 10
        for _ in range(max_rounds):
            if len(self.seen) >= self.limit:
                self.truncated = True
                return
            resp = await self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=min(10, self.limit - len(self.seen)),
                WaitTimeSeconds=self.wait_s, VisibilityTimeout=self.visibility_s,
                MessageSystemAttributeNames=["All"], MessageAttributeNames=["All"])
            messages = resp.get("Messages", [])
            if not messages:
                return
            self.received += len(messages)
            new: list[DeadLetter] = []
            for m in messages:
                self._held[m["MessageId"]] = m["ReceiptHandle"]
                if m["MessageId"] not in self.seen:
                    self.seen.add(m["MessageId"])
                    new.append(DeadLetter.from_sqs(m))
            repeats = 0 if new else repeats + 1
            if repeats >= len(self.seen) // 10 + _MAX_REPEAT_BATCHES:
                # Round every held message again without a new one: cannot tell whether more exist.
                log.warning("scan stopped: only messages already seen keep coming back", seen=len(self.seen))
                self.truncated = True
                return
            if new:
                yield new
        self.truncated = True

    def forget(self, message_id: str) -> None:
        """The message is gone from the queue (deleted): nothing to release."""
        self._held.pop(message_id, None)

    async def release(self) -> int:
        """Make every held message visible again at once; returns how many could not be released."""
        held = list(self._held.items())
        self._held.clear()
        failed = 0
        for start in range(0, len(held), 10):
            chunk = held[start:start + 10]
            entries = [{"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": 0}
                       for i, (_, handle) in enumerate(chunk)]
            try:
                resp = await self.sqs.change_message_visibility_batch(QueueUrl=self.queue_url, Entries=entries)
            except _SQS_ERRORS as exc:
                failed += len(chunk)
                log.warning("could not release messages; they become visible when their timeout lapses",
                            messages=len(chunk), visible_in_s=self.visibility_s, error=str(exc)[:300])
                continue
            if resp.get("Failed"):
                failed += len(resp["Failed"])
                log.warning("some messages were not released; they become visible when their timeout lapses",
                            failed=resp["Failed"][:3], visible_in_s=self.visibility_s)
        return failed


@contextlib.asynccontextmanager
async def scanning(sqs: Any, queue_url: str, *, limit: int = DEFAULT_SCAN_LIMIT) -> AsyncIterator[Scan]:
    """A :class:`Scan` whose held messages are released however the block ends (Ctrl-C included)."""
    scan = Scan(sqs, queue_url, limit=limit)
    try:
        yield scan
    finally:
        await asyncio.shield(scan.release())


@dataclass(frozen=True, slots=True)
class JobState:
    """What PostgreSQL knows about a job."""

    ingest_state: str
    job_status: str | None
    failure_code: str | None
    failure_reason: str | None


async def job_states(conn: asyncpg.Connection | None, job_ids: Sequence[str]) -> dict[str, JobState]:
    if conn is None or not job_ids:
        return {}
    rows = await conn.fetch(
        "SELECT job_id, ingest_state::text AS ingest_state, job_status::text AS job_status, failure_code, "
        "failure_reason FROM jobs WHERE job_id = ANY($1::text[])", list(set(job_ids)))
    states = {r["job_id"]: JobState(r["ingest_state"], r["job_status"], r["failure_code"], r["failure_reason"])
              for r in rows}
    # A deleted or expired job has no row but a tombstone (worker/tombstones.py): the worker settles its copies.
    for r in await conn.fetch("SELECT job_id, reason, deleted_at FROM tombstones WHERE job_id = ANY($1::text[])",
                              list(set(job_ids) - set(states))):
        states[r["job_id"]] = JobState(r["reason"], None, "Tombstone", r["deleted_at"].isoformat(timespec="seconds"))
    return states


def reason(dl: DeadLetter, state: JobState | None, *, database: bool = True) -> str:
    """Why the message is in the DLQ, as far as its body and the database tell."""
    if dl.ref is None:
        return f"unparseable: {dl.parse_error}"
    if not database:
        return "handler kept failing (database not consulted)"
    if state is None:
        return "handler kept failing; no outcome recorded for the job"
    if state.ingest_state == "ingested":
        return "handler kept failing on this copy; the job is ingested now"
    if state.failure_code == "Tombstone":
        return (f"job {state.ingest_state} at {state.failure_reason}: a redriven copy is settled without ingesting "
                f"(backfill --restore-deleted brings the job back)")
    if state.ingest_state == "failed":
        return f"job failed: {state.failure_code or 'Error'}: {state.failure_reason or ''}".rstrip(": ")
    return f"handler kept failing; job is {state.ingest_state}"


def describe(dl: DeadLetter, state: JobState | None, *, now: datetime, database: bool = True) -> dict[str, Any]:
    """One `dlq list` row (also the JSON object of the message)."""
    sent = dl.sent_at
    return {
        "message_id": dl.message_id,
        "sent_at": sent.isoformat() if sent else None,
        "age_s": round((now - sent).total_seconds()) if sent else None,
        "receive_count": dl.receive_count,
        "job_id": dl.ref.job_id if dl.ref else None,
        "api": dl.ref.api.value if dl.ref else None,
        "parseable": dl.ref is not None,
        "reason": reason(dl, state, database=database),
        "ingest_state": state.ingest_state if state else None,
        "ingested": (state is not None and state.ingest_state == "ingested") if database and dl.ref else None,
        "dead_letter_source_arn": dl.attributes.get("DeadLetterQueueSourceArn"),
        # A notification's video name is hashed (worker/logsafe.py); the rest is what triage needs.
        "body_excerpt": _excerpt(redacted_body(dl.body)),
    }


def _excerpt(body: str, limit: int = 200) -> str:
    return body if len(body) <= limit else body[:limit] + "..."


@dataclass
class Listing:
    rows: list[dict[str, Any]]
    truncated: bool
    dlq_url: str


async def list_dead_letters(sqs: Any, topo: DeadLetterTopology, conn: asyncpg.Connection | None, *,
                            limit: int = DEFAULT_SCAN_LIMIT, clock: Callable[[], datetime] | None = None) -> Listing:
    """Every message in the DLQ (up to ``limit``), oldest first; every one is left in the DLQ."""
    letters: list[DeadLetter] = []
    async with scanning(sqs, topo.dlq_url, limit=limit) as scan:
        async for batch in scan.batches():
            letters.extend(batch)
    states = await job_states(conn, [dl.ref.job_id for dl in letters if dl.ref])
    now = (clock or (lambda: datetime.now(tz=UTC)))()
    rows = [describe(dl, states.get(dl.ref.job_id) if dl.ref else None, now=now, database=conn is not None)
            for dl in letters]
    rows.sort(key=lambda r: (r["sent_at"] or "", r["message_id"]))
    return Listing(rows, scan.truncated, topo.dlq_url)


# --- redrive -------------------------------------------------------------------------------------


@dataclass
class RedriveResult:
    """What `dlq redrive` did (or, with --dry-run, would do)."""

    method: str  # "receive-send-delete" or "move-task"
    dry_run: bool = False
    moved: int = 0
    skipped_ingested: int = 0
    left_unparseable: int = 0
    not_selected: int = 0
    failed: int = 0
    duplicates_left: int = 0  # sent, but the DLQ copy could not be deleted
    truncated: bool = False
    move_task: dict[str, Any] = field(default_factory=dict)
    moved_jobs: list[str] = field(default_factory=list)
    fallback_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.move_task.get("Status") not in ("FAILED", "CANCELLED")


def _send_arguments(dl: DeadLetter, queue_url: str) -> dict[str, Any]:
    """The copy to send: the same body and message attributes (FIFO queues also need a group and an id)."""
    args: dict[str, Any] = {"QueueUrl": queue_url, "MessageBody": dl.body}
    attributes = {name: {k: v for k, v in value.items() if k in _ATTRIBUTE_KEYS}
                  for name, value in dl.message_attributes.items()}
    if attributes:
        args["MessageAttributes"] = attributes
    if queue_url.endswith(".fifo"):
        args["MessageGroupId"] = dl.attributes.get("MessageGroupId") or (dl.ref.job_id if dl.ref else "dlq-redrive")
        args["MessageDeduplicationId"] = dl.message_id[:128]
    return args


async def _move_one(sqs: Any, scan: Scan, topo: DeadLetterTopology, dl: DeadLetter, result: RedriveResult) -> None:
    try:
        sent = await sqs.send_message(**_send_arguments(dl, topo.queue_url))
    except _SQS_ERRORS as exc:
        result.failed += 1
        log.error("could not send the message to the main queue; it stays in the DLQ",
                  message_id=dl.message_id, error=str(exc)[:300])
        return
    result.moved += 1
    result.moved_jobs.append(dl.ref.job_id if dl.ref else "?")
    log.info("message moved to the main queue", message_id=dl.message_id, new_message_id=sent.get("MessageId"),
             job_id=dl.ref.job_id if dl.ref else None)
    await _delete(sqs, scan, dl, result)


async def _delete(sqs: Any, scan: Scan, dl: DeadLetter, result: RedriveResult) -> None:
    try:
        await sqs.delete_message(QueueUrl=scan.queue_url, ReceiptHandle=dl.receipt_handle)
    except _SQS_ERRORS as exc:
        result.duplicates_left += 1
        log.warning("could not delete the DLQ copy; it stays there as a duplicate", message_id=dl.message_id,
                    error=str(exc)[:300])
        return
    scan.forget(dl.message_id)


async def _redrive_by_receiving(sqs: Any, topo: DeadLetterTopology, conn: asyncpg.Connection, *,
                                job_id: str | None, dry_run: bool, limit: int, result: RedriveResult) -> None:
    async with scanning(sqs, topo.dlq_url, limit=limit) as scan:
        async for batch in scan.batches():
            states = await job_states(conn, [dl.ref.job_id for dl in batch if dl.ref])
            for dl in batch:
                if job_id is not None and (dl.ref is None or dl.ref.job_id != job_id):
                    result.not_selected += 1
                elif dl.ref is None:
                    result.left_unparseable += 1
                elif (state := states.get(dl.ref.job_id)) is not None and state.ingest_state == "ingested":
                    # The job's rows are committed: this copy has nothing left to do (the worker would
                    # delete it as a duplicate too), and leaving it would keep the DLQ from draining.
                    result.skipped_ingested += 1
                    if not dry_run:
                        log.info("job already ingested: DLQ copy deleted", message_id=dl.message_id,
                                 job_id=dl.ref.job_id)
                        await _delete(sqs, scan, dl, result)
                elif dry_run:
                    result.moved += 1
                    result.moved_jobs.append(dl.ref.job_id)
                else:
                    await _move_one(sqs, scan, topo, dl, result)
        result.truncated = scan.truncated


def move_task_unsupported(exc: BaseException) -> str | None:
    """Why StartMessageMoveTask cannot be used here (any refusal: the fallback is always correct), or None."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return f"{code or aws_status(exc)}: {aws_message(exc, 200) or str(exc)[:200]}"
    if isinstance(exc, (BotoCoreError, OSError)):
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


async def _start_move_task(move_sqs: Any, topo: DeadLetterTopology) -> str:
    resp = await move_sqs.start_message_move_task(SourceArn=topo.dlq_arn, DestinationArn=topo.queue_arn)
    return str(resp["TaskHandle"])


async def _wait_for_move_task(sqs: Any, topo: DeadLetterTopology, *, wait_s: float,
                              sleep: Callable[[float], Any] = asyncio.sleep) -> dict[str, Any]:
    deadline = time.monotonic() + wait_s
    task: dict[str, Any] = {}
    while True:
        tasks = (await sqs.list_message_move_tasks(SourceArn=topo.dlq_arn, MaxResults=1)).get("Results", [])
        task = tasks[0] if tasks else {}
        if task.get("Status") != "RUNNING" or time.monotonic() >= deadline:
            return task
        await sleep(MOVE_TASK_POLL_S)


async def redrive(sqs: Any, topo: DeadLetterTopology, conn: asyncpg.Connection, *, job_id: str | None,
                  dry_run: bool = False, use_move_task: bool = True, move_sqs: Any = None,
                  limit: int = 100_000, move_task_wait_s: float = MOVE_TASK_WAIT_S) -> RedriveResult:
    """Move DLQ messages back to the main queue: all of them (``job_id`` None) or one job's.

    All, not a dry run, and ``use_move_task``: SQS's own message move task (fast, server-side, but it
    cannot filter); if the queue refuses it, receive/send/delete, which skips ingested jobs and
    leaves unparseable messages where they are.
    """
    if job_id is None and use_move_task and not dry_run:
        try:
            handle = await _start_move_task(move_sqs or sqs, topo)
        except Exception as exc:
            why = move_task_unsupported(exc)
            if why is None:
                raise
            log.warning("message move task not available; moving messages one by one", reason=why)
            fallback = why
        else:
            log.info("message move task started", task_handle=handle, source=topo.dlq_arn,
                     destination=topo.queue_arn)
            task = await _wait_for_move_task(sqs, topo, wait_s=move_task_wait_s)
            result = RedriveResult("move-task", move_task={**task, "TaskHandle": handle})
            result.moved = int(task.get("ApproximateNumberOfMessagesMoved", 0))
            return result
    else:
        fallback = None
    result = RedriveResult("receive-send-delete", dry_run=dry_run, fallback_reason=fallback)
    await _redrive_by_receiving(sqs, topo, conn, job_id=job_id, dry_run=dry_run, limit=limit, result=result)
    return result


# --- the commands ----------------------------------------------------------------------------------


def _age(seconds: int | None) -> str:
    """``95`` -> ``1m35s``, ``90000`` -> ``1d1h``: the largest unit and the next one."""
    if seconds is None:
        return "?"
    seconds = max(0, seconds)
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for i, (unit, size) in enumerate(units):
        if seconds >= size or unit == "s":
            text = f"{seconds // size}{unit}"
            if i + 1 < len(units) and seconds % size:
                sub, sub_size = units[i + 1]
                text += f"{(seconds % size) // sub_size}{sub}"
            return text
    return f"{seconds}s"


@contextlib.asynccontextmanager
async def _clients(settings: Settings) -> AsyncIterator[tuple[Any, Any]]:
    """The SQS client, and one that makes a single attempt (so an unsupported move task fails fast)."""
    session = get_session()
    single = AioConfig(retries={"mode": "standard", "max_attempts": 1})
    async with session.create_client("sqs", region_name=settings.aws_region) as sqs, \
            session.create_client("sqs", region_name=settings.aws_region, config=single) as move_sqs:
        yield sqs, move_sqs


@contextlib.asynccontextmanager
async def _database(settings: Settings, *, required: bool) -> AsyncIterator[asyncpg.Connection | None]:
    if settings.database_url is None and not required:
        yield None
        return
    conn = await connect(settings.asyncpg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


def _queue_url(settings: Settings) -> str:
    if not settings.queue_url:
        raise ConfigError("QUEUE_URL is not set (the DLQ is found from its redrive policy)")
    return settings.queue_url


async def read_listing(settings: Settings, *, limit: int) -> tuple[Listing, bool]:
    """The `dlq list` command's data: every message (up to ``limit``), and whether job states were looked up
    (DATABASE_URL set)."""
    queue_url = _queue_url(settings)
    async with _clients(settings) as (sqs, _), _database(settings, required=False) as conn:
        topo = await locate(sqs, queue_url)
        return await list_dead_letters(sqs, topo, conn, limit=limit), conn is not None


async def run_redrive(settings: Settings, *, job_id: str | None, dry_run: bool, use_move_task: bool,
                      console: Console) -> RedriveResult:
    """The `dlq redrive` command: moves, prints what it did, returns it."""
    queue_url = _queue_url(settings)
    async with _clients(settings) as (sqs, move_sqs), _database(settings, required=True) as conn:
        assert conn is not None
        topo = await locate(sqs, queue_url)
        result = await redrive(sqs, topo, conn, job_id=job_id, dry_run=dry_run, use_move_task=use_move_task,
                               move_sqs=move_sqs)
    for line in summary_lines(result, topo, job_id):
        console.print(line, markup=False, highlight=False)
    return result


def summary_lines(result: RedriveResult, topo: DeadLetterTopology, job_id: str | None) -> list[str]:
    verb = "would move" if result.dry_run else "moved"
    if result.method == "move-task":
        task = result.move_task
        lines = [f"message move task {task.get('TaskHandle', '?')[:60]}: {task.get('Status', '?')}",
                 f"{verb}: {result.moved} (of ~{task.get('ApproximateNumberOfMessagesToMove', '?')}) "
                 f"from {topo.dlq_url} to {topo.queue_url}",
                 "the move task cannot filter: unparseable messages and ingested jobs' copies moved too "
                 "(the worker dead-letters the unparseable ones again and deletes duplicates of ingested jobs)"]
        if task.get("FailureReason"):
            lines.append(f"failure reason: {task['FailureReason']}")
        return lines
    lines = []
    if result.fallback_reason:
        lines.append(f"message move task not available ({result.fallback_reason}); moved one by one")
    deleted = "" if result.dry_run else ", DLQ copy deleted"
    lines += [f"{verb}: {result.moved}" + (f" ({', '.join(sorted(set(result.moved_jobs)))})" if result.moved else ""),
              f"skipped (ingested): {result.skipped_ingested}{deleted if result.skipped_ingested else ''}",
              f"left (unparseable): {result.left_unparseable}"]
    if job_id is not None:
        lines.append(f"left (other jobs): {result.not_selected}")
    if result.failed:
        lines.append(f"failed to send (left in the DLQ): {result.failed}")
    if result.duplicates_left:
        lines.append(f"sent but not deleted from the DLQ (harmless duplicates): {result.duplicates_left}")
    if result.truncated:
        lines.append("stopped at the scan limit: run again for the rest")
    if result.dry_run:
        lines.append("dry run: nothing was sent or deleted")
        if job_id is None:
            lines.append("without --no-move-task a real run uses SQS's message move task where the queue "
                         "supports it, which moves every message, unparseable and ingested included")
    return lines
