"""`reprocess`: rebuild a job's normalized rows from its raw page archive, without calling AWS.

Rekognition keeps results for 7 days; the archive keeps them as long as the rows. A schema change
or a normalization fix is applied to old jobs by reprocessing them. Each job is rebuilt under a new key,
exactly as an ingest writes it, and switched to at the end, so readers never see a half-rebuilt job. A job whose
archive cannot be read back (CorruptArchive) or normalized is recorded failed and skipped; its raw
pages and its rows from the last complete ingest stay as they were.
"""

from __future__ import annotations

import time

import structlog

from worker import pagecopy, unknown_values
from worker.archive import CorruptArchive
from worker.config import Settings
from worker.db.engine import create_engine
from worker.db.store import JobBusy, Store, WriteCounts
from worker.errors import ErasureKeyMissing, PermanentJobError
from worker.ingest import JobOutcome, merge_meta
from worker.logs import get_logger
from worker.messages import JobRef, validate_job_id
from worker.normalize import JobMeta
from worker.tombstones import Tombstoned

log = get_logger(__name__)


async def _rebuild(store: Store, ref: JobRef) -> WriteCounts:
    """All of ``ref``'s rows from its archived pages under a new key; any error leaves the job as it was."""
    async with store.job_writer(ref, from_archive=True) as writer:
        numbers = await writer.archived_page_numbers()
        if not numbers:
            raise LookupError(f"job {ref.job_id} has no archived pages")
        seq = 0
        first: JobMeta | None = None
        last: JobMeta | None = None
        for page_no in numbers:
            archived = await writer.archived_page(page_no)
            try:
                # Every archived page has rows to rebuild, whatever its JobStatus says.
                meta, rows, unknown = pagecopy.decode(archived.decompress(), ref.api, writer.ingest_id, seq,
                                                      any_status=True)
            except CorruptArchive as exc:
                raise CorruptArchive(f"archived page {page_no}: {exc.reason}") from exc
            except pagecopy.NotJson as exc:
                raise CorruptArchive(f"archived page {page_no} is not JSON: {exc.reason}") from exc
            del archived
            assert rows is not None
            if first is None:
                first = meta
            if unknown:
                unknown_values.report(unknown)
            seq += rows.elements
            last = meta
            await writer.write_page(rows)
        assert first is not None and last is not None
        if last.next_token is not None:
            # Quarantined pages of a token loop, or of a fetch that stopped early: not the whole job.
            raise LookupError(f"the archive of job {ref.job_id} is incomplete: its last page has a NextToken")
        await writer.finish(merge_meta(first, last))
        return writer.counts


async def reprocess_job(store: Store, ref: JobRef) -> JobOutcome:
    """Rebuild ``ref`` from raw_pages; the archive itself is left untouched.

    Never raises for the job's own problems. An archive that cannot be rebuilt from (a corrupt or
    malformed page) records the job failed, keeping its raw pages and any complete earlier ingest.
    Infrastructure errors (the database gone) propagate: no later job could do better.
    """
    started = time.monotonic()
    with structlog.contextvars.bound_contextvars(job_id=ref.job_id, api=ref.api.value):
        try:
            counts = await _rebuild(store, ref)
        except PermanentJobError as exc:
            kept = not await store.record_failure(ref, code=exc.code, reason=exc.reason, keep_archive=True)
            outcome = JobOutcome(ref.job_id, ref.api.value, "failed", reason=f"{exc.code}: {exc.reason}",
                                 extra={"kept_previous_ingest": kept})
        except LookupError as exc:
            outcome = JobOutcome(ref.job_id, ref.api.value, "failed", reason=f"{type(exc).__name__}: {exc}")
        except JobBusy as exc:
            outcome = JobOutcome(ref.job_id, ref.api.value, "busy", reason=str(exc))
        except (ErasureKeyMissing, Tombstoned) as exc:
            outcome = JobOutcome(ref.job_id, ref.api.value,
                                 "transient" if isinstance(exc, ErasureKeyMissing) else "tombstoned", reason=str(exc))
        else:
            outcome = JobOutcome(ref.job_id, ref.api.value, "ingested", pages=counts.pages, faces=counts.faces,
                                 persons=counts.persons, matches=counts.face_matches, rows=counts.rows)
        outcome.seconds = round(time.monotonic() - started, 3)
        (log.info if outcome.ok else log.error)(
            "job reprocessed", outcome=outcome.outcome, pages=outcome.pages, faces=outcome.faces,
            rows=outcome.rows, seconds=outcome.seconds, reason=outcome.reason, **outcome.extra)
    return outcome


async def run_reprocess(settings: Settings, job_ids: list[str] | None) -> list[JobOutcome]:
    """Reprocess the named jobs (or, with None, every archived job) one after another.

    One job's failure never stops the others; the outcomes say which failed.
    """
    engine = create_engine(settings, pool_size=2)
    store = Store(engine, archive_raw_pages=settings.archive_raw_pages, erasure_key=settings.erasure_hash_key)
    try:
        if job_ids is None:
            targets = [JobRef.create(job_id, api) for job_id, api in await store.archived_jobs()]
            unknown: list[JobOutcome] = []
        else:
            targets, unknown = [], []
            for job_id in job_ids:
                validate_job_id(job_id)
                row = await store.job(job_id)
                if row is None:
                    unknown.append(JobOutcome(job_id, "?", "failed", reason="no such job in the database"))
                else:
                    targets.append(JobRef.create(job_id, row["api"]))
        return [*[await reprocess_job(store, ref) for ref in targets], *unknown]
    finally:
        await engine.dispose()
