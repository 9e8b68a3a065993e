"""Page decoding in a worker process gives exactly what inline decoding gives, errors included."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import time
from pathlib import Path

import orjson
import pytest

from worker.errors import MalformedPage, TransientError
from worker.local import synth
from worker.messages import Api
from worker.pagecodec import (
    SHARED_MIN_BYTES,
    PageDecoder,
    Shared,
    _frame,
    decode_page,
    discard,
    share,
    take,
    take_page,
)


@pytest.fixture
def pool() -> PageDecoder:
    decoder = PageDecoder(1)
    yield decoder  # type: ignore[misc]
    decoder.close()


async def test_pool_and_inline_agree(pool: PageDecoder) -> None:
    fx = synth.search_job("codec-search", persons_elements=300, all_optional=True)
    raw = orjson.dumps(synth.page_body(fx, 0, 300, "next-token"))
    inline = decode_page(raw, Api.FACE_SEARCH, 7, 1000, True)
    pooled = await pool.decode(raw, Api.FACE_SEARCH, 7, 1000, True)
    assert pooled.meta == inline.meta and pooled.meta.next_token == "next-token"
    assert pooled.rows is not None and inline.rows is not None
    assert pooled.rows == inline.rows and pooled.rows.fast and pooled.rows.matches
    assert pooled.archived is not None and pooled.archived.decompress() == raw


async def test_malformed_page_surfaces_with_its_reason(pool: PageDecoder) -> None:
    fx = synth.detection_job("codec-bad", faces=5)
    page = synth.page_body(fx, 0, 5, None)
    page["Faces"][2]["Timestamp"] = -5
    with pytest.raises(MalformedPage, match=r"Faces\[2\]\.Timestamp"):
        await pool.decode(orjson.dumps(page), Api.FACE_DETECTION, 1, 0, True)
    with pytest.raises(MalformedPage, match="not JSON"):
        await pool.decode(b"<html>gateway error</html>", Api.FACE_DETECTION, 1, 0, True)


async def test_not_succeeded_pages_have_no_rows(pool: PageDecoder) -> None:
    raw = orjson.dumps({"JobStatus": "IN_PROGRESS", "Faces": []})
    decoded = await pool.decode(raw, Api.FACE_DETECTION, 1, 0, True)
    assert decoded.meta.job_status == "IN_PROGRESS" and decoded.rows is None and decoded.archived is None


async def test_a_dead_decoding_process_is_transient_and_recovers(pool: PageDecoder) -> None:
    raw = orjson.dumps(synth.page_body(synth.detection_job("codec-kill", faces=3), 0, 3, None))
    await pool.decode(raw, Api.FACE_DETECTION, 1, 0, False)
    assert pool._pool is not None
    for pid in list(pool._pool._processes):  # the worker processes of the pool
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(TransientError, match="decoding process died"):
        for _ in range(20):  # the pool notices the death on its next use
            await pool.decode(raw, Api.FACE_DETECTION, 1, 0, False)
    decoded = await pool.decode(raw, Api.FACE_DETECTION, 1, 0, False)
    assert decoded.rows is not None and decoded.rows.elements == 3 and decoded.rows.faces


async def test_the_decoding_process_starts_with_the_worker_not_with_the_first_page(pool: PageDecoder) -> None:
    pool.start()
    assert pool._pool is not None
    deadline = asyncio.get_running_loop().time() + 60
    # Started and warm (spawned, imported, its warm-up task done) before any page was handed to it.
    while not (pool._pool._processes and all(p.exitcode is None for p in pool._pool._processes.values())
               and pool._pool._pending_work_items == {}):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    [pid] = list(pool._pool._processes)
    raw = orjson.dumps(synth.page_body(synth.detection_job("codec-warm", faces=3), 0, 3, None))
    decoded = await pool.decode(raw, Api.FACE_DETECTION, 1, 0, False)
    assert decoded.rows is not None and list(pool._pool._processes) == [pid]  # the same process, no other
    PageDecoder(0).start()  # inline decoding: nothing to start


def test_a_decoded_page_crosses_as_one_frame_with_its_streams_copied_once() -> None:
    fx = synth.search_job("codec-frame", persons_elements=400, all_optional=True)
    raw = orjson.dumps(synth.page_body(fx, 0, 400, "next"))
    page = decode_page(raw, Api.FACE_SEARCH, 7, 0, True)
    assert page.rows is not None and page.rows.matches and page.archived is not None
    before = _blocks()
    for sent in (share(_frame(page)), b"".join(_frame(page))):  # a block, or the pipe when small
        assert take_page(sent) == page
    assert _no_new_block(before)
    empty = decode_page(orjson.dumps({"JobStatus": "IN_PROGRESS"}), Api.FACE_SEARCH, 7, 0, True)
    assert take_page(b"".join(_frame(empty))) == empty


def _blocks() -> set[str]:
    """Shared memory blocks this Python creates (POSIX names with the psm_ prefix)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir() if p.name.startswith("psm_")} if shm.is_dir() else set()


