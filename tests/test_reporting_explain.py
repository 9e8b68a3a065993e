"""The reporting views stay fast on large tables: per-job and per-face questions use indexes.

A million observations (200 jobs of 5000 faces, half of them face search with 375,000 matches) are
generated with generate_series straight into the tables, in the shape the store writes them. Each
question a report or a downstream user asks is planned and run with EXPLAIN ANALYZE: none may read
`faces` or `face_matches` sequentially, and each must touch a small fraction of their pages.

Run as a module to print the plans for docs/reporting.md against a database of your choice:
``python -m tests.test_reporting_explain postgresql://...`` (it generates the data there first).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

pytestmark = pytest.mark.slow

JOBS = 200
FACES_PER_JOB = 5000
SEARCH_JOB = "big-0100"
DETECTION_JOB = "big-0101"

# Job n's rows are under ingest key n + 1 (0012), as the store writes them: registered in ingests, named by jobs.
GENERATE = (
    f"""
    INSERT INTO jobs (job_id, api, job_status, ingest_state, video_bucket, video_name, duration_ms, pages, faces,
                      ingest_started_at, ingested_at, ingest_id)
    SELECT 'big-' || lpad(n::text, 4, '0'),
           CASE WHEN n % 2 = 0 THEN 'FACE_SEARCH' ELSE 'FACE_DETECTION' END::face_api, 'SUCCEEDED', 'ingested',
           'bucket', 'videos/' || n || '.mp4', {FACES_PER_JOB // 4 * 250 + 1000}, {FACES_PER_JOB // 1000},
           {FACES_PER_JOB}, now(), now(), n + 1
    FROM generate_series(0, {JOBS - 1}) n
    """,
    "INSERT INTO ingests (ingest_id, job_id) SELECT ingest_id, job_id FROM jobs",
    f"SELECT setval('ingest_ids', {JOBS})",
    # Four faces per sampled frame, a frame every 250 ms; search jobs cycle through eight persons. Rows
    # are inserted job by job, as the store's COPY writes them, so a job's rows share heap pages.
    f"""
    INSERT INTO faces (ingest_id, face_seq, timestamp_ms, person_index, has_face, confidence)
    SELECT n + 1, s, (s / 4) * 250, CASE WHEN n % 2 = 0 THEN s % 8 END, true, 90 + s % 10
    FROM generate_series(0, {JOBS - 1}) n, generate_series(0, {FACES_PER_JOB - 1}) s
    ORDER BY n, s
    """,
    # Six of the eight persons match a collection face; 50 collection faces shared across videos.
    f"""
    INSERT INTO face_matches (ingest_id, face_seq, ordinal, face_id, similarity)
    SELECT n + 1, s, 0, 'face-' || ((n + s % 8) % 50), 80 + s % 20
    FROM generate_series(0, {JOBS - 1}, 2) n, generate_series(0, {FACES_PER_JOB - 1}) s
    WHERE s % 8 < 6
    ORDER BY n, s
    """,
    """
    INSERT INTO collection_faces (ingest_id, face_id, external_image_id)
    SELECT DISTINCT ingest_id, face_id, 'employee-' || substr(face_id, 6) FROM face_matches
    """,
    """
    INSERT INTO persons (ingest_id, person_index, first_seen_ms, last_seen_ms, detections)
    SELECT ingest_id, person_index, min(timestamp_ms), max(timestamp_ms), count(*)
    FROM faces WHERE person_index IS NOT NULL GROUP BY ingest_id, person_index
    """,
    """
    UPDATE jobs j SET persons = (SELECT count(*) FROM persons p WHERE p.ingest_id = j.ingest_id),
                      face_matches = (SELECT count(*) FROM face_matches m WHERE m.ingest_id = j.ingest_id),
                      collection_faces = (SELECT count(*) FROM collection_faces c WHERE c.ingest_id = j.ingest_id)
    """,
    "VACUUM ANALYZE",
)

# (what is asked, the SQL): the report's questions and the common ones from docs/queries.md.
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("one job's summary", f"SELECT * FROM reporting.job_summary WHERE job_id = '{SEARCH_JOB}'"),
    ("persons of one job, with screen time",
     f"SELECT * FROM reporting.person_appearances WHERE job_id = '{SEARCH_JOB}'"),
    ("identities of one job's persons",
     f"SELECT * FROM reporting.person_identities WHERE job_id = '{SEARCH_JOB}' AND match_rank = 1"),
    ("collection faces seen in one job",
     f"SELECT * FROM reporting.collection_face_sightings WHERE job_id = '{SEARCH_JOB}'"),
    ("every video one known face appeared in",
     "SELECT * FROM reporting.collection_face_sightings WHERE external_image_id = 'employee-7'"),
    ("per-second presence in one job", f"SELECT * FROM reporting.person_seconds WHERE job_id = '{SEARCH_JOB}'"),
    ("faces on screen per second, detection job",
     f"SELECT * FROM reporting.person_seconds WHERE job_id = '{DETECTION_JOB}'"),
    ("observations in a time window",
     f"SELECT * FROM reporting.face_observations WHERE job_id = '{SEARCH_JOB}' "
     "AND timestamp_ms BETWEEN 60000 AND 90000"),
    ("on-screen segments of one job", f"SELECT * FROM reporting.person_segments('{SEARCH_JOB}')"),
)
# person_segments is PL/pgSQL (0015: the one form Citus also plans), so EXPLAIN of a call shows a Function
# Scan only: the question is asked of the query the function runs, with the call's values.
_SEGMENTS_CALL = f"SELECT * FROM reporting.person_segments('{SEARCH_JOB}')"


async def _runs(conn: asyncpg.Connection, sql: str) -> str:
    """The statement a question runs: itself, or the query inside person_segments."""
    if sql != _SEGMENTS_CALL:
        return sql
    body = await conn.fetchval("SELECT prosrc FROM pg_proc WHERE oid = 'reporting.person_segments(text, bigint)'"
                               "::regprocedure")
    query = body.split("RETURN QUERY", 1)[1].rsplit(";", 1)[0]
    return query.replace("p_job_id", f"'{SEARCH_JOB}'").replace("p_max_gap_ms", "1000")
BIG_TABLES = ("faces", "face_matches")


async def generate(conn: asyncpg.Connection) -> None:
    for statement in GENERATE:
        await conn.execute(statement)


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


async def explain(conn: asyncpg.Connection, sql: str) -> dict[str, Any]:
    result = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}")
    plan: dict[str, Any] = (result if isinstance(result, list) else json.loads(result))[0]
    return plan


def rows_read(nodes: list[dict[str, Any]], table: str) -> int:
    """Rows the plan read from ``table``, including those a filter threw away, over all loops."""
    return sum((n["Actual Rows"] + n.get("Rows Removed by Filter", 0) + n.get("Rows Removed by Index Recheck", 0))
               * n["Actual Loops"] for n in nodes if n.get("Relation Name") == table)


async def test_per_job_and_per_face_questions_use_indexes(db: asyncpg.Connection) -> None:
    await generate(db)
    sizes = {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in BIG_TABLES}
    assert sizes["faces"] == JOBS * FACES_PER_JOB
    for question, sql in QUESTIONS:
        plan = await explain(db, await _runs(db, sql))
        nodes = list(_nodes(plan["Plan"]))
        seq = [n["Relation Name"] for n in nodes
               if n["Node Type"] == "Seq Scan" and n.get("Relation Name") in BIG_TABLES]
        assert not seq, f"{question}: sequential scan of {seq}"
        assert any(n["Node Type"].startswith(("Index", "Bitmap")) for n in nodes), question
        # One job is 0.5 % of each table, one collection face is in 12 of the 100 search jobs: reading more
        # than 2 % of a big table means an index did not narrow the scan.
        for table, size in sizes.items():
            assert rows_read(nodes, table) <= 0.02 * size, f"{question}: read {rows_read(nodes, table)} of {table}"
        assert plan["Execution Time"] < 2000, f"{question}: {plan['Execution Time']} ms"


async def _print_plans(url: str) -> None:
    from worker.db.engine import connect  # any database: the worker's search_path, not the database's

    conn = await connect(url)
    try:
        if not await conn.fetchval("SELECT count(*) FROM faces"):
            await generate(conn)
        for question, call in QUESTIONS:
            sql = await _runs(conn, call)
            print(f"#### {question}\n\n```sql\n{sql};\n```\n\n```")
            for row in await conn.fetch(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) {sql}"):
                print(row[0])
            print("```\n")
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(_print_plans(sys.argv[1]))
