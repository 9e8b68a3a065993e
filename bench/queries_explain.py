"""docs/queries.md on a million observations, before and after migration 0012 (per-ingest keys).

Builds the data set of tests/test_reporting_explain.py (200 jobs of 5000 faces, half of them face search with
375,000 matches) at revision 0010, where every row carries its JobId, and runs every query of docs/queries.md
with EXPLAIN ANALYZE (the demo's job ids and names replaced by ones of the data set); then migrates the same
data to head and runs them again. Prints the median execution time of 3 runs of each, and the table sizes.

    .venv/bin/python bench/queries_explain.py               # embedded PostgreSQL in a temporary directory
    DATABASE_URL=postgresql://... .venv/bin/python bench/queries_explain.py --plans   # and print the plans
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JOBS, FACES_PER_JOB = 200, 5000
# The data set at 0010: JobId text in every row.
GENERATE_0010 = (
    f"""
    INSERT INTO jobs (job_id, api, job_status, ingest_state, video_bucket, video_name, duration_ms, pages, faces,
                      ingest_started_at, ingested_at, notified_at)
    SELECT 'big-' || lpad(n::text, 4, '0'),
           CASE WHEN n % 2 = 0 THEN 'FACE_SEARCH' ELSE 'FACE_DETECTION' END::face_api, 'SUCCEEDED', 'ingested',
           'bucket', 'videos/' || n || '.mp4', {FACES_PER_JOB // 4 * 250 + 1000}, {FACES_PER_JOB // 1000},
           {FACES_PER_JOB}, now(), now(), now() - n * interval '1 minute'
    FROM generate_series(0, {JOBS - 1}) n
    """,
    f"""
    INSERT INTO faces (job_id, face_seq, timestamp_ms, person_index, has_face, confidence)
    SELECT 'big-' || lpad(n::text, 4, '0'), s, (s / 4) * 250, CASE WHEN n % 2 = 0 THEN s % 8 END, true, 90 + s % 10
    FROM generate_series(0, {JOBS - 1}) n, generate_series(0, {FACES_PER_JOB - 1}) s
    ORDER BY n, s
    """,
    f"""
    INSERT INTO face_matches (job_id, face_seq, ordinal, face_id, similarity)
    SELECT 'big-' || lpad(n::text, 4, '0'), s, 0, 'face-' || ((n + s % 8) % 50), 80 + s % 20
    FROM generate_series(0, {JOBS - 1}, 2) n, generate_series(0, {FACES_PER_JOB - 1}) s
    WHERE s % 8 < 6
    ORDER BY n, s
    """,
    """
    INSERT INTO collection_faces (job_id, face_id, external_image_id)
    SELECT DISTINCT job_id, face_id, 'employee-' || substr(face_id, 6) FROM face_matches
    """,
    """
    INSERT INTO persons (job_id, person_index, first_seen_ms, last_seen_ms, detections)
    SELECT job_id, person_index, min(timestamp_ms), max(timestamp_ms), count(*)
    FROM faces WHERE person_index IS NOT NULL GROUP BY job_id, person_index
    """,
    """
    UPDATE jobs j SET persons = (SELECT count(*) FROM persons p WHERE p.job_id = j.job_id),
                      face_matches = (SELECT count(*) FROM face_matches m WHERE m.job_id = j.job_id),
                      collection_faces = (SELECT count(*) FROM collection_faces c WHERE c.job_id = j.job_id)
    """,
)
# The demo's names in docs/queries.md -> names in this data set.
RENAMES = {"demo-search-office-0004": "big-0100", "demo-search-entrance-0003": "big-0102",
           "demo-det-lobby-0001": "big-0101", "employee-03": "employee-7"}


def queries() -> list[tuple[str, str]]:
    """(heading, SQL) of every sql block of docs/queries.md, with this data set's names."""
    text = (ROOT / "docs" / "queries.md").read_text()
    out, heading = [], ""
    for line_block in re.split(r"(^## .*$)", text, flags=re.MULTILINE):
        if line_block.startswith("## "):
            heading = line_block[3:].strip()
            continue
        for sql in re.findall(r"```sql\n(.*?)```", line_block, flags=re.DOTALL):
            for old, new in RENAMES.items():
                sql = sql.replace(old, new)
            taken = sum(h.startswith(heading) for h, _ in out)
            name = f"{heading} ({taken + 1})" if taken else heading
            out.append((name, sql.strip().rstrip(";")))
    return out


async def _time(conn: Any, sql: str, runs: int, plans: bool) -> float:
    times = []
    for n in range(runs):
        result = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}")
        plan = (result if isinstance(result, list) else json.loads(result))[0]
        times.append(plan["Execution Time"])
        if plans and n == 0:
            for row in await conn.fetch(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) {sql}"):
                print("    " + row[0])
    return median(times)


async def _measure(url: str, runs: int, plans: bool) -> dict[str, float]:
    from worker.db.engine import connect

    conn = await connect(url)
    try:
        await conn.execute("VACUUM ANALYZE")
        out = {}
        for heading, sql in queries():
            if plans:
                print(f"-- {heading}")
            out[heading] = await _time(conn, sql, runs, plans)
        sizes = await conn.fetch(
            "SELECT c.relname, pg_total_relation_size(c.oid) AS bytes FROM pg_class c "
            "WHERE c.relnamespace = 'rekognition'::regnamespace AND c.relkind = 'r' ORDER BY 2 DESC LIMIT 6")
        print("    sizes: " + ", ".join(f"{r['relname']} {r['bytes'] / 2**20:.1f} MB" for r in sizes))
        return out
    finally:
        await conn.close()


async def _generate(url: str) -> None:
    from worker.db.engine import connect

    conn = await connect(url)
    try:
        for statement in GENERATE_0010:
            await conn.execute(statement)
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--plans", action="store_true", help="print each plan (EXPLAIN ANALYZE) too")
    args = parser.parse_args()
    from alembic import command

    from worker.config import Settings
    from worker.db.migrate import alembic_config

    server = None
    url = os.environ.get("DATABASE_URL")
    if not url:
        from worker.local.pg import start_embedded_postgres

        server, url = start_embedded_postgres(Path(tempfile.mkdtemp(prefix="queries-pg-")) / "pgdata")
    try:
        cfg = alembic_config(Settings(database_url=url))
        command.upgrade(cfg, "0010")
        asyncio.run(_generate(url))
        print("at 0010 (JobId in every row):")
        before = asyncio.run(_measure(url, args.runs, args.plans))
        started = time.perf_counter()
        command.upgrade(cfg, "head")
        print(f"migration to head: {time.perf_counter() - started:.1f} s")
        print("at head (per-ingest keys):")
        after = asyncio.run(_measure(url, args.runs, args.plans))
    finally:
        if server is not None:
            server.cleanup_mode = "delete"
            server.cleanup()
    print(f"\n{'docs/queries.md query':<58} {'0010 ms':>9} {'head ms':>9}")
    for heading in before:
        print(f"{heading[:58]:<58} {before[heading]:>9.1f} {after[heading]:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
