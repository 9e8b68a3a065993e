"""moto's canned GetFaceSearch page, served by moto's own server, as a compatibility case."""

from __future__ import annotations

import asyncpg
import pytest

from tests.helpers import runtime
from worker.config import Settings
from worker.local.sqs import start_moto_server
from worker.messages import Api, JobRef


async def test_moto_canned_face_search_page_is_ingested(settings: Settings, db: asyncpg.Connection,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    server, url = start_moto_server()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_REKOGNITION", url)
        async with runtime(settings) as rt:
            outcome = await rt.ingestor.ingest(JobRef("moto-canned-job", Api.FACE_SEARCH))
    finally:
        server.stop()
    # moto answers with one SUCCEEDED page, an empty NextToken and an unknown TextModelVersion.
    assert outcome.outcome == "ingested", outcome.reason
    assert outcome.pages == 1 and outcome.faces >= 1
    job = await db.fetchrow("SELECT * FROM jobs WHERE job_id = 'moto-canned-job'")
    assert job["job_status"] == "SUCCEEDED" and job["video_codec"] == "h264" and job["duration_ms"] == 15020
    faces = await db.fetch("SELECT * FROM faces WHERE "
                           "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = 'moto-canned-job') "
                           "ORDER BY face_seq")
    assert len(faces) == outcome.faces
    assert faces[0]["person_index"] == 0 and faces[0]["bbox_width"] == pytest.approx(0.42217350006103516)
    matches = await db.fetchval("SELECT count(*) FROM face_matches WHERE "
                                "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = 'moto-canned-job')")
    assert matches == outcome.matches
