"""The 7-day clock in the database, reporting.pending_jobs, a read-only reporting role, a data dictionary.

- ``jobs.completed_at``: Rekognition's completion time (the notification's ``Timestamp``) as first
  received. The worker records a job ``pending`` with it as soon as a notification parses; re-sent copies
  keep the first time; an ingest or a failure moves the job out of pending and keeps it. Rows written
  before this revision have none (their ``notified_at`` is the latest notification's time).
- ``reporting.job_summary`` shows finished jobs only (ingested or failed), as before pending existed, and
  gains ``completed_at``; ``reporting.pending_jobs`` lists the jobs whose results are still only at
  Rekognition, the one nearest its 7-day expiry first.
- ``rekognition_reader`` (a NOLOGIN group role created by sql/01_roles.sql, not here: the migration role
  has no CREATEROLE, and roles belong to the cluster, not to one database): when it exists, it gets USAGE
  on ``reporting``, SELECT on its views, EXECUTE on its functions, default privileges for views created
  later, and nothing on the tables. Views run with their owner's rights, so that is enough to read them;
  ``reporting.person_segments`` (a SQL function, which runs with the caller's rights) now reads
  ``reporting.face_observations`` instead of the tables, so it needs no table grant either.
- COMMENT ON every reporting view and column (tests/test_reporting_grants.py fails on any view or column
  without one, including views added later).

Table names are unqualified: they resolve through the migration's search_path (the tables may live in
another schema than public).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

READER = "rekognition_reader"
WORKER = "rekognition_worker"

# 0002's job_summary with finished jobs only, and completed_at appended (CREATE OR REPLACE keeps columns).
JOB_SUMMARY = """
CREATE OR REPLACE VIEW reporting.job_summary AS
SELECT j.job_id, j.api, j.job_status, j.ingest_state, j.status_message, j.failure_code, j.failure_reason,
       j.job_tag, j.video_bucket, j.video_name, j.video_version,
       CASE WHEN j.video_bucket IS NOT NULL AND j.video_name IS NOT NULL
            THEN 's3://' || j.video_bucket || '/' || j.video_name END AS video_uri,
       j.video_codec, j.video_format, j.duration_ms, j.frame_rate, j.frame_width, j.frame_height,
       j.color_range, j.pages,
       j.faces, j.persons, j.face_matches AS collection_matches,
       j.collection_faces AS distinct_collection_faces,
       j.attempts, j.notified_at, j.ingest_started_at, j.ingested_at, j.updated_at, j.completed_at
FROM jobs j
WHERE j.ingest_state IN ('ingested', 'failed')
"""

JOB_SUMMARY_0002 = JOB_SUMMARY.replace(", j.completed_at", "").replace(
    "WHERE j.ingest_state IN ('ingested', 'failed')", "")

# Ordered by expiry, soonest first; a job whose completion time is unknown (a backfill line, a
# notification without Timestamp) last. The view is small: only jobs not finished yet.
PENDING_JOBS = """
CREATE VIEW reporting.pending_jobs AS
SELECT j.job_id, j.api, j.job_tag, j.video_bucket, j.video_name,
       CASE WHEN j.video_bucket IS NOT NULL AND j.video_name IS NOT NULL
            THEN 's3://' || j.video_bucket || '/' || j.video_name END AS video_uri,
       j.completed_at,
       extract(epoch FROM now() - j.completed_at)::double precision AS age_s,
       j.completed_at + interval '7 days' AS expires_at,
       j.attempts, j.notified_at, j.updated_at
