"""Reporting surface: schema `reporting` with views over completely ingested jobs.

A job's rows are written in one transaction together with its `jobs` row, so filtering on
`ingest_state = 'ingested'` is enough to show only complete jobs; a job being re-ingested keeps
showing its previous complete rows until the new ones commit.

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
    """
    CREATE VIEW reporting.job_summary AS
    SELECT j.job_id, j.api, j.job_status, j.ingest_state, j.status_message, j.failure_code, j.failure_reason,
           j.job_tag, j.video_bucket, j.video_name, j.video_version, j.duration_ms, j.frame_rate,
           j.frame_width, j.frame_height, j.pages,
           j.faces, j.persons, j.face_matches AS collection_matches,
           j.collection_faces AS distinct_collection_faces,
           j.ingested_at, j.updated_at
    FROM jobs j
    """,
    """
    CREATE VIEW reporting.person_appearances AS
    SELECT p.job_id, p.person_index, p.first_seen_ms, p.last_seen_ms, p.detections,
           p.last_seen_ms - p.first_seen_ms AS span_ms
    FROM persons p
    JOIN jobs j ON j.job_id = p.job_id AND j.ingest_state = 'ingested'
    """,
    """
    CREATE VIEW reporting.collection_face_sightings AS
    SELECT m.job_id, m.face_id, cf.external_image_id, cf.image_id, cf.user_id,
           min(f.timestamp_ms) AS first_seen_ms, max(f.timestamp_ms) AS last_seen_ms,
           count(*) AS matches, max(m.similarity) AS max_similarity,
           count(DISTINCT f.person_index) AS persons
    FROM face_matches m
    JOIN jobs j ON j.job_id = m.job_id AND j.ingest_state = 'ingested'
    JOIN faces f ON f.job_id = m.job_id AND f.face_seq = m.face_seq
    LEFT JOIN collection_faces cf ON cf.job_id = m.job_id AND cf.face_id = m.face_id
    GROUP BY m.job_id, m.face_id, cf.external_image_id, cf.image_id, cf.user_id
    """,
    # Which collection faces each person matched, best first: the identity behind a person index.
    """
    CREATE VIEW reporting.person_identities AS
    SELECT f.job_id, f.person_index, m.face_id, cf.external_image_id,
           count(*) AS matches, max(m.similarity) AS max_similarity
    FROM faces f
    JOIN jobs j ON j.job_id = f.job_id AND j.ingest_state = 'ingested'
    JOIN face_matches m ON m.job_id = f.job_id AND m.face_seq = f.face_seq
    LEFT JOIN collection_faces cf ON cf.job_id = m.job_id AND cf.face_id = m.face_id
    WHERE f.person_index IS NOT NULL
    GROUP BY f.job_id, f.person_index, m.face_id, cf.external_image_id
    """,
    # Per-second presence: one row per person (or, for face detection, per job) and second of video.
    """
    CREATE VIEW reporting.person_seconds AS
    SELECT f.job_id, f.person_index, (f.timestamp_ms / 1000) AS second, count(*) AS detections,
           max(f.confidence) AS max_confidence
    FROM faces f
    JOIN jobs j ON j.job_id = f.job_id AND j.ingest_state = 'ingested'
    GROUP BY f.job_id, f.person_index, (f.timestamp_ms / 1000)
    """,
    # Every observation with its job's API, for ad-hoc questions.
    """
    CREATE VIEW reporting.face_observations AS
    SELECT f.*, j.api
    FROM faces f
    JOIN jobs j ON j.job_id = f.job_id AND j.ingest_state = 'ingested'
    """,
)


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP SCHEMA IF EXISTS reporting CASCADE")
