"""`reprocess` rebuilds a job's rows identically from the raw page archive, without AWS."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest
import zstandard

from tests.conftest import unique_job_id
from tests.helpers import dump_job, runtime
from tests.test_cli import run_cli
from worker.config import Settings
from worker.local import synth
from worker.messages import JobRef
from worker.reprocess import run_reprocess


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_reprocess_rebuilds_identical_rows_with_aws_unreachable(
    emulator: Any, settings: Settings, db: asyncpg.Connection, db_url: str
) -> None:
    det = synth.detection_job(unique_job_id("rp-det"), faces=2200, attributes="ALL", all_optional=True)
    srch = synth.search_job(unique_job_id("rp-search"), persons_elements=1300, all_optional=True)
    emulator.add_jobs([det, srch])
    async with runtime(settings) as rt:
        for fx in (det, srch):
            assert (await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))).outcome == "ingested"
    before = {fx.job_id: await dump_job(db, fx.job_id) for fx in (det, srch)}
    # Damage the normalized rows (as a normalization bug would), then rebuild from the archive.
    await db.execute("DELETE FROM landmarks WHERE "
                     "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1)", det.job_id)
    await db.execute("UPDATE faces SET confidence = -1 WHERE "
                     "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1)", srch.job_id)
    result = run_cli("reprocess", det.job_id, srch.job_id, env={
        "DATABASE_URL": db_url, "AWS_ENDPOINT_URL_REKOGNITION": "http://127.0.0.1:1"})
    assert result.returncode == 0, result.stderr
    for fx in (det, srch):
        assert await dump_job(db, fx.job_id) == before[fx.job_id]


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_reprocess_all_and_unknown_jobs(emulator: Any, settings: Settings, db: asyncpg.Connection) -> None:
    fx = synth.detection_job(unique_job_id("rp-all"), faces=300)
    emulator.add_job(fx)
    async with runtime(settings) as rt:
        await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))
    before = await dump_job(db, fx.job_id)
    outcomes = await run_reprocess(settings, None)
    assert [o.job_id for o in outcomes] == [fx.job_id] and outcomes[0].outcome == "ingested"
    assert await dump_job(db, fx.job_id) == before
    missing = await run_reprocess(settings, ["never-seen-job"])
    assert missing[0].outcome == "failed" and "no such job" in (missing[0].reason or "")


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_job_without_archive_cannot_be_reprocessed(emulator: Any, settings: Settings) -> None:
    fx = synth.detection_job(unique_job_id("rp-noarchive"), faces=50)
    emulator.add_job(fx)
    async with runtime(settings.with_(archive_raw_pages=False)) as rt:
        await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))
    outcome = (await run_reprocess(settings, [fx.job_id]))[0]
    assert outcome.outcome == "failed" and "no archived pages" in (outcome.reason or "")


async def _ingest_all(settings: Settings, emulator: Any, fixtures: list[synth.JobFixture]) -> None:
    emulator.add_jobs(fixtures)
    async with runtime(settings) as rt:
        for fx in fixtures:
            assert (await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))).outcome == "ingested"


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_corrupt_page_fails_its_job_only_and_keeps_archive_and_rows(
    emulator: Any, settings: Settings, db: asyncpg.Connection, db_url: str
) -> None:
    # Sorted by job_id, as --all visits them: the corrupt job is in the middle.
    first, middle, last = (synth.detection_job(unique_job_id(f"rp-corrupt-{i}"), faces=150) for i in (1, 2, 3))
    await _ingest_all(settings.with_(page_size=100), emulator, [first, middle, last])
    # Truncate the middle job's second page: its first page is rebuilt before the failure shows.
    await db.execute("UPDATE raw_pages SET body = substring(body FROM 1 FOR 1000) WHERE "
                     "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1) AND page_no = 1",
                     middle.job_id)
    before = {fx.job_id: await dump_job(db, fx.job_id) for fx in (first, middle, last)}
    for fx in (first, last):
        await db.execute("DELETE FROM landmarks WHERE "
                         "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1)", fx.job_id)

    result = run_cli("reprocess", "--all", env={"DATABASE_URL": db_url})

    assert result.returncode == 1, result.stderr
    for fx in (first, last):
        assert await dump_job(db, fx.job_id) == before[fx.job_id]
    after = await dump_job(db, middle.job_id)
    # Rows of the earlier complete ingest and every raw page, the damaged one included, are kept.
    assert {t: rows for t, rows in after.items() if t != "jobs"} == \
        {t: rows for t, rows in before[middle.job_id].items() if t != "jobs"}
    assert len(after["raw_pages"]) == 2
    job = await db.fetchrow("SELECT * FROM jobs WHERE job_id = $1", middle.job_id)
    assert job["ingest_state"] == "ingested" and job["failure_code"] == "CorruptArchive"
    assert "archived page 1" in job["failure_reason"] and job["faces"] == 150
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [(e["job_id"], e["outcome"], e["level"]) for e in logged if e["event"] == "job reprocessed"] == [
        (first.job_id, "ingested", "info"), (middle.job_id, "failed", "error"), (last.job_id, "ingested", "info")]
    [error] = [e for e in logged if e["event"] == "job error"]
    assert error["job_id"] == middle.job_id and error["error"].startswith("CorruptArchive: archived page 1")


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_named_jobs_go_on_past_a_decompression_bomb(
    emulator: Any, settings: Settings, db: asyncpg.Connection
) -> None:
    bombed, fine = (synth.detection_job(unique_job_id(f"rp-bomb-{i}"), faces=200) for i in (1, 2))
    await _ingest_all(settings, emulator, [bombed, fine])
    bomb = zstandard.ZstdCompressor(level=1).compressobj(size=256 << 20)
    body = b"".join([*(bomb.compress(b"\0" * (1 << 20)) for _ in range(256)), bomb.flush()])
    await db.execute("UPDATE raw_pages SET body = $2 WHERE "
                     "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1)", bombed.job_id, body)
    raw_before = await db.fetch("SELECT * FROM raw_pages WHERE "
                                "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1)", bombed.job_id)

    outcomes = await run_reprocess(settings, [bombed.job_id, fine.job_id])

    assert [(o.job_id, o.outcome) for o in outcomes] == [(bombed.job_id, "failed"), (fine.job_id, "ingested")]
    assert "decompresses to more than the recorded" in (outcomes[0].reason or "")
    assert outcomes[0].extra == {"kept_previous_ingest": True}
    assert await db.fetch("SELECT * FROM raw_pages WHERE "
                          "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1)", bombed.job_id) == raw_before
    assert await db.fetchval("SELECT count(*) FROM faces WHERE "
                             "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1)", bombed.job_id) == 200
