"""`reprocess`: rebuild a job's normalized rows from its raw page archive, without calling AWS.

Rekognition keeps results for 7 days; the archive keeps them as long as the rows. A schema change
or a normalization fix is applied to old jobs by reprocessing them. Each job is rebuilt in one
transaction, exactly as an ingest writes it, so readers never see a half-rebuilt job.
"""

from __future__ import annotations

import time

import orjson

from worker.config import Settings
from worker.db.engine import create_engine
from worker.db.store import JobBusy, Store
from worker.errors import MalformedPage
from worker.ingest import JobOutcome, merge_meta
from worker.logs import get_logger
from worker.messages import JobRef, validate_job_id
from worker.normalize import JobMeta, normalize_page, parse_meta

log = get_logger(__name__)


async def reprocess_job(store: Store, ref: JobRef) -> JobOutcome:
    """Rebuild ``ref`` from raw_pages; the archive itself is left untouched."""
    started = time.monotonic()
    try:
        async with store.job_writer(ref, from_archive=True) as writer:
            numbers = await writer.archived_page_numbers()
            if not numbers:
                raise LookupError(f"job {ref.job_id} has no archived pages")
            seq = 0
            first: JobMeta | None = None
            last: JobMeta | None = None
            for page_no in numbers:
                archived = await writer.archived_page(page_no)
                body = orjson.loads(archived.decompress())
                del archived
                if first is None:
                    first = parse_meta(body)
                rows = normalize_page(body, ref.api, ref.job_id, seq)
                del body
                seq += rows.elements
                last = rows.meta
                await writer.write_page(rows)
            assert first is not None and last is not None
            if last.next_token is not None:
                # Quarantined pages of a token loop, or of a fetch that stopped early: not the whole job.
                raise LookupError(f"the archive of job {ref.job_id} is incomplete: its last page has a NextToken")
            await writer.finish(merge_meta(first, last))
            counts = writer.counts
    except (LookupError, MalformedPage, JobBusy, orjson.JSONDecodeError, ValueError) as exc:
        outcome = JobOutcome(ref.job_id, ref.api.value, "failed", reason=f"{type(exc).__name__}: {exc}")
    else:
        outcome = JobOutcome(ref.job_id, ref.api.value, "ingested", pages=counts.pages, faces=counts.faces,
                             matches=counts.face_matches, rows=counts.rows)
    outcome.seconds = round(time.monotonic() - started, 3)
    log.info("job reprocessed", job_id=ref.job_id, outcome=outcome.outcome, pages=outcome.pages,
             faces=outcome.faces, rows=outcome.rows, seconds=outcome.seconds, reason=outcome.reason)
    return outcome


async def run_reprocess(settings: Settings, job_ids: list[str] | None) -> list[JobOutcome]:
    """Reprocess the named jobs (or, with None, every archived job) one after another."""
    engine = create_engine(settings, pool_size=2)
    store = Store(engine, archive_raw_pages=settings.archive_raw_pages)
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
