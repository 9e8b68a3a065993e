"""Submissions: videos registered by `submit`, started by `run` under the account's limits.

- ``rekognition.submissions``: one row per video, API and start options (a resubmission with ``--force``
  bumps ``generation``, which changes the ClientRequestToken and so starts a new job). ``state`` walks
  submitted -> starting -> started -> finished -> ingested | failed; ``starting`` and ``started`` are the
  rows that hold one of MAX_REKOGNITION_JOBS slots.
- A trigger on ``jobs`` moves a submission along when its job is notified (pending: finished, its slot
  freed), ingested or recorded failed, whichever path wrote the job (`run`, `backfill`, `jobs retry`).
- ``reporting.submissions``: the public view of them.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

SCHEMA = "rekognition"

TABLE = f"""
CREATE TABLE {SCHEMA}.submissions (
    submission_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    video_bucket text NOT NULL,
    video_name text NOT NULL,
    api {SCHEMA}.face_api NOT NULL,
    options jsonb NOT NULL,
    options_key text NOT NULL,
    generation integer NOT NULL DEFAULT 1,
    client_request_token text NOT NULL CHECK (client_request_token ~ '^[a-zA-Z0-9_-]{{1,64}}$'),
    state text NOT NULL DEFAULT 'submitted'
        CHECK (state IN ('submitted', 'starting', 'started', 'finished', 'ingested', 'failed')),
    job_id text CHECK (job_id ~ '^[a-zA-Z0-9_-]{{1,64}}$'),
    submitted_at timestamptz NOT NULL DEFAULT now(),
    claimed_at timestamptz,
    started_at timestamptz,
    finished_at timestamptz,
    ingested_at timestamptz,
    failure_reason text,
    start_attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    probes integer NOT NULL DEFAULT 0,
    next_probe_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT submissions_video_key UNIQUE (video_bucket, video_name, api, options_key)
)
"""

INDEXES = (
    # The scheduler's two questions: what may start now, and how many slots are taken.
    f"CREATE INDEX submissions_open_idx ON {SCHEMA}.submissions (state, next_attempt_at) "
    "WHERE state IN ('submitted', 'starting', 'started')",
    f"CREATE INDEX submissions_job_id_idx ON {SCHEMA}.submissions (job_id) WHERE job_id IS NOT NULL",
)

# A job's row is written on notification (pending), on ingest and on failure: the submission follows. A
# notification frees the slot (the job no longer runs at Rekognition) even before the ingest starts.
SYNC_FUNCTION = f"""
CREATE FUNCTION {SCHEMA}.sync_submission() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    outcome text := CASE NEW.ingest_state::text WHEN 'ingested' THEN 'ingested' WHEN 'failed' THEN 'failed'
                    ELSE 'finished' END;
BEGIN
    IF outcome = 'finished' THEN
        UPDATE {SCHEMA}.submissions
        SET state = 'finished', finished_at = coalesce(NEW.completed_at, now()), updated_at = now()
        WHERE job_id = NEW.job_id AND state IN ('starting', 'started');
    ELSE
        UPDATE {SCHEMA}.submissions
        SET state = outcome, finished_at = coalesce(finished_at, NEW.completed_at, now()),
            ingested_at = CASE WHEN outcome = 'ingested' THEN NEW.ingested_at END,
            failure_reason = CASE WHEN outcome = 'failed' THEN NEW.failure_reason END,
            updated_at = now()
        WHERE job_id = NEW.job_id AND state <> 'submitted'
          AND (state <> outcome OR ingested_at IS DISTINCT FROM NEW.ingested_at);
    END IF;
    RETURN NULL;
END
$$
"""
SYNC_TRIGGER = f"""
CREATE TRIGGER jobs_sync_submission AFTER INSERT OR UPDATE OF ingest_state, ingested_at, completed_at
ON {SCHEMA}.jobs FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.sync_submission()
"""

VIEW = f"""
CREATE VIEW reporting.submissions AS
SELECT s.video_bucket, s.video_name, s.api, s.state, s.job_id, s.submitted_at, s.started_at, s.finished_at,
       s.ingested_at, s.failure_reason,
       's3://' || s.video_bucket || '/' || s.video_name AS video_uri,
       s.options ->> 'job_tag' AS job_tag, s.options, s.generation, s.start_attempts, s.probes, s.updated_at
FROM {SCHEMA}.submissions s
"""

_JOB = "Rekognition JobId of the video analysis (StartFaceDetection or StartFaceSearch)"
COMMENTS = {
    None: "Videos registered with `submit`: one row per video, API and start options, and where each is in "
          "submitted -> starting -> started -> finished -> ingested (or failed)",
    "video_bucket": "S3 bucket of the video",
    "video_name": "S3 object key of the video",
    "api": "FACE_DETECTION or FACE_SEARCH: which Rekognition operation analyses the video",
    "state": "submitted (waiting for a slot), starting (a Start* call under way), started (running at "
             "Rekognition), finished (Rekognition is done; results being ingested), ingested, failed",
    "job_id": _JOB + "; NULL until started",
    "submitted_at": "when `submit` registered the video (or resubmitted it with --force)",
    "started_at": "when Rekognition accepted the Start* call",
    "finished_at": "Rekognition's completion time (notification Timestamp), or when the worker learned of it",
    "ingested_at": "when the job's results were completely ingested",
    "failure_reason": "why the video failed: Rekognition's refusal of the start, or the job's failure",
    "video_uri": "s3://bucket/name of the video",
    "job_tag": "the JobTag the job is started with, when any",
    "options": "the start options: face_attributes (detection), collection_id and face_match_threshold (search), "
               "job_tag",
    "generation": "1, plus one per resubmission with --force (part of the ClientRequestToken)",
    "start_attempts": "Start* calls made for the current generation (LimitExceeded and throttling included)",
    "probes": "Get* probes made because no completion notification arrived in time",
    "updated_at": "when the submission's row last changed",
}

GRANTS = """
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'rekognition_reader') THEN
        GRANT SELECT ON reporting.submissions TO rekognition_reader;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'rekognition_worker') THEN
        GRANT SELECT ON reporting.submissions TO rekognition_worker;
    END IF;
END
$grants$
"""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def upgrade() -> None:
    op.execute(TABLE)
    for statement in INDEXES:
        op.execute(statement)
    op.execute(SYNC_FUNCTION)
    op.execute(SYNC_TRIGGER)
    op.execute(VIEW)
    for column, text in COMMENTS.items():
        if column is None:
            op.execute(f"COMMENT ON VIEW reporting.submissions IS {_literal(text)}")
        else:
            op.execute(f"COMMENT ON COLUMN reporting.submissions.{column} IS {_literal(text)}")
    op.execute(GRANTS)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS reporting.submissions")
    op.execute(f"DROP TRIGGER IF EXISTS jobs_sync_submission ON {SCHEMA}.jobs")
    op.execute(f"DROP FUNCTION IF EXISTS {SCHEMA}.sync_submission()")
    op.execute(f"DROP TABLE IF EXISTS {SCHEMA}.submissions")
