"""What each lever of the one-pass decoder removed, in CPU ms per full page, step by step, in one process.

Times each step of the old pipeline (orjson -> dicts -> normalizer -> row tuples, pickled across processes,
encoded element by element by asyncpg's copy_records_to_table) and of the new one (msgspec Structs ->
binary COPY streams, pickled as bytes, streamed by copy_to_table) on the same pre-rendered pages, with the
process's own CPU time (time.process_time: user + system, not wall), the steps interleaved round by round
so that a busy machine slows both alike. COPY steps write into a scratch database of an embedded
PostgreSQL (or DATABASE_URL's server) and roll back; only the client's CPU is counted. Usage:

    .venv/bin/python bench/levers_bench.py              # 1000-face pages, 15 rounds
    .venv/bin/python bench/levers_bench.py --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from worker import pagecopy, pagemodel  # noqa: E402
from worker.archive import ArchivedPage  # noqa: E402
from worker.local import synth  # noqa: E402
from worker.messages import Api  # noqa: E402
from worker.normalize import (  # noqa: E402
    EMOTION_COLUMNS,
    FACE_COLUMNS,
    LANDMARK_COLUMNS,
    MATCH_COLUMNS,
    normalize_page,
)
from worker.pagecodec import DecodedPage, _frame, share, take, take_page, tune_gc  # noqa: E402


def _pages() -> dict[str, tuple[Api, bytes]]:
    det = synth.detection_job("levers-det".ljust(64, "x"), faces=1000, attributes="ALL", seed=0)
    search = synth.search_job("levers-search".ljust(64, "x"), persons_elements=1000, seed=0)
    return {
        "detection, ALL attributes": (Api.FACE_DETECTION, orjson.dumps(synth.page_body(det, 0, 1000, "next"))),
        "search": (Api.FACE_SEARCH, orjson.dumps(synth.page_body(search, 0, 1000, "next"))),
    }


Add = Callable[[str, float], None]


class _Rollback(Exception):
    pass


async def _rolled_back(conn: Any, tables: list[tuple[str, tuple[str, ...], Any]], binary: bool) -> float:
    """Client CPU ms of COPYing ``tables`` (rows, or binary streams) in a transaction that is rolled back."""
    started = time.process_time()
    with contextlib.suppress(_Rollback):
        async with conn.transaction():
            await conn.execute("INSERT INTO ingests (ingest_id, job_id) VALUES (7, 'levers')")
            for table, columns, data in tables:
                if not data:
                    continue
                if binary:
                    await conn.copy_to_table(table, source=memoryview(data), columns=columns, format="binary")
                else:
                    await conn.copy_records_to_table(table, records=data, columns=columns)
            raise _Rollback
    return (time.process_time() - started) * 1e3


async def _old_round(api: Api, raw: bytes, conn: Any, add: Add) -> None:
    """orjson, the normalizer, pickled rows, asyncpg's per-element COPY encoding."""
    started = time.process_time()
    body = orjson.loads(raw)
    add("old: orjson.loads", (time.process_time() - started) * 1e3)
    started = time.process_time()
    rows = normalize_page(body, api, 7, 0)
    add("old: normalize_page", (time.process_time() - started) * 1e3)
    started = time.process_time()
    del body
    add("old: freeing the decoded dicts", (time.process_time() - started) * 1e3)
    archived = ArchivedPage.compress(raw)
    started = time.process_time()
    # As the old pagecodec handed a page over: pickled, through a shared block, unpickled.
    pickle.loads(take(share(pickle.dumps(DecodedPage(rows.meta, rows, archived), protocol=pickle.HIGHEST_PROTOCOL))))  # type: ignore[arg-type]
    add("old: hand-over, pickled rows via shared memory", (time.process_time() - started) * 1e3)
    add("old: copy_records_to_table (client side)", await _rolled_back(conn, [
        ("faces", FACE_COLUMNS, rows.faces), ("landmarks", LANDMARK_COLUMNS, rows.landmarks),
        ("emotions", EMOTION_COLUMNS, rows.emotions), ("face_matches", MATCH_COLUMNS, rows.matches)], binary=False))


