"""Page decoding in a worker process gives exactly what inline decoding gives, errors included."""

from __future__ import annotations

import os
import signal

import orjson
import pytest

from worker.errors import MalformedPage, TransientError
from worker.local import synth
from worker.messages import Api
from worker.pagecodec import PageDecoder, decode_page


@pytest.fixture
def pool() -> PageDecoder:
    decoder = PageDecoder(1)
    yield decoder  # type: ignore[misc]
    decoder.close()


async def test_pool_and_inline_agree(pool: PageDecoder) -> None:
    fx = synth.search_job("codec-search", persons_elements=300, all_optional=True)
    raw = orjson.dumps(synth.page_body(fx, 0, 300, "next-token"))
    inline = decode_page(raw, Api.FACE_SEARCH, fx.job_id, 1000, True)
    pooled = await pool.decode(raw, Api.FACE_SEARCH, fx.job_id, 1000, True)
    assert pooled.meta == inline.meta and pooled.meta.next_token == "next-token"
    assert pooled.rows is not None and inline.rows is not None
    assert pooled.rows.faces == inline.rows.faces and pooled.rows.matches == inline.rows.matches
    assert pooled.rows.collection_faces == inline.rows.collection_faces
    assert pooled.archived is not None and pooled.archived.decompress() == raw


async def test_malformed_page_surfaces_with_its_reason(pool: PageDecoder) -> None:
    fx = synth.detection_job("codec-bad", faces=5)
    page = synth.page_body(fx, 0, 5, None)
    page["Faces"][2]["Timestamp"] = -5
    with pytest.raises(MalformedPage, match=r"Faces\[2\]\.Timestamp"):
        await pool.decode(orjson.dumps(page), Api.FACE_DETECTION, fx.job_id, 0, True)
    with pytest.raises(MalformedPage, match="not JSON"):
        await pool.decode(b"<html>gateway error</html>", Api.FACE_DETECTION, fx.job_id, 0, True)


async def test_not_succeeded_pages_have_no_rows(pool: PageDecoder) -> None:
    raw = orjson.dumps({"JobStatus": "IN_PROGRESS", "Faces": []})
    decoded = await pool.decode(raw, Api.FACE_DETECTION, "codec-running", 0, True)
    assert decoded.meta.job_status == "IN_PROGRESS" and decoded.rows is None and decoded.archived is None


async def test_a_dead_decoding_process_is_transient_and_recovers(pool: PageDecoder) -> None:
    raw = orjson.dumps(synth.page_body(synth.detection_job("codec-kill", faces=3), 0, 3, None))
    await pool.decode(raw, Api.FACE_DETECTION, "codec-kill", 0, False)
    assert pool._pool is not None
    for pid in list(pool._pool._processes):  # the worker processes of the pool
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(TransientError, match="decoding process died"):
        for _ in range(20):  # the pool notices the death on its next use
            await pool.decode(raw, Api.FACE_DETECTION, "codec-kill", 0, False)
    decoded = await pool.decode(raw, Api.FACE_DETECTION, "codec-kill", 0, False)
    assert decoded.rows is not None and len(decoded.rows.faces) == 3