FROM jobs j
WHERE j.ingest_state = 'pending'
ORDER BY j.completed_at NULLS LAST, j.job_id
"""

# 0002's person_segments read the tables, and a SQL function runs with its caller's rights: a reader without
# table grants could not call it. It now reads reporting.face_observations (the same rows: faces of ingested
# jobs), which runs with the view owner's rights. Still a plain SQL function, so the planner inlines it and
# `job_id = ...` reaches the faces primary key (tests/test_reporting_explain.py); SECURITY DEFINER would
# have stopped that.
_SEGMENTS = """
CREATE OR REPLACE FUNCTION reporting.person_segments(p_job_id text, p_max_gap_ms bigint DEFAULT 1000)
RETURNS TABLE (person_index bigint, segment_no bigint, start_ms bigint, end_ms bigint, detections bigint)
LANGUAGE sql STABLE AS $$
    WITH marked AS (
        SELECT f.person_index, f.timestamp_ms,
               CASE WHEN f.timestamp_ms - lag(f.timestamp_ms) OVER w <= p_max_gap_ms THEN 0 ELSE 1 END
                   AS starts_segment
        FROM {source}
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
"""
PERSON_SEGMENTS = _SEGMENTS.replace("{source}", "reporting.face_observations f")
# What 0007 left (0002's body with the tables qualified by schema rekognition): the downgrade restores it.
PERSON_SEGMENTS_0007 = _SEGMENTS.replace(
    "{source}",
    "rekognition.faces f\n        JOIN rekognition.jobs j ON j.job_id = f.job_id AND j.ingest_state = 'ingested'")

# The reader's grants, when the role exists: the reporting schema and nothing else. current_schemas(false)
# is the migration's search_path: the schemas that hold the tables, whatever revision put them there.
GRANTS = f"""
DO $grants$
DECLARE
    s text;
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER}') THEN
        -- Nothing outside reporting: whatever was granted by hand on the table schemas goes.
        FOREACH s IN ARRAY current_schemas(false) LOOP
            EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM {READER}', s);
            EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM {READER}', s);
        END LOOP;
        GRANT USAGE ON SCHEMA reporting TO {READER};
        GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO {READER};
        GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA reporting TO {READER};
        ALTER DEFAULT PRIVILEGES IN SCHEMA reporting GRANT SELECT ON TABLES TO {READER};
        ALTER DEFAULT PRIVILEGES IN SCHEMA reporting GRANT EXECUTE ON FUNCTIONS TO {READER};
    END IF;
