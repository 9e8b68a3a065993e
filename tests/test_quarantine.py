"""Nothing Rekognition returned is lost: a job that cannot be stored keeps its raw pages (quarantine), a
pagination loop ends the job instead of running on, and the same job error on every attempt ends it after
MAX_IDENTICAL_FAILURES attempts, while outages never count. Real PostgreSQL, the emulator over HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs
from test_service_support import make_queues, plain, queue_counts, send

from tests.conftest import unique_job_id
from tests.helpers import count_rows, dump_job, runtime
from worker import normalize, pagecodec
from worker.config import Settings
from worker.db.store import ArchivedPage
from worker.local import synth
from worker.messages import JobRef
from worker.normalize import JobMeta
from worker.pagecopy import PageCopy
from worker.reprocess import run_reprocess
from worker.runtime import open_runtime
from worker.service import RetryPolicy, SqsWorker, describe_queue

pytestmark = pytest.mark.usefixtures("rekognition_endpoint")

DEADLINE_S = 60


def _ref(fx: synth.JobFixture) -> JobRef:
    return JobRef.create(fx.job_id, fx.api)


@pytest.fixture
def small_pages(settings: Settings) -> Settings:
    # 25 results a page: small jobs still span several pages.
    return settings.with_(page_size=25)


async def _archive(db: asyncpg.Connection, job_id: str) -> list[bytes]:
    rows = await db.fetch("SELECT encoding, body, body_bytes FROM raw_pages WHERE "
                          "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1) ORDER BY page_no",
                          job_id)
    return [ArchivedPage(bytes(r["body"]), r["body_bytes"], r["encoding"]).decompress() for r in rows]


def _refused_search_job(prefix: str) -> synth.JobFixture:
    """A 3-page search job whose second page carries an ExternalImageId longer than the normalizer allows."""
    fx = synth.search_job(unique_job_id(prefix), persons_elements=60)
    element = next(e for e in fx.results[30:50] if e.get("FaceMatches"))
    match = element["FaceMatches"][0]
    match["Face"] = {**match["Face"], "ExternalImageId": "x" * (normalize._MAX_KEY_CHARS + 88)}
    return fx


async def test_unstorable_job_keeps_its_raw_pages_and_reprocess_recovers_it_after_the_fix(
        emulator: Any, small_pages: Settings, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    fx = _refused_search_job("quarantine")
    emulator.add_job(fx)
    async with asyncio.timeout(DEADLINE_S), runtime(small_pages) as rt:
        outcome = await rt.ingestor.ingest(_ref(fx))
        served = [page.raw async for page in rt.fetcher.pages(_ref(fx).api, fx.job_id)]
    assert outcome.outcome == "failed" and "ExternalImageId" in (outcome.reason or "")
    job = await db.fetchrow("SELECT * FROM jobs WHERE job_id = $1", fx.job_id)
    assert job["ingest_state"] == "failed" and job["failure_code"] == "MalformedPage"
    assert "3 raw pages kept for reprocess" in job["failure_reason"]
    # No row of the job, and every page byte for byte as the emulator served it.
    counts = await count_rows(db, fx.job_id)
    assert counts == {**{t: 0 for t in counts}, "jobs": 1, "raw_pages": 3}
    assert len(served) == 3 and await _archive(db, fx.job_id) == served

    # Before the fix reprocess refuses the page again, and leaves the archive as it was.
    before_fix = await run_reprocess(small_pages, None)
    assert [(o.job_id, o.outcome) for o in before_fix] == [(fx.job_id, "failed")]
    assert await _archive(db, fx.job_id) == served

    # The fix (the normalizer allows longer keys): reprocess --all rebuilds the job from its archive...
    monkeypatch.setattr(normalize, "_MAX_KEY_CHARS", 1000)
    after_fix = await run_reprocess(small_pages, None)
    assert [(o.job_id, o.outcome) for o in after_fix] == [(fx.job_id, "ingested")]
    recovered = await dump_job(db, fx.job_id)
    # ...into exactly the rows (and archive) of a clean ingest of the same results.
    async with asyncio.timeout(DEADLINE_S), runtime(small_pages) as rt:
        assert (await rt.ingestor.ingest(_ref(fx))).outcome == "ingested"
    assert await dump_job(db, fx.job_id) == recovered
    assert len(recovered["faces"]) == 60 and len(recovered["raw_pages"]) == 3


async def test_token_cycle_ends_failed_as_a_pagination_loop_with_its_pages_quarantined(
        emulator: Any, small_pages: Settings, db: asyncpg.Connection) -> None:
    fx = synth.detection_job(unique_job_id("cycle"), faces=75)  # pages 0, 1, 2
    emulator.add_job(fx)
    emulator.loop_tokens(fx.job_id, 1)  # tokens A, B, A, B, ...
    emulator.reset_stats()
    async with asyncio.timeout(DEADLINE_S), runtime(small_pages) as rt:
        outcome = await rt.ingestor.ingest(_ref(fx))
    calls = emulator.stats()["by_operation"]["GetFaceDetection"]["requests"]
    assert outcome.outcome == "failed" and calls <= 12, (outcome, calls)  # 3 pages, 3 more to quarantine them
    job = await db.fetchrow("SELECT * FROM jobs WHERE job_id = $1", fx.job_id)
    assert job["failure_code"] == "PaginationLoop" and "already seen" in job["failure_reason"]
    assert "archive incomplete" in job["failure_reason"]
    counts = await count_rows(db, fx.job_id)
    assert counts == {**{t: 0 for t in counts}, "jobs": 1, "raw_pages": 3}
    # Kept for a person to look at; reprocess cannot make a whole job of a loop.
    [again] = await run_reprocess(small_pages, [fx.job_id])
    assert again.outcome == "failed" and "incomplete" in (again.reason or "")


async def test_more_pages_than_max_pages_per_job_is_a_pagination_loop(
        emulator: Any, small_pages: Settings, db: asyncpg.Connection) -> None:
    fx = synth.detection_job(unique_job_id("pagecap"), faces=75)  # 3 pages, one more than allowed
    emulator.add_job(fx)
    async with asyncio.timeout(DEADLINE_S), runtime(small_pages.with_(max_pages_per_job=2)) as rt:
        outcome = await rt.ingestor.ingest(_ref(fx))
    assert outcome.outcome == "failed" and "MAX_PAGES_PER_JOB=2" in (outcome.reason or "")
    assert (await count_rows(db, fx.job_id))["raw_pages"] == 2


async def test_in_progress_on_a_later_page_is_not_ready_then_ingests(
        emulator: Any, small_pages: Settings, db: asyncpg.Connection) -> None:
    fx = synth.detection_job(unique_job_id("later-running"), faces=60)
    emulator.add_job(fx)
    emulator.in_progress_on_later_pages(fx.job_id, 1)
    async with asyncio.timeout(DEADLINE_S), runtime(small_pages) as rt:
        first = await rt.ingestor.ingest(_ref(fx))
        assert first.outcome == "not_ready" and "IN_PROGRESS" in (first.reason or "")
        assert await db.fetchval("SELECT count(*) FROM jobs WHERE job_id = $1", fx.job_id) == 0
        assert (await rt.ingestor.ingest(_ref(fx))).outcome == "ingested"
    assert (await count_rows(db, fx.job_id))["faces"] == 60


async def _database_outage(pg_server_url: str, db: asyncpg.Connection, *, down: bool) -> None:
    """Refuse (or accept again) connections to the test's database, dropping the worker's open ones."""
    name, keep_pid = await db.fetchval("SELECT current_database()"), db.get_server_pid()
    admin = await asyncpg.connect(pg_server_url)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {"false" if down else "true"}')
        if down:
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = $1 AND pid <> $2", name, keep_pid)
    finally:
        await admin.close()


async def test_token_rejected_on_every_restart_ends_failed_after_max_identical_failures_outages_aside(
        emulator: Any, small_pages: Settings, db: asyncpg.Connection, pg_server_url: str) -> None:
    fx = synth.detection_job(unique_job_id("rejected"), faces=60)
    emulator.add_job(fx)
    emulator.reject_tokens(fx.job_id)  # every NextToken, on every restart, forever
    settings = small_pages.with_(max_identical_failures=3)
    async with asyncio.timeout(DEADLINE_S), runtime(settings) as rt:
        for streak in (1, 2):
            outcome = await rt.ingestor.ingest(_ref(fx))
            assert outcome.outcome == "transient" and "pagination token rejected" in (outcome.reason or "")
            retry = await db.fetchrow("SELECT * FROM job_retries WHERE job_id = $1", fx.job_id)
            assert retry["streak"] == streak and "pagination token rejected" in retry["last_error"]
        # A database outage meanwhile is not the job's failure: not counted, and the streak goes on after it.
        await _database_outage(pg_server_url, db, down=True)
        try:
            outage = await rt.ingestor.ingest(_ref(fx))
        finally:
            await _database_outage(pg_server_url, db, down=False)
        assert outage.outcome == "transient" and (outage.reason or "").startswith("database")
        assert await db.fetchval("SELECT streak FROM job_retries WHERE job_id = $1", fx.job_id) == 2
        assert await db.fetchval("SELECT count(*) FROM jobs WHERE job_id = $1", fx.job_id) == 0
        last = await rt.ingestor.ingest(_ref(fx))
    assert last.outcome == "failed"
    job = await db.fetchrow("SELECT * FROM jobs WHERE job_id = $1", fx.job_id)
    assert job["ingest_state"] == "failed" and job["failure_code"] == "RepeatedFailure"
    assert "the same error on 3 attempts in a row" in job["failure_reason"]
    assert "pagination token rejected" in job["failure_reason"]
    # The job is finished: no longer listed as retrying; the first page, all Rekognition would give, is kept.
    assert await db.fetchval("SELECT count(*) FROM job_retries WHERE job_id = $1", fx.job_id) == 0
    assert (await count_rows(db, fx.job_id))["raw_pages"] == 1


async def test_a_different_error_starts_a_new_streak_and_an_ingest_clears_it(
        emulator: Any, small_pages: Settings, db: asyncpg.Connection) -> None:
    fx = synth.detection_job(unique_job_id("streak"), faces=60)
    emulator.add_job(fx)
    settings = small_pages.with_(max_identical_failures=2)
    async with asyncio.timeout(DEADLINE_S), runtime(settings) as rt:
        emulator.reject_tokens(fx.job_id)
        assert (await rt.ingestor.ingest(_ref(fx))).outcome == "transient"
        fx.error = "UnknownNewException"  # an unknown 4xx: also the job's own, but another error
        emulator.add_job(fx)
        assert (await rt.ingestor.ingest(_ref(fx))).outcome == "transient"
        retry = await db.fetchrow("SELECT * FROM job_retries WHERE job_id = $1", fx.job_id)
        assert retry["streak"] == 1 and retry["failures"] == 2 and "UnknownNewException" in retry["last_error"]
        fx.error = None
        emulator.add_job(fx)
        assert (await rt.ingestor.ingest(_ref(fx))).outcome == "ingested"
    assert await db.fetchval("SELECT count(*) FROM job_retries WHERE job_id = $1", fx.job_id) == 0


@pytest.mark.parametrize("trouble", ["token-rejected", "ingest-bug", "handler-bug"])
async def test_the_sqs_worker_ends_a_job_that_fails_the_same_way_every_time(
        trouble: str, emulator: Any, small_pages: Settings, sqs: Any, db: asyncpg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each delivery is one attempt: the second identical failure (MAX_IDENTICAL_FAILURES=2) records the job
    failed and deletes the message, whether the error came from Rekognition, from inside the ingestor or from
    the message handler itself (service.py's generic except)."""
    fx = synth.detection_job(unique_job_id(trouble), faces=60)
    emulator.add_job(fx)
    body = plain(fx)
    if trouble == "token-rejected":
        emulator.reject_tokens(fx.job_id)
    elif trouble == "ingest-bug":
        real = pagecodec.decode

        def buggy(raw: bytes, api: Any, ingest_id: int, seq_start: int) -> tuple[JobMeta, PageCopy | None, Any]:
            if seq_start > 0:  # this test's only job
                raise RuntimeError("a bug in this version, hit by the second page")
            return real(raw, api, ingest_id, seq_start)

        monkeypatch.setattr(pagecodec, "decode", buggy)
    else:
        async def buggy_note(self: SqsWorker, ref: JobRef) -> None:
            raise RuntimeError("a bug in the handler")

        monkeypatch.setattr(SqsWorker, "_note_pending", buggy_note)
    queues = await make_queues(sqs, visibility_timeout_s=2, max_receive_count=3)
    settings = small_pages.with_(queue_url=queues.url, poll_wait_s=1, visibility_timeout_s=2,
                                 heartbeat_interval_s=0.5, shutdown_grace_s=5.0, health_port=0,
                                 max_identical_failures=2)
    await send(sqs, queues.url, body)
    # Captured, not rendered: the development console renders a traceback with every local (whole pages).
    with capture_logs():
        async with asyncio.timeout(DEADLINE_S), open_runtime(settings) as rt:
            worker = SqsWorker(settings, rt, sqs, await describe_queue(sqs, queues.url),
                               retry_policy=RetryPolicy(transient_base_s=1, transient_cap_s=1))
            assert await worker.run(exit_when_idle=True) == 0
    first = "transient" if trouble == "token-rejected" else "error"
    assert worker.counters.by_outcome == {first: 1, "failed": 1}
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)
    job = await db.fetchrow("SELECT * FROM jobs WHERE job_id = $1", fx.job_id)
    assert job["ingest_state"] == "failed" and job["failure_code"] == "RepeatedFailure"
    assert "the same error on 2 attempts in a row" in job["failure_reason"]
    # Where Rekognition serves the whole job, all of it is kept for reprocess.
    assert (await count_rows(db, fx.job_id))["raw_pages"] == (1 if trouble == "token-rejected" else 3)
