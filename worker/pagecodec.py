"""Decode result pages into binary COPY streams and compress them for the archive, in a worker process.

A full 1000-face page takes ~30 ms to decode straight into COPY streams (worker/pagecopy.py: ~13 ms msgspec,
~17 ms packing) and ~8 ms to compress for the archive: CPU that would otherwise stall the event loop that
also fetches pages and feeds PostgreSQL. The process starts with the worker (:meth:`PageDecoder.start`),
not on the first page, and imports only what decoding needs. What comes back is bytes (the streams, the
compressed page), so the main process only hands them to the connection: no rows to unpickle, no value to
encode.

Both directions carry megabytes (a 3.4 MB page out, ~2 MB of streams and ~0.9 MB of archive back). Through
the pool's pipe that costs ~25 ms of the worker's CPU per page, in 64 KB writes and reads that also
contend for the event loop's GIL; through a shared memory block it is one copy: the page is decoded where
it lies, and the result is framed (:func:`_frame`) so its megabytes skip pickle. Whoever takes a block
unlinks it; a block left behind by a crash is removed by multiprocessing's resource tracker.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import pickle
import struct
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from multiprocessing import shared_memory
from typing import cast

from worker.archive import ArchivedPage
from worker.errors import TransientError
from worker.messages import Api
from worker.normalize import JobMeta, UnknownValues
from worker.pagecopy import PageCopy, decode


@dataclass(slots=True)
class DecodedPage:
    """One page, ready for the writer: its rows as COPY streams, None unless the job SUCCEEDED.

    ``unknown``: enumeration values this version does not know, for the parent process to count.
    """

    meta: JobMeta
    rows: PageCopy | None
    archived: ArchivedPage | None
    unknown: UnknownValues = field(default_factory=dict)


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


def decode_page(raw: bytes | memoryview, api: Api, ingest_id: int, seq_start: int, archive: bool,
                ascii_only: bool | None = None) -> DecodedPage:
    """Pure CPU work on one raw page; raises MalformedPage for anything the model does not allow."""
    meta, rows, unknown = decode(raw, api, ingest_id, seq_start, ascii_only=ascii_only)
    archived = ArchivedPage.compress(raw) if archive and rows is not None else None
    return DecodedPage(meta, rows, archived, unknown)


# Below this a pipe write is as cheap as creating and mapping a block.
SHARED_MIN_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Shared:
    """Bytes left in a named shared memory block for another process to take."""

    name: str
    size: int


def share(data: bytes | Sequence[bytes]) -> Shared | bytes:
    """Put ``data`` (or the concatenation of its parts, copied once) in a shared memory block, or return it as
    bytes when small or /dev/shm is unusable."""
    parts = [data] if isinstance(data, bytes) else data
    size = sum(len(p) for p in parts)
    if size < SHARED_MIN_BYTES:
        return data if isinstance(data, bytes) else b"".join(parts)
    try:
        block = shared_memory.SharedMemory(create=True, size=size)
    except OSError:  # no /dev/shm: the pipe still works
        return b"".join(parts)
    try:
        _reserve(block.name, size)
        buf, at = cast(memoryview, block.buf), 0  # buf is None only after close()
        for part in parts:
            buf[at:at + len(part)] = part
            at += len(part)
        del buf
    except OSError:  # /dev/shm is full (a container's is 64 MB by default): the pipe still works
        block.close()
        block.unlink()
        return b"".join(parts)
    block.close()  # the block lives on until it is unlinked
    return Shared(block.name, size)


def _reserve(name: str, size: int) -> None:
    """Allocate the block's pages now, so a full /dev/shm is an OSError here.

    Without this, tmpfs hands out pages on first touch, and a full one answers the copy into the
    mapping with SIGBUS, which would kill the worker.
    """
    path = f"/dev/shm/{name.lstrip('/')}"  # noqa: S108 -- the block just created, mode 0600
    if not hasattr(os, "posix_fallocate") or not os.path.exists(path):
        return  # not Linux: no tmpfs to overcommit here
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def take(item: Shared | bytes) -> bytes:
    """The bytes of ``item``; a shared block is copied out and unlinked."""
    if not isinstance(item, Shared):
        return item
    block = shared_memory.SharedMemory(name=item.name)
    try:
        return bytes(cast(memoryview, block.buf)[:item.size])
    finally:
        block.close()
        block.unlink()


def discard(item: object) -> None:
    """Unlink a block nobody will take (its task failed or was abandoned); gone already is fine."""
    if isinstance(item, Shared):
        with contextlib.suppress(FileNotFoundError):
            block = shared_memory.SharedMemory(name=item.name)
            block.close()
            block.unlink()


def _collect(future: Future[int]) -> None:
    """A warm-up task's end: its error, if any, returns with the first page that needs the pool."""
    if not future.cancelled():
        future.exception()


def _discard_result(future: Future[Shared | bytes]) -> None:
    if not future.cancelled() and future.exception() is None:
        discard(future.result())


