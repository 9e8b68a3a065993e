"""Reading an archived page is bounded by its recorded size; every unreadable page is CorruptArchive."""

from __future__ import annotations

import tracemalloc
import zlib
from collections.abc import Callable

import orjson
import pytest
import zstandard

from worker.archive import ArchivedPage, CorruptArchive
from worker.local import synth

BOMB_BYTES = 256 << 20  # what each bomb decompresses to
RECORDED_BYTES = 64 << 10  # what its raw_pages row claims
CHUNK = b"\0" * (1 << 20)


def _zstd_bomb(declare_size: bool) -> bytes:
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=declare_size)
    co = cctx.compressobj(size=BOMB_BYTES if declare_size else -1)
    return b"".join([*(co.compress(CHUNK) for _ in range(BOMB_BYTES // len(CHUNK))), co.flush()])


def _zlib_bomb() -> bytes:
    co = zlib.compressobj(9)
    return b"".join([*(co.compress(CHUNK) for _ in range(BOMB_BYTES // len(CHUNK))), co.flush()])


@pytest.fixture(scope="module")
def page() -> bytes:
    fx = synth.detection_job("archive-page", faces=40, attributes="ALL", all_optional=True)
    return orjson.dumps(synth.page_body(fx, 0, 40, "next"))


def test_pages_read_back_exactly(page: bytes) -> None:
    assert ArchivedPage.compress(page).decompress() == page
    # Pages written before content sizes were checked, and zlib pages, read the same.
    legacy = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(page)
    assert ArchivedPage(legacy, len(page)).decompress() == page
    assert ArchivedPage(zlib.compress(page), len(page), "zlib+json").decompress() == page
    assert ArchivedPage(ArchivedPage.compress(b"").body, 0).decompress() == b""


@pytest.mark.parametrize(("encoding", "make"), [
    ("zstd+json", lambda: _zstd_bomb(declare_size=True)),
    ("zstd+json", lambda: _zstd_bomb(declare_size=False)),
    ("zlib+json", _zlib_bomb),
], ids=["zstd-declared-size", "zstd-no-size", "zlib"])
def test_decompression_bomb_is_refused_without_allocating_its_output(encoding: str, make: Callable[[], bytes]) -> None:
    bomb = ArchivedPage(make(), RECORDED_BYTES, encoding)
    assert len(bomb.body) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(CorruptArchive, match="more than the recorded"):
            bomb.decompress()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * RECORDED_BYTES + len(bomb.body), peak


def _zstd(page: bytes) -> bytes:
    return ArchivedPage.compress(page).body


@pytest.mark.parametrize(("case", "match"), [
    ("zstd truncated", "truncated"),
    ("zstd cut in its header", "undecodable|truncated"),
    ("zstd garbage", "undecodable"),
    ("zstd garbage after the frame", "undecodable"),
    ("zstd second frame", "more than the recorded"),
    ("zstd recorded size too small", "more than the recorded"),
    ("zstd recorded size too large", "truncated"),
    ("zstd recorded size negative", "negative"),
    ("zlib truncated", "truncated"),
    ("zlib garbage", "undecodable"),
    ("zlib data after the stream", "after the end"),
    ("unknown encoding", "unknown raw page encoding 'lz4\\+json'"),
])
def test_unreadable_page_is_corrupt_archive(page: bytes, case: str, match: str) -> None:
    n, z, lz = len(page), _zstd(page), zlib.compress(page)
    archived = {
        "zstd truncated": ArchivedPage(z[: len(z) // 2], n),
        "zstd cut in its header": ArchivedPage(z[:3], n),
        "zstd garbage": ArchivedPage(b"<html>not a zstd frame</html>", n),
        "zstd garbage after the frame": ArchivedPage(z + b"garbage!", n),
        "zstd second frame": ArchivedPage(z + z, n),
        "zstd recorded size too small": ArchivedPage(z, n - 1),
        "zstd recorded size too large": ArchivedPage(z, n + 1),
        "zstd recorded size negative": ArchivedPage(z, -1),
        "zlib truncated": ArchivedPage(lz[:-5], n, "zlib+json"),
        "zlib garbage": ArchivedPage(b"<html>not zlib</html>", n, "zlib+json"),
        "zlib data after the stream": ArchivedPage(lz + b"x", n, "zlib+json"),
        "unknown encoding": ArchivedPage(z, n, "lz4+json"),
    }[case]
    with pytest.raises(CorruptArchive, match=match) as info:
        archived.decompress()
    assert isinstance(info.value, ValueError) and info.value.code == "CorruptArchive"