async def _new_round(api: Api, raw: bytes, conn: Any, add: Add) -> None:
    """msgspec Structs, packed COPY streams, pickled bytes, copy_to_table."""
    decoder = pagemodel.SEARCH if api is Api.FACE_SEARCH else pagemodel.DETECTION
    started = time.process_time()
    decoder.decode(raw)
    add("new: msgspec decode (and free)", (time.process_time() - started) * 1e3)
    started = time.process_time()
    box_meta, copy, _ = pagecopy.decode(raw, api, 7, 0)
    add("new: decode -> COPY streams (all of pagecopy.decode)", (time.process_time() - started) * 1e3)
    assert copy is not None and copy.fast
    meta, archived = box_meta, ArchivedPage.compress(raw)
    started = time.process_time()
    take_page(share(_frame(DecodedPage(meta, copy, archived))))
    add("new: hand-over, framed streams via shared memory", (time.process_time() - started) * 1e3)
    add("new: copy_to_table of the streams (client side)", await _rolled_back(conn, [
        ("faces", copy.face_columns, copy.faces),
        ("landmarks", pagecopy.LANDMARK_COPY_COLUMNS, copy.landmarks),
        ("emotions", pagecopy.EMOTION_COPY_COLUMNS, copy.emotions),
        ("face_matches", pagecopy.MATCH_COPY_COLUMNS, copy.matches)], binary=True))
    started = time.process_time()
    ArchivedPage.compress(raw)
    add("both: zstd for the archive", (time.process_time() - started) * 1e3)


async def _measure(api: Api, raw: bytes, conn: Any, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}

    def add(name: str, ms: float) -> None:
        out.setdefault(name, []).append(ms)

    for _ in range(rounds):
        await _old_round(api, raw, conn, add)
        gc.collect()
        await _new_round(api, raw, conn, add)
        gc.collect()
    return out


LEVERS = (
    ("decode: msgspec Structs instead of orjson dicts (decoding process)",
     ("old: orjson.loads", "old: freeing the decoded dicts"), ("new: msgspec decode (and free)",)),
    ("encode once: packed COPY tuples (decoding process) instead of normalized rows encoded element by "
     "element by asyncpg (event loop)",
     ("old: normalize_page", "old: copy_records_to_table (client side)"),
     ("new: decode -> COPY streams (all of pagecopy.decode)", "-new: msgspec decode (and free)",
      "new: copy_to_table of the streams (client side)")),
    ("  of which left the event loop (asyncpg encoding -> streaming bytes)",
     ("old: copy_records_to_table (client side)",), ("new: copy_to_table of the streams (client side)",)),
    ("hand-over: a frame of bytes instead of pickled rows, via shared memory (both processes)",
     ("old: hand-over, pickled rows via shared memory",), ("new: hand-over, framed streams via shared memory",)),
)


def _lever_ms(medians: dict[str, float], names: tuple[str, ...]) -> float:
    return sum(-medians[n[1:]] if n.startswith("-") else medians[n] for n in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    tune_gc()  # as `python -m worker` and each decoding process do
    from ingest_bench import _database, _machine  # type: ignore[import-not-found]

    server = None
    base_url = os.environ.get("DATABASE_URL")
    if not base_url:
        from worker.local.pg import start_embedded_postgres

        server, base_url = start_embedded_postgres(Path(tempfile.mkdtemp(prefix="levers-pg-")) / "pgdata")
    results: dict[str, Any] = {"machine": _machine(), "rounds": args.rounds, "pages": {}}
    try:
        url = _database(base_url, "bench_levers")

        async def run() -> None:
            from worker.db.engine import connect

            conn = await connect(url)
            try:
                for label, (api, raw) in _pages().items():
                    steps = await _measure(api, raw, conn, args.rounds)
                    results["pages"][label] = {name: {"median_ms": median(v), "min_ms": min(v), "max_ms": max(v)}
                                               for name, v in steps.items()}
            finally:
                await conn.close()

        asyncio.run(run())
    finally:
        if server is not None:
            server.cleanup_mode = "delete"
            server.cleanup()
    print(f"machine: {results['machine']}; process CPU ms per 1000-element page, median (min-max) of "
          f"{args.rounds} interleaved rounds")
    for label, steps in results["pages"].items():
        print(f"\n{label}")
        for name, figures in steps.items():
            print(f"  {name:<62} {figures['median_ms']:7.1f} ({figures['min_ms']:.1f}-{figures['max_ms']:.1f})")
        medians = {name: f["median_ms"] for name, f in steps.items()}
        print("  levers (ms removed per page):")
        levers = {}
        for lever, old, new in LEVERS:
            removed = _lever_ms(medians, old) - _lever_ms(medians, new)
            levers[lever] = removed
            print(f"    {lever:<110} {removed:7.1f}")
        steps["levers_removed_ms"] = levers  # type: ignore[assignment]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