# A decoded page crosses as one frame: the length of the pickled page without its streams and archive, that
# pickle, then those (megabytes) as they are, so they are copied once into the block and once out of it
# instead of also into and out of a pickle.
_HEAD = struct.Struct(">I")


def _frame(page: DecodedPage) -> list[bytes]:
    big: list[bytes] = []
    rows, archived = page.rows, page.archived
    if rows is not None:
        big += [rows.faces, rows.landmarks, rows.emotions, rows.matches]
        rows = replace(rows, faces=b"", landmarks=b"", emotions=b"", matches=b"")
    if archived is not None:
        big.append(archived.body)
        archived = replace(archived, body=b"")
    head = pickle.dumps((replace(page, rows=rows, archived=archived), [len(b) for b in big]),
                        protocol=pickle.HIGHEST_PROTOCOL)
    return [_HEAD.pack(len(head)), head, *big]


def _unframe(data: memoryview | bytes) -> DecodedPage:
    (n,) = _HEAD.unpack_from(data)
    # Written by our own decoding process (pipe, or a block only this user can open: mode 0600).
    page, sizes = pickle.loads(data[_HEAD.size:_HEAD.size + n])  # noqa: S301
    at, big = _HEAD.size + n, []
    for size in sizes:
        big.append(bytes(data[at:at + size]))
        at += size
    rows, archived = page.rows, page.archived
    if rows is not None:
        rows = replace(rows, faces=big[0], landmarks=big[1], emotions=big[2], matches=big[3])
        big = big[4:]
    if archived is not None:
        archived = replace(archived, body=big[0])
    result: DecodedPage = replace(page, rows=rows, archived=archived)
    return result


def take_page(item: Shared | bytes) -> DecodedPage:
    """The decoded page a decoding process framed in ``item``; a shared block is read and unlinked."""
    if not isinstance(item, Shared):
        return _unframe(item)
    block = shared_memory.SharedMemory(name=item.name)
    try:
        view = cast(memoryview, block.buf)[:item.size]
        try:
            return _unframe(view)
        finally:
            view.release()
    finally:
        block.close()
        block.unlink()


def decode_shared(raw: Shared | bytes, api: Api, ingest_id: int, seq_start: int, archive: bool,
                  ascii_only: bool) -> Shared | bytes:
    """:func:`decode_page` in a decoding process: the page in, the framed result out, both via :func:`share`.

    A page in a shared block is decoded and compressed where it lies, without a copy out of the block.
    """
    if not isinstance(raw, Shared):
        return share(_frame(decode_page(raw, api, ingest_id, seq_start, archive, ascii_only)))
    block = shared_memory.SharedMemory(name=raw.name)
    try:
        view = cast(memoryview, block.buf)[:raw.size]
        try:
            page = decode_page(view, api, ingest_id, seq_start, archive, ascii_only)
        finally:
            view.release()
    finally:
        block.close()
        block.unlink()
    return share(_frame(page))


def default_processes() -> int:
    """One decoding process when the machine has a core to spare for it, else decode inline."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores >= 2 else 0


class PageDecoder:
    """Runs :func:`decode_page` in ``processes`` worker processes (0: inline, on the event loop)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Start the decoding processes now, with the worker, instead of on the first page (a process takes
        ~0.2 s of CPU to start and import). Returns at once; a process that fails to start shows on the
        first page as a TransientError."""
        if self.processes <= 0:
            return
        executor = self._executor()
        # The pool starts a process per task it cannot hand to an idle one: one warm-up task each.
        for _ in range(self.processes):
            executor.submit(os.getpid).add_done_callback(_collect)

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: forking a process that runs an event loop and holds sockets is unsafe.
            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_decoding_process, initargs=(os.getpid(),))
        return self._pool

    async def decode(self, raw: bytes, api: Api, ingest_id: int, seq_start: int, archive: bool) -> DecodedPage:
        if self.processes <= 0:
            return decode_page(raw, api, ingest_id, seq_start, archive)
        import asyncio  # here, not at the top: the decoding process imports this module and never needs it

        executor = self._executor()
        sent = share(raw)
        future: Future[Shared | bytes] | None = None
        try:
            # isascii() reads 3 MB in ~0.2 ms here; the decoding process reads the page in place, where it has none.
            future = executor.submit(decode_shared, sent, api, ingest_id, seq_start, archive, raw.isascii())
            result = await asyncio.wrap_future(future)
        except BaseException as exc:
            # The decoder may never have taken the page, and a result may still arrive: free both.
            discard(sent)
            if future is not None:
                future.add_done_callback(_discard_result)
            if isinstance(exc, BrokenProcessPool):
                # A decoding process died (OOM killer, signal): start a fresh pool and retry the job later.
                self.close()
                raise TransientError(f"page decoding process died: {exc}") from exc
            raise
        return take_page(result)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
