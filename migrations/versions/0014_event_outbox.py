"""Job events: a transactional outbox, written by triggers in the transaction of the change it announces.

- ``rekognition.event_outbox``: one row per event, ``seq`` (identity) giving the order, ``event_id`` (uuid)
  what consumers deduplicate on, ``payload`` the whole JSON document as published (docs/events.md,
  docs/events.schema.json). ``published_at`` stays NULL until the publisher (`run`, or a command that
  changed data) delivered it; ``attempts`` and ``last_error`` say why it has not been.
- A trigger on ``jobs`` writes ``job.ingested`` when a job switches to a new complete ingest (the state
  becomes ``ingested``, or ``ingest_id`` changes with it: every ingest, re-ingest and reprocess writes under a
  key of its own, whether it came from the SQS path, backfill or jobs retry; an erasure adjusting the counters
  or a change of ``ingested_at`` alone is not an ingest), ``job.failed`` when a failure is recorded (the state
  becomes, or is again recorded, ``failed``; a large job hidden by ``delete`` before its rows go in batches,
  failure_code ``Deleting``, is not a failure), and ``job.deleted`` when the row goes (``delete``, the
  retention purge; a session setting ``rekognition.event_reason`` names which). A trigger on ``erasures``
  writes ``identity.erased`` with what the audit row keeps (kind, keyed hash, counts), never the identifier.
- A trigger on the outbox sends ``NOTIFY rekognition_job_events`` with the event id: delivered at commit,
  never for a change that rolled back.

Triggers rather than statements in the store: every path that changes a job (including those written
later) announces it, inside its own transaction, with no change to the writers; each trigger is one
single-row INSERT into a table local to the coordinator (Citus leaves jobs, erasures and the outbox there).

Revision ID: 0014
Revises: 0012
Create Date: 2026-12-06
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

SCHEMA = "rekognition"
CHANNEL = "rekognition_job_events"

TABLE = f"""
CREATE TABLE {SCHEMA}.event_outbox (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id uuid NOT NULL DEFAULT gen_random_uuid(),
    type text NOT NULL CHECK (type IN ('job.ingested', 'job.failed', 'job.deleted', 'identity.erased')),
    job_id text,
    payload jsonb NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    CONSTRAINT event_outbox_event_id_key UNIQUE (event_id)
)
"""

INDEXES = (
    # The publisher's question: the oldest undelivered events (a small partial index, whatever the history).
    f"CREATE INDEX event_outbox_pending_idx ON {SCHEMA}.event_outbox (seq) WHERE published_at IS NULL",
    # Per-job order: is an earlier event of this job still undelivered?
    f"CREATE INDEX event_outbox_job_idx ON {SCHEMA}.event_outbox (job_id, seq) WHERE published_at IS NULL",
    # events replay --since, and the prune of delivered rows.
    f"CREATE INDEX event_outbox_occurred_idx ON {SCHEMA}.event_outbox (occurred_at)",
)

# UTC, microseconds, 'Z': the same text whatever the session's TimeZone (to_jsonb would use it).
TIME_FUNCTION = f"""
CREATE FUNCTION {SCHEMA}.event_time(ts timestamptz) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$
"""

# One event document; the caller adds the type-specific members. Single-row INSERT, nothing else.
EMIT_FUNCTION = f"""
CREATE FUNCTION {SCHEMA}.emit_event(event_type text, job jsonb, extra jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    id uuid := gen_random_uuid();
    at timestamptz := clock_timestamp();
BEGIN
    INSERT INTO {SCHEMA}.event_outbox (event_id, type, job_id, occurred_at, payload)
    VALUES (id, event_type, job ->> 'job_id', at,
            jsonb_build_object('event_id', id, 'type', event_type, 'schema_version', 1,
                               'occurred_at', {SCHEMA}.event_time(at)) || job || extra);
END
$$
"""

JOB_FUNCTION = f"""
CREATE FUNCTION {SCHEMA}.job_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    j {SCHEMA}.jobs := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    job jsonb;
BEGIN
    job := jsonb_build_object(
        'job_id', j.job_id, 'api', j.api::text, 'job_tag', j.job_tag,
        'video', jsonb_build_object('bucket', j.video_bucket, 'name', j.video_name));
    IF TG_OP = 'DELETE' THEN
        -- A row of a job hidden for a batched delete is going at last: the delete, not a failure, happened.
        PERFORM {SCHEMA}.emit_event('job.deleted', job, jsonb_build_object(
            'reason', coalesce(nullif(current_setting('rekognition.event_reason', true), ''), 'delete')));
        RETURN NULL;
    END IF;
    IF NEW.ingest_state::text = 'ingested' AND (TG_OP = 'INSERT'
            OR OLD.ingest_state::text IS DISTINCT FROM 'ingested'
            OR NEW.ingest_id IS DISTINCT FROM OLD.ingest_id) THEN
        PERFORM {SCHEMA}.emit_event('job.ingested', job, jsonb_build_object(
            'job_status', NEW.job_status, 'ingested_at', {SCHEMA}.event_time(NEW.ingested_at),
            'faces', NEW.faces, 'persons', NEW.persons, 'face_matches', NEW.face_matches, 'pages', NEW.pages));
    ELSIF NEW.ingest_state::text = 'failed' AND NEW.failure_code IS DISTINCT FROM 'Deleting'
            AND (TG_OP = 'INSERT' OR OLD.ingest_state::text IS DISTINCT FROM 'failed'
                 OR NEW.attempts IS DISTINCT FROM OLD.attempts) THEN
        -- The failure's code, not its reason: a reason may quote a value of a result page.
        PERFORM {SCHEMA}.emit_event('job.failed', job, jsonb_build_object(
            'job_status', NEW.job_status, 'failure_code', NEW.failure_code));
    ELSIF NEW.ingest_state::text = 'deleted' AND TG_OP = 'UPDATE'
            AND OLD.ingest_state::text IS DISTINCT FROM 'deleted' THEN
        -- A job kept as a tombstone, should a later revision keep one in jobs.
        PERFORM {SCHEMA}.emit_event('job.deleted', job, jsonb_build_object(
            'reason', coalesce(nullif(current_setting('rekognition.event_reason', true), ''), 'delete')));
    END IF;
    RETURN NULL;
END
$$
"""
JOB_TRIGGER = f"""
CREATE TRIGGER jobs_events AFTER INSERT OR UPDATE OR DELETE ON {SCHEMA}.jobs
FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.job_events()
"""

ERASURE_FUNCTION = f"""
CREATE FUNCTION {SCHEMA}.erasure_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM {SCHEMA}.emit_event('identity.erased',
        jsonb_build_object('job_id', NULL, 'api', NULL, 'job_tag', NULL, 'video', NULL),
        jsonb_build_object('erasure', jsonb_build_object(
            'audit_id', NEW.id, 'erased_at', {SCHEMA}.event_time(NEW.erased_at),
            'selector_kind', NEW.selector_kind, 'selector_hash', NEW.selector_hash,
            'counts', jsonb_build_object(
                'jobs', NEW.jobs, 'collection_faces', NEW.collection_faces, 'face_matches', NEW.face_matches,
                'persons', NEW.persons, 'faces', NEW.faces, 'landmarks', NEW.landmarks,
                'emotions', NEW.emotions, 'pages_rewritten', NEW.pages_rewritten))));
    RETURN NULL;
END
$$
"""
ERASURE_TRIGGER = f"""
CREATE TRIGGER erasures_events AFTER INSERT ON {SCHEMA}.erasures
FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.erasure_events()
"""

# NOTIFY is queued with the transaction and delivered at its commit: listeners never hear of a rollback.
NOTIFY_FUNCTION = f"""
CREATE FUNCTION {SCHEMA}.notify_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', NEW.event_id::text);
    RETURN NULL;
END
$$
"""
NOTIFY_TRIGGER = f"""
CREATE TRIGGER event_outbox_notify AFTER INSERT ON {SCHEMA}.event_outbox
FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.notify_event()
"""

GRANTS = """
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'rekognition_worker') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE rekognition.event_outbox TO rekognition_worker;
    END IF;
END
$grants$
"""


def upgrade() -> None:
    op.execute(TABLE)
    for statement in INDEXES:
        op.execute(statement)
    for statement in (TIME_FUNCTION, EMIT_FUNCTION, JOB_FUNCTION, JOB_TRIGGER, ERASURE_FUNCTION, ERASURE_TRIGGER,
                      NOTIFY_FUNCTION, NOTIFY_TRIGGER):
        op.execute(statement)
    op.execute(GRANTS)


def downgrade() -> None:
    op.execute(f"DROP TRIGGER IF EXISTS erasures_events ON {SCHEMA}.erasures")
    op.execute(f"DROP TRIGGER IF EXISTS jobs_events ON {SCHEMA}.jobs")
    op.execute(f"DROP TABLE IF EXISTS {SCHEMA}.event_outbox")
    for function in ("notify_event()", "erasure_events()", "job_events()", "emit_event(text, jsonb, jsonb)",
                     "event_time(timestamptz)"):
        op.execute(f"DROP FUNCTION IF EXISTS {SCHEMA}.{function}")
