"""Times `delete` of a 50-page, 50,000-face full-attribute detection job and `erase` across search jobs.

Runs against an embedded PostgreSQL (or DATABASE_URL) and the emulator in this process; the jobs are
written through the real ingest path. Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from worker.config import Settings
from worker.db.engine import connect
from worker.lifecycle import count_job_rows, delete_job, erase
from worker.local import synth
from worker.local.emulator import EmulatorConfig, EmulatorThread
from worker.messages import JobRef
from worker.runtime import open_runtime


async def _measure(settings: Settings, det: synth.JobFixture, searches: list[synth.JobFixture]) -> None:
    async with open_runtime(settings) as rt:
        for fx in (det, *searches):
            started = time.monotonic()
            outcome = await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))
            print(f"ingest {fx.job_id}: {outcome.outcome}, {outcome.pages} pages, {outcome.rows} rows, "
                  f"{time.monotonic() - started:.1f} s", flush=True)
    conn = await connect(settings.asyncpg_dsn)  # sets the search_path to the worker's schema
    try:
        value = await conn.fetchval("SELECT external_image_id FROM collection_faces GROUP BY 1 "
                                    "ORDER BY count(*) DESC, 1 LIMIT 1")
        started = time.monotonic()
        result = await erase(conn, "external_image_id", value, key="bench-key")
        print(f"erase --external-image-id {value}: {time.monotonic() - started:.2f} s, {result.counts}", flush=True)
        rows = await count_job_rows(conn, det.job_id)
        started = time.monotonic()
        removal = await delete_job(conn, det.job_id)
        print(f"delete {det.job_id}: {removal.outcome}, {sum(rows.values())} rows, "
              f"{time.monotonic() - started:.2f} s ({removal.rows})", flush=True)
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--faces", type=int, default=50_000)
    parser.add_argument("--search-jobs", type=int, default=3)
    parser.add_argument("--search-elements", type=int, default=10_000)
    args = parser.parse_args(argv)
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    server = None
    url = os.environ.get("DATABASE_URL")
    if not url:
        from worker.local.pg import start_embedded_postgres

        server, url = start_embedded_postgres(Path(tempfile.mkdtemp(prefix="lifecycle-bench-")) / "pgdata")
    from worker.db.migrate import upgrade_to_head

    settings = Settings(database_url=url, rekognition_tps=1000.0)
    upgrade_to_head(settings)
    det = synth.detection_job("bench-delete-50p", faces=args.faces, attributes="ALL")
    searches = [synth.search_job(f"bench-erase-{n}", persons_elements=args.search_elements, seed=0)
                for n in range(args.search_jobs)]
    try:
        with EmulatorThread(EmulatorConfig(), jobs=[det, *searches]) as emu:
            os.environ["AWS_ENDPOINT_URL_REKOGNITION"] = emu.url
            asyncio.run(_measure(settings, det, searches))
    finally:
        if server is not None:
            server.cleanup_mode = "delete"
            server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
