"""Ingest one job end to end: pages from Rekognition -> rows under a new key -> the job switches to them.

Fetching runs one page ahead of writing (a bounded queue), so page N+1 is on the wire and being
normalized while page N is copied into PostgreSQL; memory stays bounded by ``prefetch_pages``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
import structlog

from worker import metrics, unknown_values
from worker.archive import ArchivedPage
from worker.db.store import AlreadyIngested, JobBusy, Quarantine, Store, WriteCounts
from worker.errors import (
    CredentialsError,
    InfrastructureError,
    InvalidInput,
    JobNotReady,
    JobStalled,
    PermanentJobError,
    RestartJob,
    TransientError,
)
from worker.logs import get_logger
from worker.messages import JobRef
from worker.normalize import JobMeta
from worker.pagecodec import DecodedPage, PageDecoder
from worker.rekognition import Fetcher
from worker.tombstones import Tombstoned
from worker.watchdog import Watchdog, progress, watching

log = get_logger(__name__)

MAX_RESTARTS = 3


@dataclass(slots=True)
class JobOutcome:
    """What happened to one job. ``outcome`` is one of the OUTCOMES below."""

    job_id: str
    api: str
    outcome: str
    pages: int = 0
    faces: int = 0
    persons: int = 0
    matches: int = 0
    rows: int = 0
    seconds: float = 0.0
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # AWS refused the deployment's identity (outcome "transient"): the service pauses after a run of these.
    credentials_error: bool = False

    @property
    def ok(self) -> bool:
        return self.outcome in ("ingested", "duplicate")


OUTCOMES = ("ingested", "duplicate", "failed", "not_ready", "busy", "transient", "invalid", "error", "tombstoned")

# Failures after which the job's raw pages are fetched again and archived (quarantined) with the failed
# job: Rekognition returned results, this version could not store them. Not for jobs that have none
# (Rekognition said FAILED, no such job, a bad request).
QUARANTINE_CODES = frozenset({"MalformedPage", "UnstorableValue", "PaginationLoop", "RepeatedFailure"})


async def _chain(first: DecodedPage, rest: AsyncIterator[DecodedPage]) -> AsyncGenerator[DecodedPage]:
    yield first
    del first  # the writer holds the page now; keep memory bounded by the prefetch depth
    async for page in rest:
        yield page


async def _prefetch(pages: AsyncIterator[DecodedPage], depth: int) -> AsyncGenerator[DecodedPage]:
    """Run ``pages`` in a task, ``depth`` items ahead of the consumer; errors surface in order.

    Memory stays bounded: at most ``depth`` decoded pages wait, plus one being written and one being
    decoded, whatever the size of the job.

    Every exit finishes: the consumer stopping for any reason (a failed write, cancellation) cancels
    the producer, and nothing on either side's way out waits for room in the queue.
    """
    queue: asyncio.Queue[DecodedPage | BaseException | None] = asyncio.Queue(maxsize=depth)

    async def produce() -> None:
        try:
            async for item in pages:
                await queue.put(item)
        except asyncio.CancelledError:
            raise  # the consumer is gone: a put now would wait forever on a full queue
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await queue.put(exc)  # the consumer reads it, or stops and cancels this wait
            return
        await queue.put(None)

    task = asyncio.create_task(produce())
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()
        while not queue.empty():  # free the pages nobody will write, and any put waiting for room
            queue.get_nowait()
        # Collect the producer so no exception is left unobserved; cancelled, it ends at its next await.
        await asyncio.gather(task, return_exceptions=True)


class Ingestor:
    """Ingests jobs with a shared Fetcher (one client, one limiter) and a Store."""

    def __init__(self, fetcher: Fetcher, store: Store, *, prefetch_pages: int = 2,
                 decoder: PageDecoder | None = None, clock: Callable[[], float] = time.monotonic,
                 watchdog: Watchdog | None = None, max_identical_failures: int = 5) -> None:
        self.fetcher = fetcher
        self.store = store
        self.prefetch_pages = prefetch_pages
        self.max_identical_failures = max_identical_failures
        # Inline by default; the runtime hands in a process pool (and closes it) when a core is spare.
        self.decoder = decoder or PageDecoder(0)
        self._clock = clock
        self.watchdog = watchdog

    async def _attempt(self, ref: JobRef, skip_since_ms: int | None = None) -> JobOutcome:
        # The writer's lock would refuse this job anyway: find out before the first Get* spends quota.
        if await self.store.locked_elsewhere(ref.job_id):
            raise JobBusy(f"job {ref.job_id} is being written by another process")
        # A deleted or expired job is not fetched again (worker/tombstones.py); the writer checks again.
        if (stone := await self.store.tombstone(ref.job_id)) is not None:
            raise stone
        seq = 0
        archive = self.store.archive_raw_pages
        # The key of this attempt's rows: the decoder writes it into every row tuple it builds.
        ingest_id = await self.store.new_ingest_id()

        async def decode(raw: bytes, _number: int) -> tuple[DecodedPage, str | None, str | None]:
            nonlocal seq
            # Decoding, normalizing and compressing run on another core; pages are sequential
            # (each NextToken comes from the page before), so ``seq`` is known here.
            page = await self.decoder.decode(raw, ref.api, ingest_id, seq, archive)
            if page.unknown:
                unknown_values.report(page.unknown)
            if page.rows is not None:
                seq += page.rows.elements
            progress()  # a page fetched
            return page, page.meta.job_status, page.meta.next_token

        pages = self.fetcher.decoded_pages(ref.api, ref.job_id, decode)
        try:
            first = await anext(pages)
            meta = first.meta
            if meta.job_tag is not None and ref.job_tag is None:
                structlog.contextvars.bind_contextvars(job_tag=meta.job_tag[:256])
            if meta.job_status == "FAILED":
                reason = meta.status_message or "Rekognition reported the job FAILED"
                await self.store.record_failure(ref, code="JobFailed", reason=reason, meta=meta,
                                                rekognition_failed=True)
                return JobOutcome(ref.job_id, ref.api.value, "failed", pages=1, reason=reason)
            if meta.response_job_id is not None and meta.response_job_id != ref.job_id:
                raise PermanentJobError(
                    f"response JobId {meta.response_job_id!r} differs from the requested job", code="MalformedPage"
                )
            held = [first]
            del first  # the writer drops the page once written: memory stays bounded by the prefetch depth
            try:
                c = await self._write(ref, meta, held, pages, skip_since_ms, ingest_id)
            except AlreadyIngested:
                return JobOutcome(ref.job_id, ref.api.value, "duplicate",
                                  reason="ingested by another process meanwhile")
        finally:
            await pages.aclose()
        for table, n in (("faces", c.faces), ("landmarks", c.landmarks), ("emotions", c.emotions),
                         ("face_matches", c.face_matches), ("collection_faces", c.collection_faces)):
            metrics.ROWS.labels(table).inc(n)
        return JobOutcome(ref.job_id, ref.api.value, "ingested", pages=c.pages, faces=c.faces,
                          persons=c.persons, matches=c.face_matches, rows=c.rows)

    async def _write(self, ref: JobRef, meta: JobMeta, held: list[DecodedPage],
                     pages: AsyncIterator[DecodedPage], skip_since_ms: int | None, ingest_id: int) -> WriteCounts:
        """All pages of one job under ``ingest_id``, a short transaction each; the job switches to them at the
        end. Returns what was written."""
        last_meta = meta
        async with self.store.job_writer(ref, skip_if_ingested_since_ms=skip_since_ms,
                                         ingest_id=ingest_id) as writer:
            # aclosing: a failed write must stop the prefetching task at once, not at GC time.
            async with aclosing(_prefetch(_chain(held.pop(), pages), self.prefetch_pages)) as stream:
                async for page in stream:
                    if page.rows is None:
                        raise PermanentJobError(f"a later page says JobStatus {page.meta.job_status}",
                                                code="MalformedPage")
                    try:
                        await writer.write_page(page.rows, page.archived)
                    except (OverflowError, ValueError, UnicodeEncodeError) as exc:
                        # asyncpg could not encode a value the normalizer let through: the page, not
                        # the database, is at fault, and it would fail the same way every time.
                        raise PermanentJobError(f"rows of this page cannot be stored: {type(exc).__name__}: "
                                                f"{str(exc)[:300]}", code="UnstorableValue") from exc
                    last_meta = page.meta
                    progress()  # a page written
            await writer.finish(merge_meta(meta, last_meta))
        return writer.counts

    async def ingest(self, ref: JobRef, *, skip_if_ingested_since_ms: int | None = None) -> JobOutcome:
        """Ingest ``ref``. Never raises for a job's own problems: the outcome says what happened.

        Transient problems (throttling that outlasts retries, database down, another writer) give
        outcome ``transient``/``busy`` and leave nothing behind; the caller decides when to retry.
        """
        started = self._clock()
        # bound_contextvars restores the caller's bindings afterwards (unbind would erase them). The
        # JobTag (the user's own key) comes from the notification, or from the first page of a backfill.
        with structlog.contextvars.bound_contextvars(job_id=ref.job_id, api=ref.api.value, job_tag=ref.job_tag):
            metrics.IN_FLIGHT.inc()
            watch = self.watchdog.watch(ref.job_id) if self.watchdog is not None else None
            try:
                with watch or contextlib.nullcontext():
                    outcome = await self._ingest(ref, skip_if_ingested_since_ms)
                if watch is not None and watch.cancel_requested and not outcome.ok:
                    # The watchdog's cancellation came out as another error (a rollback on a dead
                    # connection replaces it): the stall is what happened to the job.
                    outcome = await self._count_stall(ref, JobStalled(watch.stall_reason()), outcome.reason)
            except JobStalled as exc:  # cancelled by the watchdog: nothing was committed, retry later
                outcome = await self._count_stall(ref, exc)
            finally:
                metrics.IN_FLIGHT.dec()
            outcome.seconds = round(self._clock() - started, 3)
            metrics.JOBS.labels(ref.api.value, outcome.outcome).inc()
            metrics.JOB_SECONDS.observe(outcome.seconds)
            log.info("job finished", outcome=outcome.outcome, pages=outcome.pages, faces=outcome.faces,
                     persons=outcome.persons, matches=outcome.matches, rows=outcome.rows,
                     seconds=outcome.seconds, reason=outcome.reason)
        return outcome

    async def _count_stall(self, ref: JobRef, stall: JobStalled, then: str | None = None) -> JobOutcome:
        """A stall is a failure of the job like any other: counted toward MAX_IDENTICAL_FAILURES, so a job
        that stalls on every attempt ends failed instead of being handed back forever."""
        outcome = await self.count_failure(ref, stall, "transient")
        if then and outcome.outcome == "transient":
            outcome.reason = f"{outcome.reason}; then {then}"[:1000]
        return outcome

    async def _give_up(self, ref: JobRef, exc: PermanentJobError) -> JobOutcome:
        """Record ``exc`` (quarantining the pages), watched when no watch runs yet (after a stall, or for the
        SQS worker's own errors): a stall there records the job failed without its pages, so giving up ends."""
        if self.watchdog is None or watching():
            return await self._record_permanent(ref, exc)
        try:
            with self.watchdog.watch(ref.job_id):
                return await self._record_permanent(ref, exc)
        except JobStalled as stall:
            reason = f"{exc.reason}; archiving its pages stalled: {stall}"[:1000]
            return await self._record_permanent(ref, PermanentJobError(reason, code=exc.code), quarantine=False)

    async def _ingest(self, ref: JobRef, skip_since_ms: int | None) -> JobOutcome:
        name = ref.api.value
        try:
            if skip_since_ms is not None and await self.store.ingested_since(ref.job_id, skip_since_ms):
                return JobOutcome(ref.job_id, name, "duplicate", reason="already ingested after this notification")
            for restart in range(MAX_RESTARTS + 1):
                try:
                    return await self._attempt(ref, skip_since_ms)
                except RestartJob as exc:
                    log.warning("pagination token rejected; restarting job from its first page",
                                restart=restart + 1, error=str(exc))
            raise TransientError(f"pagination token rejected {MAX_RESTARTS + 1} times")
        except JobNotReady as exc:
            return JobOutcome(ref.job_id, name, "not_ready", reason=str(exc))
        except (JobBusy, Tombstoned) as exc:  # another writer now; or deleted, not to be ingested again
            return JobOutcome(ref.job_id, name, "busy" if isinstance(exc, JobBusy) else "tombstoned", reason=str(exc))
        except PermanentJobError as exc:
            return await self._record_permanent(ref, exc)
        except InvalidInput as exc:
            return JobOutcome(ref.job_id, name, "invalid", reason=str(exc))
        except (InfrastructureError, TimeoutError, OSError) as exc:
            return await self._outage(ref, str(exc) if isinstance(exc, InfrastructureError)
                                      else f"{type(exc).__name__}: {exc}",
                                      credentials_error=isinstance(exc, CredentialsError))
        except TransientError as exc:
            return await self.count_failure(ref, exc, "transient")
        except Exception as exc:
            # asyncpg/SQLAlchemy errors: database unreachable or restarted (retry later), or data the
            # database refuses every time (record the job as failed rather than retry it forever).
            if _is_permanent_data_error(exc):
                return await self._record_permanent(
                    ref, PermanentJobError(f"database refused the job's rows: {exc}"[:500], code="UnstorableValue"))
            if _is_database_error(exc):
                # Not noted in job_retries: that is the database that is down.
                return JobOutcome(ref.job_id, name, "transient", reason=f"database: {type(exc).__name__}: {exc}")
            log.exception("unexpected error while ingesting a job")
            return await self.count_failure(ref, exc, "error")

    async def _outage(self, ref: JobRef, reason: str, *, credentials_error: bool = False) -> JobOutcome:
        """An outage (throttling, faults, network, credentials): retried without end, never held against the job."""
        try:
            await self.store.note_outage(ref, reason[:500])
        except Exception as db_exc:  # only shown in job_retries; the outcome is the same either way
            log.debug("could not note the outage in job_retries", error=f"{type(db_exc).__name__}: {db_exc}")
        return JobOutcome(ref.job_id, ref.api.value, "transient", reason=reason, credentials_error=credentials_error)

    async def count_failure(self, ref: JobRef, exc: BaseException, outcome: str = "error") -> JobOutcome:
        """Count an attempt of ``ref`` that ended with the job's own ``exc`` (not an outage).

        The same error on ``max_identical_failures`` attempts in a row records the job failed
        (``RepeatedFailure``, its pages quarantined where Rekognition still returns them); before that
        the outcome is ``outcome`` and job_retries shows the streak. The SQS worker calls this for
        unexpected errors outside the ingestor, so both paths count alike.
        """
        reason = (str(exc) if isinstance(exc, TransientError) else f"{type(exc).__name__}: {exc}")[:500]
        try:
            streak = await self.store.count_failure(ref, fingerprint=failure_fingerprint(exc), reason=reason)
        except Exception as db_exc:  # the database is unreachable: not counted, retried like any outage
            if not (_is_database_error(db_exc) or isinstance(db_exc, OSError)):
                raise
            return JobOutcome(ref.job_id, ref.api.value, "transient",
                              reason=f"{reason}; counting it failed: {type(db_exc).__name__}: {db_exc}"[:1000])
        if streak >= self.max_identical_failures:
            log.warning("the same error on every attempt: giving up on the job", identical_failures=streak,
                        error=reason)
            return await self._give_up(ref, PermanentJobError(
                f"the same error on {streak} attempts in a row: {reason}", code="RepeatedFailure"))
        return JobOutcome(ref.job_id, ref.api.value, outcome, reason=reason, extra={"identical_failures": streak})

    async def _record_permanent(self, ref: JobRef, exc: PermanentJobError, *, quarantine: bool = True) -> JobOutcome:
        name = ref.api.value
        if quarantine and exc.code in QUARANTINE_CODES and self.store.archive_raw_pages:
            return await self._quarantine(ref, exc)
        try:
            await self.store.record_failure(ref, code=exc.code, reason=exc.reason)
        except Exception as db_exc:  # the database itself is unreachable: retry the job later
            return JobOutcome(ref.job_id, name, "transient", reason=f"{exc.reason}; recording it failed: {db_exc}")
        return JobOutcome(ref.job_id, name, "failed", reason=exc.reason)

    async def _quarantine(self, ref: JobRef, exc: PermanentJobError) -> JobOutcome:
        """Record ``ref`` failed with its raw pages archived under a key of their own.

        The failed attempt's rows are under a key no job names (dropped by the quarantine), and keeping
        its pages in memory would not be bounded (thousands of ~3.5 MB pages), so the pages are fetched
        again, through the limiter, without normalizing, compressed one at a time and inserted as they
        come, a short transaction each. An outage
        meanwhile leaves nothing and hands the job back (``transient``): Rekognition still has it.
        """
        name = ref.api.value
        try:
            async with self.store.quarantine(ref) as quarantine:
                stopped = None if quarantine.keeps_earlier_ingest else await self._archive_raw(ref, quarantine)
                reason = exc.reason
                if quarantine.pages:
                    reason += f" [{quarantine.pages} raw pages kept for reprocess"
                    reason += f"; archive incomplete: {stopped}]" if stopped else "]"
                await quarantine.finish(code=exc.code, reason=reason)
        except JobBusy as busy:
            return JobOutcome(ref.job_id, name, "busy", reason=f"{exc.reason}; {busy}")
        except Tombstoned as stone:
            return JobOutcome(ref.job_id, name, "tombstoned", reason=str(stone))
        except JobNotReady as not_ready:
            return JobOutcome(ref.job_id, name, "not_ready", reason=f"{exc.reason}; {not_ready}")
        except (InfrastructureError, TimeoutError, OSError) as outage:
            return JobOutcome(ref.job_id, name, "transient",
                              reason=f"{exc.reason}; archiving its pages met an outage: {outage}"[:1000])
        except Exception as db_exc:
            if not _is_database_error(db_exc):
                raise
            return JobOutcome(ref.job_id, name, "transient", reason=f"{exc.reason}; recording it failed: {db_exc}")
        log.warning("job failed; its raw pages are kept for reprocess", code=exc.code, raw_pages=quarantine.pages,
                    archive_incomplete=stopped)
        return JobOutcome(ref.job_id, name, "failed", pages=quarantine.pages, reason=reason)

    async def _archive_raw(self, ref: JobRef, quarantine: Quarantine) -> str | None:
        """Fetch and archive the job's raw pages; None when the last one had no NextToken, else why it stopped.

        The pages are not normalized (that is what failed). A token loop or page cap stops at the page
        that showed it; so does the job's own error (the reason it is being given up, perhaps).
        """

        async def archive(raw: bytes, _number: int) -> tuple[ArchivedPage, str | None, str | None]:
            status, token = page_links(raw)
            # zstd releases the GIL: compressing a 3.5 MB page off the loop keeps it free for the others.
            compressed = await asyncio.to_thread(ArchivedPage.compress, raw)
            progress()  # a page fetched: a long quarantine is not a stalled one
            return compressed, status, token

        try:
            async with aclosing(self.fetcher.decoded_pages(ref.api, ref.job_id, archive)) as pages:
                async for page in pages:
                    await quarantine.add_page(page)
                    progress()  # a page written
        except (PermanentJobError, RestartJob) as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        except TransientError as exc:
            if isinstance(exc, InfrastructureError):
                raise
            return f"{type(exc).__name__}: {exc}"[:300]
        return None

    async def ingest_many(self, refs: Iterable[JobRef], *, concurrency: int,
                          on_done: Callable[[JobOutcome], None] | None = None) -> list[JobOutcome]:
        """Ingest jobs with at most ``concurrency`` in flight; results in input order."""
        sem = asyncio.Semaphore(concurrency)

        async def one(ref: JobRef) -> JobOutcome:
            async with sem:
                outcome = await self.ingest(ref)
            if on_done is not None:
                on_done(outcome)
            return outcome

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(ref)) for ref in refs]
        return [t.result() for t in tasks]


