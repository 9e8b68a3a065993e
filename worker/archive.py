"""The raw page archive's codec: a page as stored in raw_pages, compressed and back.

Reading is bounded by the page's recorded size (``body_bytes``): a body that would decompress to
more (a decompression bomb, or a corrupted size) is refused after at most ``body_bytes + 1`` bytes
of output, whatever its frame header declares. Every way a stored page can be unreadable (oversize,
truncated, undecodable, unknown encoding) is one exception type, CorruptArchive.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import zstandard

from worker.errors import PermanentJobError

# A window never needs to be larger than the content it decodes (our compressor writes 512 KiB windows
# for full pages); this floor keeps honest frames from other zstd settings readable.
_MIN_WINDOW_BYTES = 1 << 20


class CorruptArchive(PermanentJobError, ValueError):
    """An archived page cannot be read back to exactly ``body_bytes`` bytes."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, code="CorruptArchive")


def _zstd(body: bytes, expected: int) -> bytes:
    # One-shot decompress() sizes its output from the frame header and ignores max_output_size when
    # the header declares a content size; a stream reader only ever fills the buffer it is given.
    window = max(_MIN_WINDOW_BYTES, 1 << max(expected - 1, 0).bit_length())
    dctx = zstandard.ZstdDecompressor(max_window_size=window)
    # Across frames, read() returns only when its buffer is full or the body is used up, so one byte
    # past the bound shows an oversize body (a second frame included) and garbage after the frame raises.
    with dctx.stream_reader(body, read_across_frames=True) as reader:
        return reader.read(expected + 1)


def _zlib(body: bytes, expected: int) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(body, expected + 1)
    if len(out) == expected and not d.eof:
        raise CorruptArchive("zlib stream truncated")
    if d.unused_data:
        raise CorruptArchive(f"{len(d.unused_data)} bytes after the end of the zlib stream")
    return out


_DECODERS = {"zstd+json": _zstd, "zlib+json": _zlib}


@dataclass(frozen=True, slots=True)
class ArchivedPage:
    """A raw result page as stored in raw_pages."""

    body: bytes
    raw_bytes: int
    encoding: str = "zstd+json"

    @classmethod
    def compress(cls, raw: bytes | memoryview) -> ArchivedPage:
        # zstd level 1 on a 3.4 MB page: 11 ms to 0.87 MB, where zlib level 1 takes 26 ms to 1.1 MB.
        return cls(zstandard.ZstdCompressor(level=1).compress(raw), len(raw))

    def decompress(self) -> bytes:
        """The page's bytes, exactly ``raw_bytes`` of them, or CorruptArchive."""
        decode = _DECODERS.get(self.encoding)
        if decode is None:
            raise CorruptArchive(f"unknown raw page encoding {self.encoding!r}")
        if self.raw_bytes < 0:
            raise CorruptArchive(f"negative recorded size {self.raw_bytes}")
        try:
            out = decode(self.body, self.raw_bytes)
        except (zstandard.ZstdError, zlib.error) as exc:
            raise CorruptArchive(f"{self.encoding} body undecodable: {exc}") from exc
        if len(out) > self.raw_bytes:
            raise CorruptArchive(f"{self.encoding} body decompresses to more than the recorded {self.raw_bytes} bytes")
        if len(out) < self.raw_bytes:
            raise CorruptArchive(f"{self.encoding} body truncated: {len(out)} of {self.raw_bytes} bytes")
        return out
