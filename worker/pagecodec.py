"""Decode, normalize and compress result pages, in a worker process when a spare core exists.

A full 1000-face page costs ~35 ms to decode, ~20 ms to normalize and ~27 ms to compress for the
archive, all CPU that would otherwise stall the event loop that also fetches pages and feeds
PostgreSQL. Handing the raw bytes to a process pool moves that work to the second core; what
comes back is rows ready for COPY (pickling them costs ~10 ms each way, far less than the work).
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import orjson

from worker.db.store import ArchivedPage
from worker.errors import MalformedPage, TransientError
from worker.messages import Api
from worker.normalize import JobMeta, PageRows, normalize_page, parse_meta


@dataclass(slots=True)
class DecodedPage:
    """One page, ready for the writer. ``rows`` is None unless the job SUCCEEDED."""

    meta: JobMeta
    rows: PageRows | None
    archived: ArchivedPage | None


def _exit_with_parent(parent_pid: int) -> None:
    # A pool worker blocks on its task queue forever if the worker process is SIGKILLed; leave too.
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _init_decoding_process(parent_pid: int) -> None:
    tune_gc()
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="exit-with-parent", daemon=True).start()


def tune_gc() -> None:
    """Collect the young generation less often.

    A full result page becomes ~40,000 row tuples next to a decoded page of ~1 million objects; with
    CPython's default threshold (700) the collector runs every few hundred rows and keeps walking that
    live heap. Measured: +50% faces/s on a 10-page job. Called by the CLI and in each decoding process.
    """
    gc.set_threshold(100_000, 50, 1000)


def decode_page(raw: bytes, api: Api, job_id: str, seq_start: int, archive: bool) -> DecodedPage:
    """Pure CPU work on one raw page; raises MalformedPage for anything the model does not allow."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedPage(f"malformed result page: not JSON: {exc}") from None
    meta = parse_meta(body)
    rows = normalize_page(body, api, job_id, seq_start) if meta.job_status == "SUCCEEDED" else None
    del body
    archived = ArchivedPage.compress(raw) if archive and rows is not None else None
    return DecodedPage(meta, rows, archived)


def default_processes() -> int:
    """One decoding process when the machine has a core to spare for it, else decode inline."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores >= 2 else 0


class PageDecoder:
    """Runs :func:`decode_page` in ``processes`` worker processes (0: inline, on the event loop)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: forking a process that runs an event loop and holds sockets is unsafe.
            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_decoding_process, initargs=(os.getpid(),))
        return self._pool

    async def decode(self, raw: bytes, api: Api, job_id: str, seq_start: int, archive: bool) -> DecodedPage:
        if self.processes <= 0:
            return decode_page(raw, api, job_id, seq_start, archive)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor(), decode_page, raw, api, job_id, seq_start, archive)
        except BrokenProcessPool as exc:
            # A decoding process died (OOM killer, signal): start a fresh pool and retry the job later.
            self.close()
            raise TransientError(f"page decoding process died: {exc}") from exc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
