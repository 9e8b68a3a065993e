"""Times the erasure pass that runs before every switch (worker/erased.py) on ingested jobs: with no erasure
recorded, with erasures that the job does not name, and with one it does (its rows and pages rewritten).

Runs against an embedded PostgreSQL (or DATABASE_URL) and the emulator in this process; the jobs are
written through the real ingest path. Each pass runs in a transaction that is rolled back, so the three
cases see the same job. Prints one line per job and case.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import tempfile
import time
from pathlib import Path

import asyncpg

from worker.config import Settings
from worker.db.engine import connect
from worker.erased import apply_to_key, remember
from worker.local import synth
from worker.local.emulator import EmulatorConfig, EmulatorThread
from worker.messages import JobRef
from worker.runtime import open_runtime

KEY = "bench-erasure-key-of-at-least-32-bytes"


async def _timed(conn: asyncpg.Connection, key: int, repeat: int) -> tuple[float, dict[str, int] | None]:
    best, removed = float("inf"), None
    for _ in range(repeat):
        tx = conn.transaction()
        await tx.start()
        try:
            started = time.perf_counter()
            removed = await apply_to_key(conn, key, KEY)
            best = min(best, time.perf_counter() - started)
        finally:
            await tx.rollback()
    return best, removed


async def _measure(settings: Settings, jobs: list[synth.JobFixture], repeat: int) -> None:
    async with open_runtime(settings) as rt:
        for fx in jobs:
            outcome = await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))
            print(f"ingest {fx.job_id}: {outcome.outcome}, {outcome.pages} pages, {outcome.faces} faces", flush=True)
    conn = await connect(settings.asyncpg_dsn)
    try:
        keys = {r["job_id"]: r["ingest_id"] for r in await conn.fetch("SELECT job_id, ingest_id FROM jobs")}
        for case in ("no erasure", "1000 erasures, none in the job", "the job's most matched identity erased"):
            if case.startswith("1000"):
                await remember(conn, KEY, [("external_image_id", secrets.token_hex(8)) for _ in range(1000)])
            elif case.startswith("the job"):
                value = await conn.fetchval("SELECT external_image_id FROM collection_faces GROUP BY 1 "
                                            "ORDER BY count(*) DESC, 1 LIMIT 1")
                await remember(conn, KEY, [("external_image_id", value)])
            for fx in jobs:
                seconds, removed = await _timed(conn, keys[fx.job_id], repeat)
                gone = "" if not removed else (f": {removed['persons']} persons, {removed['faces']} faces, "
                                               f"{removed['pages_rewritten']} pages rewritten")
                print(f"{case}: {fx.job_id} {seconds * 1000:.1f} ms{gone}", flush=True)
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--search-elements", type=int, default=10_000)
    parser.add_argument("--faces", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    server = None
    url = os.environ.get("DATABASE_URL")
    if not url:
        from worker.local.pg import start_embedded_postgres

        server, url = start_embedded_postgres(Path(tempfile.mkdtemp(prefix="erasure-bench-")) / "pgdata")
    from worker.db.migrate import upgrade_to_head

    settings = Settings(database_url=url, rekognition_tps=1000.0, erasure_hash_key=KEY)
    upgrade_to_head(settings)
    jobs = [synth.search_job("bench-pass-search", persons_elements=args.search_elements, seed=0),
            synth.detection_job("bench-pass-detection", faces=args.faces, attributes="ALL")]
    try:
        with EmulatorThread(EmulatorConfig(), jobs=jobs) as emu:
            os.environ["AWS_ENDPOINT_URL_REKOGNITION"] = emu.url
            asyncio.run(_measure(settings, jobs, args.repeat))
    finally:
        if server is not None:
            server.cleanup_mode = "delete"
            server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
