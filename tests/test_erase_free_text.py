"""`erase` reaches free text too: an identifier quoted by a failure reason is gone from `jobs`, from
`submissions` (where the trigger on `jobs` copied it) and from the retry bookkeeping, so
`reporting.submissions` no longer shows it (issue 20 item 7)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from tests.conftest import unique_job_id
from tests.test_lifecycle import KEY, _ingest, _stored_anywhere
from worker.config import Settings
from worker.ingest import failure_fingerprint
from worker.lifecycle import erase
from worker.local import synth


@pytest.mark.usefixtures("rekognition_endpoint")
async def test_erase_scrubs_the_identifier_from_every_failure_reason_and_reporting_submissions(
    emulator: Any, settings: Settings, db: asyncpg.Connection,
) -> None:
    async with asyncio.timeout(60):
        fx = synth.search_job(unique_job_id("er-text"), persons_elements=120, seed=0)
        await _ingest(settings, emulator, [fx])
        target = await db.fetchval("SELECT external_image_id FROM collection_faces ORDER BY 1 LIMIT 1")
        # A submitted video whose job failed on a page naming the identifier: the trigger copies the reason.
        failed = unique_job_id("er-text-failed")
        await db.execute("INSERT INTO submissions (video_bucket, video_name, api, options, options_key, "
                         "client_request_token, state, job_id) VALUES ('b', 'v.mp4', 'FACE_SEARCH', '{}', 'k', "
                         "'tok-1', 'started', $1)", failed)
        reason = f'MalformedPage: FaceMatches[0].Face.ExternalImageId "{target}" is not a string of 1..255'
        await db.execute("INSERT INTO jobs (job_id, api, ingest_state) VALUES ($1, 'FACE_SEARCH', 'pending')", failed)
        await db.execute("UPDATE jobs SET ingest_state = 'failed', failure_code = 'MalformedPage', "
                         "failure_reason = $2, status_message = $3 WHERE job_id = $1", failed, reason,
                         f"video {target}.mp4 could not be decoded")
        error = RuntimeError(f"a bug met {target} on page 3")
        await db.execute("INSERT INTO job_retries (job_id, api, fingerprint, last_error, last_outage, streak, "
                         "failures) VALUES ($1, 'FACE_SEARCH', $2, $3, $4, 2, 2)", failed,
                         failure_fingerprint(error), str(error), f"timeout while reading {target}")
        shown = await db.fetchval("SELECT failure_reason FROM reporting.submissions WHERE job_id = $1", failed)
        assert shown == reason  # copied by the trigger, readable by the reader role
        assert len(await _stored_anywhere(db, {target})) > 3

        result = await erase(db, "external_image_id", target, key=KEY)
        assert result.audit_id is not None and fx.job_id in result.job_ids

        assert await _stored_anywhere(db, {target}) == []
        shown = await db.fetchval("SELECT failure_reason FROM reporting.submissions WHERE job_id = $1", failed)
        assert shown == reason.replace(target, "[erased]")
        job = await db.fetchrow("SELECT * FROM jobs WHERE job_id = $1", failed)
        assert job["failure_reason"] == shown and job["ingest_state"] == "failed"
        retry = await db.fetchrow("SELECT * FROM job_retries WHERE job_id = $1", failed)
        assert retry["last_error"] == "a bug met [erased] on page 3" and retry["streak"] == 2
        assert target not in retry["fingerprint"] and "[erased]" in retry["fingerprint"]
