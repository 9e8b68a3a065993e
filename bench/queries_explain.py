"""docs/queries.md on a million observations, before and after migration 0012 (per-ingest keys).

Builds the data set of tests/test_reporting_explain.py (200 jobs of 5000 faces, half of them face search with
375,000 matches) at revision 0010, where every row carries its JobId, and runs every query of docs/queries.md
with EXPLAIN ANALYZE (the demo's job ids and names replaced by ones of the data set); then migrates the same
data to head and runs them again. Prints the median execution time of 3 runs of each, and the table sizes.

    .venv/bin/python bench/queries_explain.py               # embedded PostgreSQL in a temporary directory
    DATABASE_URL=postgresql://... .venv/bin/python bench/queries_explain.py --plans   # and print the plans
    .venv/bin/python bench/queries_explain.py --citus       # on a coordinator and two workers (docs/citus.md)

With ``--citus`` the data set is generated on a throwaway Citus cluster (worker/local/citus.py); the migration
to head distributes it, and each query's plan is classified: the number of shard tasks Citus runs (1: a
single-shard, router query) and the subplans it runs first (results shipped between nodes).
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


# Per query heading: (shard tasks, distributed subplans) of its last plan on Citus.
SHAPES: dict[str, tuple[int, int]] = {}


def _shape(node: Any) -> tuple[int, int]:
    """(largest Task Count, number of Distributed Subplans) anywhere in a Citus plan."""
    tasks, subplans = 0, 0
    if isinstance(node, dict):
        tasks = int(node.get("Task Count", 0))
        subplans = len(node.get("Subplans", []) or [])
        for value in node.values():
            t, s = _shape(value)
            tasks, subplans = max(tasks, t), subplans + s
    elif isinstance(node, list):
        for value in node:
            t, s = _shape(value)
            tasks, subplans = max(tasks, t), subplans + s
    return tasks, subplans


async def _time(conn: Any, sql: str, runs: int, plans: bool, heading: str = "") -> float:
    times = []
    for n in range(runs):
        result = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}")
        plan = (result if isinstance(result, list) else json.loads(result))[0]
        times.append(plan["Execution Time"])
        SHAPES[heading] = _shape(plan)
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
            out[heading] = await _time(conn, sql, runs, plans, heading)
        citus = await conn.fetchval("SELECT to_regclass('pg_dist_partition') IS NOT NULL")
        size = ("CASE WHEN EXISTS (SELECT 1 FROM pg_dist_partition p WHERE p.logicalrelid = c.oid) "
                "THEN citus_total_relation_size(c.oid) ELSE pg_total_relation_size(c.oid) END") if citus \
            else "pg_total_relation_size(c.oid)"
        sizes = await conn.fetch(
            f"SELECT c.relname, {size} AS bytes FROM pg_class c "
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
    parser.add_argument("--citus", action="store_true",
                        help="on a coordinator and two workers from the installed Citus")
    parser.add_argument("--citus-pg-bin", default="/usr/lib/postgresql/15/bin")
    args = parser.parse_args()
    from alembic import command

    from worker.config import Settings
    from worker.db.migrate import alembic_config

    server = None
    cluster = None
    url = os.environ.get("DATABASE_URL")
    if args.citus:
        from worker.local.citus import create_citus_database, start_cluster

        cluster = start_cluster(bin_dir=Path(args.citus_pg_bin), durable=True)
        asyncio.run(create_citus_database(cluster, "queries"))
        url = cluster.url("queries")
    elif not url:
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
        if cluster is not None:
            cluster.stop()
    print(f"\n{'docs/queries.md query':<58} {'0010 ms':>9} {'head ms':>9}" + ("  tasks subplans" if cluster else ""))
    for heading in before:
        shape = f"  {SHAPES[heading][0]:>5} {SHAPES[heading][1]:>8}" if cluster else ""
        print(f"{heading[:58]:<58} {before[heading]:>9.1f} {after[heading]:>9.1f}{shape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
