"""`reprocess` rebuilds a job's rows identically from the raw page archive, without AWS."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

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
    await db.execute("DELETE FROM landmarks WHERE job_id = $1", det.job_id)
    await db.execute("UPDATE faces SET confidence = -1 WHERE job_id = $1", srch.job_id)
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