END
$grants$
"""

# --- the data dictionary -------------------------------------------------------------------------------
_JOB = "Rekognition JobId of the video analysis (StartFaceDetection or StartFaceSearch)"
_PERSON = ("Rekognition's person index within the job (face search); NULL for face detection, which has no "
           "person identities")
_MS = "milliseconds from the start of the video"
_VIDEO_URI = "s3://bucket/name of the analysed video, when both are known"
_BBOX = "bounding box {}, as a ratio of the frame {} (0..1)"


def _attr(name: str, what: str) -> dict[str, str]:
    return {f"{name}_value": f"{what} (Rekognition's estimate)",
            f"{name}_confidence": f"confidence in {name}_value, 0..100"}


FACE_COLUMNS = {
    "job_id": _JOB,
    "face_seq": "position of this element in the job's result stream (Faces[] or Persons[]), from 0: its key",
    "timestamp_ms": f"time of the sampled frame, {_MS}",
    "person_index": _PERSON,
    "person_bbox_width": _BBOX.format("width of the whole person", "width"),
    "person_bbox_height": _BBOX.format("height of the whole person", "height"),
    "person_bbox_left": _BBOX.format("left edge of the whole person", "width"),
    "person_bbox_top": _BBOX.format("top edge of the whole person", "height"),
    "has_face": "false when face search tracked the person without a visible face in this frame",
    "bbox_width": _BBOX.format("width of the face", "width"),
    "bbox_height": _BBOX.format("height of the face", "height"),
    "bbox_left": _BBOX.format("left edge of the face", "width"),
    "bbox_top": _BBOX.format("top edge of the face", "height"),
    "confidence": "confidence that the box holds a face, 0..100",
    "age_low": "estimated age range, lower bound in years (face detection with all attributes)",
    "age_high": "estimated age range, upper bound in years (face detection with all attributes)",
    **_attr("smile", "smiling"), **_attr("eyeglasses", "wearing eyeglasses"),
    **_attr("sunglasses", "wearing sunglasses"), **_attr("gender", "apparent gender as Rekognition labels it"),
    **_attr("beard", "has a beard"), **_attr("mustache", "has a mustache"), **_attr("eyes_open", "eyes open"),
    **_attr("mouth_open", "mouth open"), **_attr("face_occluded", "face partly hidden (null for video so far)"),
    "pose_roll": "head rotation around the axis out of the image, degrees",
    "pose_yaw": "head rotation around the vertical axis, degrees",
    "pose_pitch": "head rotation around the horizontal axis, degrees",
    "quality_brightness": "brightness of the face, 0..100",
    "quality_sharpness": "sharpness of the face, 0..100",
    "eye_direction_yaw": "gaze direction, yaw in degrees (null for video so far)",
    "eye_direction_pitch": "gaze direction, pitch in degrees (null for video so far)",
    "eye_direction_confidence": "confidence in the gaze direction, 0..100",
    "api": "FACE_DETECTION or FACE_SEARCH: which Rekognition operation produced the job",
}

JOB_COLUMNS = {
    "job_id": _JOB,
    "api": FACE_COLUMNS["api"],
    "job_status": "Rekognition's JobStatus: SUCCEEDED or FAILED (text: later values are stored as sent)",
    "ingest_state": "ingested (rows complete and in the other views) or failed (see failure_code)",
    "status_message": "Rekognition's StatusMessage, e.g. why it failed the job",
    "failure_code": "why the worker recorded the job failed (an AWS error code, JobFailed, MalformedPage, ...); "
                    "on an ingested job, the last failed re-run that kept the earlier ingest",
    "failure_reason": "the failure in words",
    "job_tag": "the JobTag the job was started with",
    "video_bucket": "S3 bucket of the analysed video",
    "video_name": "S3 object key of the analysed video",
    "video_version": "S3 object version of the analysed video, when versioned",
    "video_uri": _VIDEO_URI,
    "video_codec": "codec of the video (VideoMetadata.Codec)",
    "video_format": "container format of the video (VideoMetadata.Format)",
    "duration_ms": "length of the video in milliseconds",
    "frame_rate": "frames per second of the video",
    "frame_width": "frame width in pixels",
    "frame_height": "frame height in pixels",
    "color_range": "FULL or LIMITED (VideoMetadata.ColorRange)",
    "pages": "result pages read from Rekognition",
    "faces": "rows in face_observations for the job (Faces[] or Persons[] elements)",
    "persons": "distinct persons (face search); 0 for face detection",
    "collection_matches": "FaceMatches kept, every match of every person element",
    "distinct_collection_faces": "distinct collection faces matched",
    "attempts": "times the worker wrote this job (ingests and failures)",
    "notified_at": "Timestamp of the latest completion notification received (Rekognition's completion time)",
    "ingest_started_at": "when the last ingest or failure of the job started",
    "ingested_at": "when the job was last completely ingested",
    "updated_at": "when the job's row last changed",
    "completed_at": "Rekognition's completion time from the first notification received (results expire 7 days "
                    "later); NULL for jobs recorded before the worker kept it",
}

VIEWS: dict[str, tuple[str, dict[str, str]]] = {
    "job_summary": ("One row per job the worker finished, ingested or failed; the counters equal the rows of the "
                    "other views", JOB_COLUMNS),
    "pending_jobs": (
        "Jobs whose completion notification arrived but which are neither ingested nor failed yet: their results "
        "are still only at Rekognition, which deletes them 7 days after completion. Soonest expiry first",
        {"job_id": _JOB, "api": FACE_COLUMNS["api"], "job_tag": JOB_COLUMNS["job_tag"],
         "video_bucket": JOB_COLUMNS["video_bucket"], "video_name": JOB_COLUMNS["video_name"],
         "video_uri": _VIDEO_URI,
         "completed_at": "Rekognition's completion time from the first notification received; NULL when unknown "
                         "(a backfill line, a notification without Timestamp)",
         "age_s": "seconds since completed_at, at query time",
         "expires_at": "completed_at + 7 days: after it Rekognition no longer returns the results",
         "attempts": "times the worker wrote this job before (0 until an ingest or failure is recorded)",
         "notified_at": JOB_COLUMNS["notified_at"], "updated_at": JOB_COLUMNS["updated_at"]}),
    "person_identities": (
        "Every collection face a face search person matched in an ingested job, with how often and how well; "
        "match_rank = 1 is the person's identity",
        {"job_id": _JOB, "person_index": _PERSON, "face_id": "FaceId of the matched collection face",
         "external_image_id": "ExternalImageId the collection face was indexed with, when any",
         "matches": "person elements (sampled frames) in which this face matched",
         "max_similarity": "best similarity of those matches, 0..100",
         "first_matched_ms": f"first match, {_MS}", "last_matched_ms": f"last match, {_MS}",
         "match_rank": "1 for the person's identity: most matches, then highest similarity, then smallest FaceId"}),
    "person_appearances": (
        "One row per face search person per ingested job: when the person was first and last seen",
        {"job_id": _JOB, "person_index": _PERSON, "first_seen_ms": f"first detection, {_MS}",
         "last_seen_ms": f"last detection, {_MS}", "detections": "person elements (sampled frames) of the person",
         "span_ms": "last_seen_ms - first_seen_ms",
         "seconds_present": "distinct whole seconds of video in which the person was detected"}),
    "collection_face_sightings": (
        "One row per collection face per ingested job: where in the video it was matched",
        {"job_id": _JOB, "face_id": "FaceId of the matched collection face",
         "external_image_id": "ExternalImageId the collection face was indexed with, when any",
         "image_id": "ImageId of the image the collection face was indexed from",
         "user_id": "UserId the collection face is associated with, when any",
         "first_seen_ms": f"first match, {_MS}", "last_seen_ms": f"last match, {_MS}",
         "matches": "person elements in which the face matched", "max_similarity": "best similarity, 0..100",
         "persons": "distinct persons of the job it matched"}),
    "person_seconds": (
        "Per-second presence: one row per person and whole second of video in which the person was detected "
        "(face detection: person_index NULL, one row per second with any face)",
        {"job_id": _JOB, "person_index": _PERSON, "second": "whole second of video (timestamp_ms / 1000)",
         "detections": "detections in that second", "samples": "sampled frames in that second with a detection",
         "max_at_once": "most detections in one sampled frame (without identities: faces on screen at once)",
         "max_confidence": "highest face confidence in that second, 0..100",
         "first_ms": f"first detection in that second, {_MS}", "last_ms": f"last detection in that second, {_MS}"}),
    "face_observations": ("Every face (detection) or person element (search) of every ingested job, with its "
                          "job's API", FACE_COLUMNS),
}

FUNCTION_COMMENT = ("Contiguous on-screen segments of each person of one ingested job; a gap longer than "
                    "p_max_gap_ms (default 1000) starts a new segment")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _comment_statements() -> list[str]:
    statements = []
    for view, (about, columns) in VIEWS.items():
        statements.append(f"COMMENT ON VIEW reporting.{view} IS {_literal(about)}")
        for column, text in columns.items():
            statements.append(f"COMMENT ON COLUMN reporting.{view}.{column} IS {_literal(text)}")
    statements.append(f"COMMENT ON FUNCTION reporting.person_segments(text, bigint) IS {_literal(FUNCTION_COMMENT)}")
    return statements


def upgrade() -> None:
    op.execute("ALTER TABLE jobs ADD COLUMN completed_at timestamptz")
    # The metric's query and the view read pending jobs only: a few rows among years of finished jobs.
    op.execute("CREATE INDEX jobs_pending_idx ON jobs (completed_at) WHERE ingest_state = 'pending'")
    op.execute(JOB_SUMMARY)
    op.execute(PENDING_JOBS)
    op.execute(PERSON_SEGMENTS)
    op.execute(GRANTS)
    for statement in _comment_statements():
        op.execute(statement)


def downgrade() -> None:
    # Older code knows no pending state: those rows only held the notification's clock (the messages are
    # still in the queue or its dead-letter queue, and an ingest recreates the row).
    op.execute("DELETE FROM jobs WHERE ingest_state = 'pending'")
    op.execute("DROP VIEW IF EXISTS reporting.pending_jobs")
    # A view cannot lose a column in place: job_summary is recreated with its grants and comments.
    grants = op.get_bind().execute(sa.text(
        "SELECT CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(g.grantee)) END, "
        "g.privilege_type FROM pg_class c, aclexplode(c.relacl) g "
        "WHERE c.oid = 'reporting.job_summary'::regclass AND g.grantee <> c.relowner")).all()
    op.execute("DROP VIEW reporting.job_summary")
    op.execute(JOB_SUMMARY_0002.replace("CREATE OR REPLACE VIEW", "CREATE VIEW"))
    for grantee, privilege in grants:
        op.execute(f"GRANT {privilege} ON reporting.job_summary TO {grantee}")
    about, columns = VIEWS["job_summary"]
    op.execute(f"COMMENT ON VIEW reporting.job_summary IS {_literal(about)}")
    for column, text in columns.items():
        if column != "completed_at":
            op.execute(f"COMMENT ON COLUMN reporting.job_summary.{column} IS {_literal(text)}")
    op.execute(PERSON_SEGMENTS_0007)
    op.execute("DROP INDEX IF EXISTS jobs_pending_idx")
    op.execute("ALTER TABLE jobs DROP COLUMN IF EXISTS completed_at")
    # The reader's grants and the comments stay (grants are not schema, see 0004).
