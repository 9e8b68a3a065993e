"""Citus-safe forms of the per-job delete trigger and of three reporting views, the same on one PostgreSQL.

0012's trigger joined each bulk table to the statement's transition table (``DELETE ... USING ingests i,
gone``). Citus cannot plan a distributed table joined to a transition table ("unrecognized RTE kind: 7"), so
on a Citus cluster every ``DELETE FROM jobs`` failed, `delete` and retention included. The trigger now
collects the deleted jobs' keys from ``ingests`` (a coordinator table) into an array and deletes each bulk
table's rows by ``ingest_id = ANY (keys)``: a plain filter on the distribution column, which PostgreSQL
runs on the same indexes as before and Citus routes to the shards holding those keys. The statements that
touch only coordinator tables (``ingests``, ``job_retries``) keep their join to ``gone``.

person_identities, collection_face_sightings and person_seconds aggregate one job's rows in a LATERAL
subquery over ``jobs`` (0012). Citus runs such a subquery on every shard, joined to the rows of ``jobs``
it ships there, only when its GROUP BY holds the distribution column ("Group by list without partition
column is currently unsupported when a lateral subquery references a column from ... local tables"). The
subqueries now group by ``ingest_id`` too: one value per job (the subquery is filtered on it), so the rows,
columns, grants and comments are unchanged (CREATE OR REPLACE VIEW), and PostgreSQL's plans are the same.

reporting.person_segments becomes PL/pgSQL with the same body. Citus cannot plan a SQL function over
distributed tables, inlined or not ("parameterized queries for SQL functions referencing distributed tables
are not supported"); a PL/pgSQL function's query is planned as a statement of its own, with the job id as a
parameter, on both engines. Its signature, rights (the caller's: it reads reporting.face_observations),
grants and comment stay.

The bulk tables themselves are distributed by the step that runs after every upgrade to head
(worker/db/citus.py, from migrations/env.py), not here: a later migration that adds a bulk table gets it
distributed the same way.

Revision ID: 0015
Revises: 0012
Create Date: 2026-12-06
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

SCHEMA = "rekognition"
# The bulk tables as of 0012 (schema.KEYED_TABLES), frozen as this migration ran.
KEYED = ("faces", "landmarks", "emotions", "face_matches", "collection_faces", "persons", "raw_pages")

_DELETE_JOB_ROWS = f"""
CREATE OR REPLACE FUNCTION {SCHEMA}.delete_job_rows() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    keys integer[];
BEGIN
    SELECT array_agg(i.ingest_id) INTO keys FROM {SCHEMA}.ingests i JOIN gone ON gone.job_id = i.job_id;
    IF keys IS NOT NULL THEN
{"".join(f"        DELETE FROM {SCHEMA}.{t} WHERE ingest_id = ANY (keys);{chr(10)}" for t in KEYED)}\
    END IF;
    DELETE FROM {SCHEMA}.ingests c USING gone WHERE c.job_id = gone.job_id;
    DELETE FROM {SCHEMA}.job_retries c USING gone WHERE c.job_id = gone.job_id;
    RETURN NULL;
END
$$
"""

# 0012's body, for the downgrade.
_DELETE_JOB_ROWS_0012 = f"""
CREATE OR REPLACE FUNCTION {SCHEMA}.delete_job_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
{"".join(f"    DELETE FROM {SCHEMA}.{t} c USING {SCHEMA}.ingests i, gone "
         f"WHERE c.ingest_id = i.ingest_id AND i.job_id = gone.job_id;{chr(10)}" for t in KEYED)}\
    DELETE FROM {SCHEMA}.ingests c USING gone WHERE c.job_id = gone.job_id;
    DELETE FROM {SCHEMA}.job_retries c USING gone WHERE c.job_id = gone.job_id;
    RETURN NULL;
