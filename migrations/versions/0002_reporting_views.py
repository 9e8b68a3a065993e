"""Reporting surface: schema `reporting` with views over completely ingested jobs.

A job's rows are written in one transaction together with its `jobs` row, so a reader's snapshot
holds either the previous complete ingest of a job or the new one, never a mix, and a job that is
being ingested for the first time has no committed rows at all. The views still join `jobs` on
`ingest_state = 'ingested'`, so that a job whose rows were dropped on failure (or any row a
future writer leaves behind) never shows up outside `job_summary`.

Every view keeps `job_id` as a grouping or join column, so `WHERE job_id = ...` is pushed down to
the base tables and answered from their `(job_id, ...)` primary keys and indexes; docs/reporting.md
shows the plans on a million observations.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

STATEMENTS = (
    "CREATE SCHEMA IF NOT EXISTS reporting",
    # One row per job the worker finished, ingested or failed. The counters were written by the
    # store in the same transaction as the rows, so they equal the rows without counting them
    # (a count(*) per job would scan a million-row table for a one-line summary).
    """
    CREATE VIEW reporting.job_summary AS
    SELECT j.job_id, j.api, j.job_status, j.ingest_state, j.status_message, j.failure_code, j.failure_reason,
           j.job_tag, j.video_bucket, j.video_name, j.video_version,
           CASE WHEN j.video_bucket IS NOT NULL AND j.video_name IS NOT NULL
                THEN 's3://' || j.video_bucket || '/' || j.video_name END AS video_uri,
           j.video_codec, j.video_format, j.duration_ms, j.frame_rate, j.frame_width, j.frame_height,
           j.color_range, j.pages,
           j.faces, j.persons, j.face_matches AS collection_matches,
           j.collection_faces AS distinct_collection_faces,
           j.attempts, j.notified_at, j.ingest_started_at, j.ingested_at, j.updated_at
    FROM jobs j
    """,
    # Every collection face a person matched, with how often and how well. match_rank = 1 is the
    # person's identity: the face matched in most elements, then the most similar one, then the
    # smallest FaceId so that ties resolve the same way on every run. The jobs filter sits above
    # the aggregate (here and below): joined inside, it leads the planner to scan a whole index
    # per job instead of looking matches up by (face_id, job_id).
    """
    CREATE VIEW reporting.person_identities AS
    SELECT g.job_id, g.person_index, g.face_id, g.external_image_id, g.matches, g.max_similarity,
           g.first_matched_ms, g.last_matched_ms,
           row_number() OVER (PARTITION BY g.job_id, g.person_index
                              ORDER BY g.matches DESC, g.max_similarity DESC NULLS LAST, g.face_id) AS match_rank
    FROM (
        SELECT f.job_id, f.person_index, m.face_id, cf.external_image_id,
               count(*) AS matches, max(m.similarity) AS max_similarity,
               min(f.timestamp_ms) AS first_matched_ms, max(f.timestamp_ms) AS last_matched_ms
        FROM faces f
        JOIN face_matches m ON m.job_id = f.job_id AND m.face_seq = f.face_seq
        LEFT JOIN collection_faces cf ON cf.job_id = m.job_id AND cf.face_id = m.face_id
        WHERE f.person_index IS NOT NULL
        GROUP BY f.job_id, f.person_index, m.face_id, cf.external_image_id
    ) g
    JOIN jobs j ON j.job_id = g.job_id AND j.ingest_state = 'ingested'
    """,
    # One row per face search person per job, straight from `persons` (derived by the store in the
    # job's transaction). seconds_present is a scalar subquery, evaluated only when a query asks
    # for it, so the contract columns stay a primary key lookup. The person's identity is
    # deliberately not joined in here: PostgreSQL cannot drop a join to an aggregate once
    # `job_id = const` is pushed into it, so every query would pay for matching; join
    # person_identities (match_rank = 1) when you want names.
    """
    CREATE VIEW reporting.person_appearances AS
    SELECT p.job_id, p.person_index, p.first_seen_ms, p.last_seen_ms, p.detections,
           p.last_seen_ms - p.first_seen_ms AS span_ms,
           (SELECT count(DISTINCT f.timestamp_ms / 1000) FROM faces f
             WHERE f.job_id = p.job_id AND f.person_index = p.person_index) AS seconds_present
    FROM persons p
    JOIN jobs j ON j.job_id = p.job_id AND j.ingest_state = 'ingested'
    """,
    # One row per collection face per job. Grouping by the collection_faces columns (one row per
    # (job_id, face_id)) rather than joining them after the aggregate lets a filter on
    # external_image_id start from collection_faces instead of aggregating every match of every job.
    """
    CREATE VIEW reporting.collection_face_sightings AS
    SELECT s.job_id, s.face_id, s.external_image_id, s.image_id, s.user_id, s.first_seen_ms, s.last_seen_ms,
           s.matches, s.max_similarity, s.persons
    FROM (
        SELECT m.job_id, m.face_id, cf.external_image_id, cf.image_id, cf.user_id,
               min(f.timestamp_ms) AS first_seen_ms, max(f.timestamp_ms) AS last_seen_ms,
               count(*) AS matches, max(m.similarity) AS max_similarity,
               count(DISTINCT f.person_index) AS persons
        FROM face_matches m
        JOIN faces f ON f.job_id = m.job_id AND f.face_seq = m.face_seq
        LEFT JOIN collection_faces cf ON cf.job_id = m.job_id AND cf.face_id = m.face_id
        GROUP BY m.job_id, m.face_id, cf.external_image_id, cf.image_id, cf.user_id
    ) s
    JOIN jobs j ON j.job_id = s.job_id AND j.ingest_state = 'ingested'
    """,
    # Per-second presence: one row per person and whole second of video (timestamp_ms / 1000) in
    # which the person was detected. Face detection has no person index: person_index is NULL and
    # the row stands for all faces of that second; max_at_once is then how many faces shared one
    # sampled frame, which is what "how many people were on screen" means without identities.
    """
    CREATE VIEW reporting.person_seconds AS
    SELECT t.job_id, t.person_index, t.second, sum(t.n)::bigint AS detections, count(*) AS samples,
           max(t.n) AS max_at_once, max(t.max_confidence) AS max_confidence,
           min(t.timestamp_ms) AS first_ms, max(t.timestamp_ms) AS last_ms
    FROM (
        SELECT f.job_id, f.person_index, f.timestamp_ms / 1000 AS second, f.timestamp_ms,
               count(*) AS n, max(f.confidence) AS max_confidence
        FROM faces f
        GROUP BY f.job_id, f.person_index, f.timestamp_ms
    ) t
    JOIN jobs j ON j.job_id = t.job_id AND j.ingest_state = 'ingested'
    GROUP BY t.job_id, t.person_index, t.second
    """,
    # Every observation with its job's API, for ad-hoc questions.
    """
    CREATE VIEW reporting.face_observations AS
    SELECT f.*, j.api
    FROM faces f
    JOIN jobs j ON j.job_id = f.job_id AND j.ingest_state = 'ingested'
    """,
    # "Which jobs looked at this video": one row per job, but a lookup by S3 object should not
    # read the whole jobs table once it holds years of jobs.
    "CREATE INDEX IF NOT EXISTS jobs_video_idx ON jobs (video_bucket, video_name)",
    # Contiguous on-screen segments of each person of one job: a new segment starts when the
    # person was not detected for more than p_max_gap_ms (Rekognition samples every 200-500 ms, so
    # the default of one second bridges a missed sample but not a real exit). For face detection
    # (person_index NULL) the segments say when any face was on screen.
    """
    CREATE FUNCTION reporting.person_segments(p_job_id text, p_max_gap_ms bigint DEFAULT 1000)
    RETURNS TABLE (person_index bigint, segment_no bigint, start_ms bigint, end_ms bigint, detections bigint)
    LANGUAGE sql STABLE AS $$
        WITH marked AS (
            SELECT f.person_index, f.timestamp_ms,
                   CASE WHEN f.timestamp_ms - lag(f.timestamp_ms) OVER w <= p_max_gap_ms THEN 0 ELSE 1 END
                       AS starts_segment
            FROM faces f
            JOIN jobs j ON j.job_id = f.job_id AND j.ingest_state = 'ingested'
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
        ORDER BY n.person_index NULLS FIRST, n.segment_no
    $$
    """,
)


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP SCHEMA IF EXISTS reporting CASCADE")
    op.execute("DROP INDEX IF EXISTS jobs_video_idx")