def _no_new_block(before: set[str], *, within_s: float = 3.0) -> bool:
    """No block that was not there ``before`` stays: other processes of the suite (xdist workers decoding
    their own pages) create and unlink blocks meanwhile, so a new one must outlive ``within_s`` to count."""
    deadline = time.monotonic() + within_s
    while _blocks() - before:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def test_share_and_take_round_trip_and_unlink() -> None:
    small = b"x" * 100
    assert share(small) is small  # below the threshold the pipe carries it
    big = bytes(range(256)) * (SHARED_MIN_BYTES // 256 + 1)
    before = _blocks()
    item = share(big)
    assert isinstance(item, Shared) and item.size == len(big)
    assert take(item) == big
    assert _no_new_block(before)  # taken means unlinked
    discard(item)  # discarding what is gone already is fine


async def test_full_pages_cross_in_shared_memory_and_leave_no_block(pool: PageDecoder) -> None:
    fx = synth.detection_job("codec-shm", faces=1000, attributes="ALL")
    raw = orjson.dumps(synth.page_body(fx, 0, 1000, None))
    assert len(raw) > SHARED_MIN_BYTES
    before = _blocks()
    pooled = await pool.decode(raw, Api.FACE_DETECTION, 1, 0, True)
    inline = decode_page(raw, Api.FACE_DETECTION, 1, 0, True)
    assert pooled.rows is not None and inline.rows is not None
    assert pooled.rows == inline.rows and pooled.rows.landmark_elements == 30_000
    assert _no_new_block(before)

    # A page refused while it lies in its block: the error comes back and the block is gone all the same.
    bad = synth.page_body(fx, 0, 1000, None)
    bad["Faces"][999]["Timestamp"] = "late"
    with pytest.raises(MalformedPage, match=r"Faces\[999\]\.Timestamp"):
        await pool.decode(orjson.dumps(bad), Api.FACE_DETECTION, 1, 0, True)
    assert _no_new_block(before)

    # An abandoned decode (the job was cancelled) frees its page and, when it arrives, its result.
    task = asyncio.create_task(pool.decode(raw, Api.FACE_DETECTION, 1, 0, True))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The one decoding process works in order: once a later page is back, the abandoned one is done too.
    await pool.decode(orjson.dumps({"JobStatus": "IN_PROGRESS"}), Api.FACE_DETECTION, 1, 0, True)
    assert _no_new_block(before)


@pytest.mark.skipif(not hasattr(os, "posix_fallocate") or not Path("/dev/shm").is_dir(), reason="Linux tmpfs only")
def test_a_full_dev_shm_falls_back_to_the_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    # The one way to fill /dev/shm without root: the allocation the kernel would refuse, refused.
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    big = b"y" * (SHARED_MIN_BYTES * 2)
    before = _blocks()
    assert share(big) is big
    assert _no_new_block(before)