def page_links(raw: bytes) -> tuple[str | None, str | None]:
    """JobStatus and NextToken of a raw page, without validating the rest (None where unreadable)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    status, token = body.get("JobStatus"), body.get("NextToken")
    return (status if isinstance(status, str) else None), (token if isinstance(token, str) and token else None)


def failure_fingerprint(exc: BaseException) -> str:
    """What makes two failures "the same error": the type and the message, numbers and ids blanked."""
    message = re.sub(r"[0-9a-fA-F]{8}(-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}|\d+", "#", str(exc))
    return f"{type(exc).__name__}: {message}"[:300]


def merge_meta(first: JobMeta, last: JobMeta) -> JobMeta:
    """Job-level members repeat on every page; prefer the last page's, fall back to the first's."""
    values = {k: getattr(last, k) if getattr(last, k) is not None else getattr(first, k)
              for k in JobMeta.__dataclass_fields__}
    values["next_token"] = None
    return JobMeta(**values)


# SQLSTATE classes that fail the same way on every try: data exception, integrity constraint
# violation, program limit exceeded (e.g. an index row too large).
_PERMANENT_SQLSTATE_CLASSES = ("22", "23", "54")


def _is_permanent_data_error(exc: BaseException) -> bool:
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(exc, asyncpg.PostgresError) and isinstance(sqlstate, str) and \
        sqlstate[:2] in _PERMANENT_SQLSTATE_CLASSES


def _is_database_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith(("asyncpg", "sqlalchemy"))