END
$$
"""


# 0012's views that aggregate in a LATERAL subquery, as 0012 created them.
VIEW_SQL_0012 = {
    "person_identities": """
    CREATE OR REPLACE VIEW reporting.person_identities AS
    SELECT j.job_id, g.person_index, g.face_id, g.external_image_id, g.matches, g.max_similarity,
           g.first_matched_ms, g.last_matched_ms,
           row_number() OVER (PARTITION BY j.job_id, g.person_index
                              ORDER BY g.matches DESC, g.max_similarity DESC NULLS LAST, g.face_id) AS match_rank
    FROM rekognition.jobs j
    CROSS JOIN LATERAL (
        SELECT f.person_index, m.face_id, cf.external_image_id,
               count(*) AS matches, max(m.similarity) AS max_similarity,
               min(f.timestamp_ms) AS first_matched_ms, max(f.timestamp_ms) AS last_matched_ms
        FROM rekognition.faces f
        JOIN rekognition.face_matches m ON m.ingest_id = f.ingest_id AND m.face_seq = f.face_seq
        LEFT JOIN rekognition.collection_faces cf ON cf.ingest_id = m.ingest_id AND cf.face_id = m.face_id
        WHERE f.ingest_id = j.ingest_id AND f.person_index IS NOT NULL
        GROUP BY f.person_index, m.face_id, cf.external_image_id
    ) g
    WHERE j.ingest_state = 'ingested'
    """,
    "collection_face_sightings": """
    CREATE OR REPLACE VIEW reporting.collection_face_sightings AS
    SELECT j.job_id, s.face_id, s.external_image_id, s.image_id, s.user_id, s.first_seen_ms, s.last_seen_ms,
           s.matches, s.max_similarity, s.persons
    FROM rekognition.jobs j
    CROSS JOIN LATERAL (
        SELECT m.face_id, cf.external_image_id, cf.image_id, cf.user_id,
               min(f.timestamp_ms) AS first_seen_ms, max(f.timestamp_ms) AS last_seen_ms,
               count(*) AS matches, max(m.similarity) AS max_similarity,
               count(DISTINCT f.person_index) AS persons
        FROM rekognition.face_matches m
        JOIN rekognition.faces f ON f.ingest_id = m.ingest_id AND f.face_seq = m.face_seq
        LEFT JOIN rekognition.collection_faces cf ON cf.ingest_id = m.ingest_id AND cf.face_id = m.face_id
        WHERE m.ingest_id = j.ingest_id
        GROUP BY m.face_id, cf.external_image_id, cf.image_id, cf.user_id
    ) s
    WHERE j.ingest_state = 'ingested'
    """,
    "person_seconds": """
    CREATE OR REPLACE VIEW reporting.person_seconds AS
    SELECT j.job_id, t.person_index, t.second, t.detections, t.samples, t.max_at_once, t.max_confidence,
           t.first_ms, t.last_ms
    FROM rekognition.jobs j
    CROSS JOIN LATERAL (
        SELECT u.person_index, u.second, sum(u.n)::bigint AS detections, count(*) AS samples,
               max(u.n) AS max_at_once, max(u.max_confidence) AS max_confidence,
               min(u.timestamp_ms) AS first_ms, max(u.timestamp_ms) AS last_ms
        FROM (
            SELECT f.person_index, f.timestamp_ms / 1000 AS second, f.timestamp_ms,
                   count(*) AS n, max(f.confidence) AS max_confidence
            FROM rekognition.faces f
            WHERE f.ingest_id = j.ingest_id
            GROUP BY f.person_index, f.timestamp_ms
        ) u
        GROUP BY u.person_index, u.second
    ) t
    WHERE j.ingest_state = 'ingested'
    """,
}
# The same views grouped by the distribution column as well: (old text, new text) per view.
_GROUP_BY_KEY = {
    "person_identities": (("GROUP BY f.person_index, m.face_id", "GROUP BY f.ingest_id, f.person_index, m.face_id"),),
    "collection_face_sightings": (("GROUP BY m.face_id", "GROUP BY m.ingest_id, m.face_id"),),
    "person_seconds": (
        ("SELECT f.person_index, f.timestamp_ms / 1000", "SELECT f.ingest_id, f.person_index, f.timestamp_ms / 1000"),
        ("GROUP BY f.person_index, f.timestamp_ms", "GROUP BY f.ingest_id, f.person_index, f.timestamp_ms"),
        ("GROUP BY u.person_index, u.second", "GROUP BY u.ingest_id, u.person_index, u.second"),
    ),
}


_SEGMENTS_QUERY = """
    WITH marked AS (
        SELECT f.person_index, f.timestamp_ms,
               CASE WHEN f.timestamp_ms - lag(f.timestamp_ms) OVER w <= p_max_gap_ms THEN 0 ELSE 1 END
                   AS starts_segment
        FROM reporting.face_observations f
        WHERE f.job_id = p_job_id
        WINDOW w AS (PARTITION BY f.person_index ORDER BY f.timestamp_ms)
    ), numbered AS (
        SELECT m.person_index, m.timestamp_ms,
               sum(m.starts_segment) OVER (PARTITION BY m.person_index ORDER BY m.timestamp_ms
                                           ROWS UNBOUNDED PRECEDING) AS segment_no
        FROM marked m
    )
    SELECT n.person_index, n.segment_no::bigint, min(n.timestamp_ms), max(n.timestamp_ms), count(*)
    FROM numbered n
    GROUP BY n.person_index, n.segment_no
    ORDER BY n.person_index NULLS FIRST, n.segment_no"""
_SEGMENTS_HEAD = """
CREATE OR REPLACE FUNCTION reporting.person_segments(p_job_id text, p_max_gap_ms bigint DEFAULT 1000)
RETURNS TABLE (person_index bigint, segment_no bigint, start_ms bigint, end_ms bigint, detections bigint)
"""
# The output columns are PL/pgSQL variables too: the query's (qualified) columns win over them.
PERSON_SEGMENTS = (_SEGMENTS_HEAD + "LANGUAGE plpgsql STABLE AS $$\n#variable_conflict use_column\nBEGIN\n"
                   "    RETURN QUERY" + _SEGMENTS_QUERY + ";\nEND\n$$\n")
# 0010's SQL function, for the downgrade.
PERSON_SEGMENTS_0010 = _SEGMENTS_HEAD + "LANGUAGE sql STABLE AS $$" + _SEGMENTS_QUERY + "\n$$\n"


def view_sql(view: str) -> str:
    sql = VIEW_SQL_0012[view]
    for old, new in _GROUP_BY_KEY[view]:
        assert sql.count(old) == 1, (view, old)
        sql = sql.replace(old, new)
    return sql


def upgrade() -> None:
    op.execute(_DELETE_JOB_ROWS)
    for view in VIEW_SQL_0012:
        op.execute(view_sql(view))
    op.execute(PERSON_SEGMENTS)


def downgrade() -> None:
    op.execute(PERSON_SEGMENTS_0010)
    for view in VIEW_SQL_0012:
        op.execute(VIEW_SQL_0012[view])
    op.execute(_DELETE_JOB_ROWS_0012)
