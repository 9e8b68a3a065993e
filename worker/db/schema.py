"""The worker's tables, declared once (SQLAlchemy Core), in PostgreSQL schema ``rekognition``.

This module is the one description of the tables: the store takes its COPY column lists from it,
migrations are checked against it (tests/test_schema_drift.py runs alembic's autogenerate comparison
against a migrated database and fails on any difference), and analysts may import it to write queries.
The reporting views are not here: they are SQL in migrations (0002), the public surface.

Migrations stay plain SQL, frozen as they ran; a change to a table is a new migration plus the same
change here, and the drift test says when the two disagree. Rekognition's enumeration-like values
are text (0005: values newer than this version are stored as sent); ``face_api`` and ``ingest_state``
are PostgreSQL enums, written by the worker only.

Deleting a ``jobs`` row deletes that job's rows in every other table (the delete trigger of 0007, by
ingest key since 0012). The bulk tables are keyed by ``ingest_id``, one key per ingest (0012): see below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

SCHEMA = "rekognition"
# What every connection of the worker sets, so unqualified names resolve to the worker's tables
# (alembic_version and anything an operator keeps in public stay reachable after them).
SEARCH_PATH = f"{SCHEMA}, public"

metadata = sa.MetaData(schema=SCHEMA)

_JOB_ID_CHECK = "job_id ~ '^[a-zA-Z0-9_-]{1,64}$'"

face_api = postgresql.ENUM("FACE_DETECTION", "FACE_SEARCH", name="face_api", schema=SCHEMA,
                           metadata=metadata, create_type=False)
ingest_state = postgresql.ENUM("pending", "ingested", "failed", name="ingest_state", schema=SCHEMA,
                               metadata=metadata, create_type=False)

_now = sa.text("now()")
_zero = sa.text("0")


def _float(name: str) -> sa.Column[float]:
    return sa.Column(name, postgresql.DOUBLE_PRECISION)


def _attr(name: str, value_type: type[sa.types.TypeEngine] = sa.Boolean) -> tuple[sa.Column, sa.Column]:
    """A FaceDetail attribute: its value and Rekognition's confidence in it."""
    return sa.Column(f"{name}_value", value_type), _float(f"{name}_confidence")


def _counter(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.Integer, nullable=False, server_default=_zero)


jobs = sa.Table(
    "jobs", metadata,
    sa.Column("job_id", sa.Text, sa.CheckConstraint(_JOB_ID_CHECK, name="jobs_job_id_check"), primary_key=True),
    sa.Column("api", face_api, nullable=False),
    sa.Column("job_status", sa.Text),
    sa.Column("status_message", sa.Text),
    sa.Column("job_tag", sa.Text),
    sa.Column("video_bucket", sa.Text),
    sa.Column("video_name", sa.Text),
    sa.Column("video_version", sa.Text),
    sa.Column("video_codec", sa.Text),
    sa.Column("duration_ms", sa.BigInteger),
    sa.Column("video_format", sa.Text),
    _float("frame_rate"),
    sa.Column("frame_height", sa.BigInteger),
    sa.Column("frame_width", sa.BigInteger),
    sa.Column("color_range", sa.Text),
    sa.Column("ingest_state", ingest_state, nullable=False),
    sa.Column("failure_code", sa.Text),
    sa.Column("failure_reason", sa.Text),
    *(_counter(name) for name in ("pages", "faces", "persons", "face_matches", "collection_faces", "landmarks",
                                  "emotions", "attempts")),
    sa.Column("notified_at", sa.TIMESTAMP(timezone=True)),
    sa.Column("ingest_started_at", sa.TIMESTAMP(timezone=True)),
    sa.Column("ingested_at", sa.TIMESTAMP(timezone=True)),
    sa.Column("updated_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_now),
    # 0010: Rekognition's completion time from the first notification received (the 7-day clock).
    sa.Column("completed_at", sa.TIMESTAMP(timezone=True)),
    # 0012: the key of the job's rows in the bulk tables (NULL: none); the reporting views join on it.
    sa.Column("ingest_id", sa.Integer),
    # 0013: when the job's results were first stored completely; kept across re-ingests (the retention clock).
    sa.Column("first_ingested_at", sa.TIMESTAMP(timezone=True)),
    sa.Index("jobs_ingest_idx", "ingest_id", unique=True),
    sa.Index("jobs_state_idx", "ingest_state", "updated_at"),
    # 0002: which jobs looked at this video.
    sa.Index("jobs_video_idx", "video_bucket", "video_name"),
    # 0010: the oldest pending job, read every QUEUE_DEPTH_INTERVAL_S.
    sa.Index("jobs_pending_idx", "completed_at", postgresql_where=sa.text("ingest_state = 'pending'")),
)

# The bulk tables carry ``ingest_id``, a 4-byte key of one ingest (0012), instead of the JobId: ``ingests``
# says whose key it is and ``jobs.ingest_id`` which key's rows are the job's. Columns are laid out without
# alignment padding (8-byte values, then booleans, then text); the COPY column lists are the normalizer's
# (worker/normalize.py), by name.
_KEY = "ingest_id"


def _key() -> sa.Column[int]:
    return sa.Column(_KEY, sa.Integer, nullable=False)


_SIDES = ("width", "height", "left", "top")
_CONFIDENCES = ("smile", "eyeglasses", "sunglasses", "gender", "beard", "mustache", "eyes_open", "mouth_open")
_BOOLEANS = ("smile", "eyeglasses", "sunglasses", "beard", "mustache", "eyes_open", "mouth_open", "face_occluded")

# One row per element of Faces (detection) or Persons (search), keyed by its position in the result
# stream: face detection results carry no identifier of their own.
faces = sa.Table(
    "faces", metadata,
    sa.Column(_KEY, sa.Integer, primary_key=True),
    sa.Column("face_seq", sa.Integer, primary_key=True),
    sa.Column("timestamp_ms", sa.BigInteger, nullable=False),
    sa.Column("person_index", sa.BigInteger),
    sa.Column("age_low", sa.BigInteger),
    sa.Column("age_high", sa.BigInteger),
    *(_float(f"person_bbox_{side}") for side in _SIDES),
    *(_float(f"bbox_{side}") for side in _SIDES),
    _float("confidence"),
    *(_float(f"{name}_confidence") for name in _CONFIDENCES),
    _float("pose_roll"), _float("pose_yaw"), _float("pose_pitch"),
    _float("quality_brightness"), _float("quality_sharpness"),
    _float("face_occluded_confidence"),
    _float("eye_direction_yaw"), _float("eye_direction_pitch"), _float("eye_direction_confidence"),
    sa.Column("has_face", sa.Boolean, nullable=False),
    *(sa.Column(f"{name}_value", sa.Boolean) for name in _BOOLEANS),
    sa.Column("gender_value", sa.Text),
    sa.Index("faces_job_time_idx", _KEY, "timestamp_ms"),
    sa.Index("faces_job_person_idx", _KEY, "person_index", "timestamp_ms",
             postgresql_where=sa.text("person_index IS NOT NULL")),
)

# A face's landmarks and emotions: one row per face that has any, the elements as arrays in the order
# Rekognition sent them (element i of every array of the row is Landmarks[i] or Emotions[i]). A row per
# element cost a tuple header, an index entry and a WAL record each: 30 of them per full-attribute face.
_FLOATS = postgresql.ARRAY(postgresql.DOUBLE_PRECISION)
landmarks = sa.Table(
    "landmarks", metadata,
    sa.Column(_KEY, sa.Integer, primary_key=True),
    sa.Column("face_seq", sa.Integer, primary_key=True),
    sa.Column("xs", _FLOATS, nullable=False),
    sa.Column("ys", _FLOATS, nullable=False),
    sa.Column("types", postgresql.ARRAY(sa.Text), nullable=False),
)

emotions = sa.Table(
    "emotions", metadata,
    sa.Column(_KEY, sa.Integer, primary_key=True),
    sa.Column("face_seq", sa.Integer, primary_key=True),
    sa.Column("confidences", _FLOATS, nullable=False),
    sa.Column("types", postgresql.ARRAY(sa.Text), nullable=False),
)

# Every FaceMatch of every person element is kept, not only the best one. One non-unique (ingest_id,
# face_seq) index, which btree deduplication keeps as one entry per face (a key has one writer).
face_matches = sa.Table(
    "face_matches", metadata,
    _key(),
    sa.Column("face_seq", sa.Integer, nullable=False),
    _float("similarity"),
    sa.Column("ordinal", sa.SmallInteger, nullable=False),
    sa.Column("face_id", sa.Text, nullable=False),
    sa.Index("face_matches_seq_idx", _KEY, "face_seq"),
    sa.Index("face_matches_face_idx", "face_id", _KEY),
)

# Collection faces as seen by a job (FaceMatch.Face), keyed per ingest; the FaceId indexes serve
# cross-video questions.
collection_faces = sa.Table(
    "collection_faces", metadata,
    sa.Column(_KEY, sa.Integer, primary_key=True),
    *(_float(f"bbox_{side}") for side in _SIDES),
    _float("confidence"),
    sa.Column("face_id", sa.Text, primary_key=True),
    sa.Column("image_id", sa.Text),
    sa.Column("external_image_id", sa.Text),
    sa.Column("user_id", sa.Text),
    sa.Column("index_faces_model_version", sa.Text),
    sa.Index("collection_faces_face_idx", "face_id"),
    sa.Index("collection_faces_external_idx", "external_image_id",
             postgresql_where=sa.text("external_image_id IS NOT NULL")),
)

# Face search persons, derived from faces when a job is written.
persons = sa.Table(
    "persons", metadata,
    sa.Column(_KEY, sa.Integer, primary_key=True),
    sa.Column("detections", sa.Integer, nullable=False),
    sa.Column("person_index", sa.BigInteger, primary_key=True),
    sa.Column("first_seen_ms", sa.BigInteger, nullable=False),
    sa.Column("last_seen_ms", sa.BigInteger, nullable=False),
)

# The raw result pages, compressed (encoding names the codec, e.g. zstd+json), kept as long as the rows.
raw_pages = sa.Table(
    "raw_pages", metadata,
    sa.Column(_KEY, sa.Integer, primary_key=True),
    sa.Column("page_no", sa.Integer, primary_key=True),
    sa.Column("body_bytes", sa.Integer, nullable=False),
    sa.Column("fetched_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_now),
    sa.Column("encoding", sa.Text, nullable=False),
    sa.Column("body", postgresql.BYTEA, nullable=False),
)

# One row per ingest key whose rows exist (0012): the current one of a job (jobs.ingest_id), one being
# written, or one left by a crashed or replaced ingest, removed under the job's lock. Keys come from
# sequence ingest_ids (integer, cycling: a key is registered here before any row uses it, so a reused
# value still in use is refused by the primary key).
ingests = sa.Table(
    "ingests", metadata,
    sa.Column(_KEY, sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("job_id", sa.Text, sa.CheckConstraint(_JOB_ID_CHECK, name="ingests_job_id_check"), nullable=False),
    sa.Column("started_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_now),
    sa.Index("ingests_job_idx", "job_id"),
)

# The fleet rate limit (worker/fleet.py): one row per shared bucket, updated a few times a second
# (fillfactor 50 keeps the updates HOT).
_epoch = sa.text("'epoch'::timestamp with time zone")
_clock = sa.text("clock_timestamp()")
rate_limit_buckets = sa.Table(
    "rate_limit_buckets", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("ceiling_per_s", postgresql.DOUBLE_PRECISION,
              sa.CheckConstraint("ceiling_per_s > 0", name="rate_limit_buckets_ceiling_per_s_check"), nullable=False),
    sa.Column("rate_per_s", postgresql.DOUBLE_PRECISION,
              sa.CheckConstraint("rate_per_s > 0", name="rate_limit_buckets_rate_per_s_check"), nullable=False),
    # At most 1 (0003's CHECK); credit beyond one token (worker/fleet.py: up to burst_s of the rate) is kept as
    # an earlier refilled_at instead. Below 0 it counts slots already promised to callers.
    sa.Column("tokens", postgresql.DOUBLE_PRECISION,
              sa.CheckConstraint("tokens <= 1", name="rate_limit_buckets_tokens_check"),
              nullable=False, server_default=sa.text("1")),
    sa.Column("refilled_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_clock),
    _float("cut_rate_per_s"),
    sa.Column("cut_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_epoch),
    sa.Column("increased_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_epoch),
    sa.Column("waited_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_epoch),
    sa.Column("grants", sa.BigInteger, nullable=False, server_default=_zero),
    sa.Column("cuts", sa.BigInteger, nullable=False, server_default=_zero),
    sa.Column("updated_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_clock),
    postgresql_with={"fillfactor": "50"},
)


def _nonnegative(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.Integer, sa.CheckConstraint(f"{name} >= 0", name=f"job_retries_{name}_check"),
                     nullable=False, server_default=_zero)


# Jobs being retried, and why (0006): one row per unfinished job that has failed an attempt.
job_retries = sa.Table(
    "job_retries", metadata,
    sa.Column("job_id", sa.Text, sa.CheckConstraint(_JOB_ID_CHECK, name="job_retries_job_id_check"),
              primary_key=True),
    sa.Column("api", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.Text),
    sa.Column("last_error", sa.Text),
    _nonnegative("streak"),
    sa.Column("streak_started_at", sa.TIMESTAMP(timezone=True)),
    _nonnegative("failures"),
    _nonnegative("outages"),
    sa.Column("last_outage", sa.Text),
    sa.Column("first_failed_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_now),
    sa.Column("last_failed_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_now),
    sa.Index("job_retries_streak_idx", sa.text("streak DESC"), "last_failed_at"),
)

def _count(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.Integer, sa.CheckConstraint(f"{name} >= 0", name=f"erasures_{name}_check"),
                     nullable=False, server_default=_zero)


# The erasure audit (0008): when, what kind of selector, a keyed hash of it (never the identifier itself)
# and what was removed. Append-only for the worker role; it belongs to no job, so deleting jobs keeps it.
erasures = sa.Table(
    "erasures", metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
    sa.Column("erased_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_now),
    sa.Column("selector_kind", sa.Text, sa.CheckConstraint(
        "selector_kind = ANY (ARRAY['external_image_id'::text, 'face_id'::text, 'user_id'::text])",
        name="erasures_selector_kind_check"), nullable=False),
    sa.Column("selector_hash", sa.Text, sa.CheckConstraint(
        "selector_hash ~ '^[0-9a-f]{64}$'::text", name="erasures_selector_hash_check"), nullable=False),
    *(_count(name) for name in ("jobs", "collection_faces", "face_matches", "persons", "faces", "landmarks",
                                "emotions", "pages_rewritten")),
    sa.Index("erasures_hash_idx", "selector_hash"),
)

# Erased identifiers (0013): the keyed hash of each (as erasures.selector_hash), applied at every write that
# makes an ingest visible. Append-only for the worker role.
erased_identifiers = sa.Table(
    "erased_identifiers", metadata,
    sa.Column("selector_hash", sa.Text, sa.CheckConstraint(
        "selector_hash ~ '^[0-9a-f]{64}$'::text", name="erased_identifiers_selector_hash_check"), primary_key=True),
    sa.Column("selector_kind", sa.Text, sa.CheckConstraint(
        "selector_kind = ANY (ARRAY['external_image_id'::text, 'face_id'::text, 'user_id'::text])",
        name="erased_identifiers_selector_kind_check"), nullable=False),
    sa.Column("erased_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_now),
)

# Jobs removed by `delete` or the retention purge (0013): JobId, why, when; no face data. Not a per-job table:
# it outlives the job, so that a later notification of it is settled without ingesting it again.
tombstones = sa.Table(
    "tombstones", metadata,
    sa.Column("job_id", sa.Text, sa.CheckConstraint(_JOB_ID_CHECK, name="tombstones_job_id_check"),
              primary_key=True),
    sa.Column("api", face_api),
    sa.Column("reason", sa.Text, sa.CheckConstraint("reason = ANY (ARRAY['deleted'::text, 'expired'::text])",
                                                    name="tombstones_reason_check"), nullable=False),
    sa.Column("deleted_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_now),
)

# Videos registered by `submit` and started by `run` (0011). Not a per-job table: a submission outlives the
# deletion of its job (it says the video was analysed), and names a video, not a face.
_OPEN_SUBMISSION = sa.text("state = ANY (ARRAY['submitted'::text, 'starting'::text, 'started'::text])")
submissions = sa.Table(
    "submissions", metadata,
    sa.Column("submission_id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
    sa.Column("video_bucket", sa.Text, nullable=False),
    sa.Column("video_name", sa.Text, nullable=False),
    sa.Column("api", face_api, nullable=False),
    sa.Column("options", postgresql.JSONB, nullable=False),
    sa.Column("options_key", sa.Text, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False, server_default=sa.text("1")),
    sa.Column("client_request_token", sa.Text, sa.CheckConstraint(
        "client_request_token ~ '^[a-zA-Z0-9_-]{1,64}$'", name="submissions_client_request_token_check"),
        nullable=False),
    sa.Column("state", sa.Text, sa.CheckConstraint(
        "state IN ('submitted', 'starting', 'started', 'finished', 'ingested', 'failed')",
        name="submissions_state_check"), nullable=False, server_default=sa.text("'submitted'::text")),
    sa.Column("job_id", sa.Text, sa.CheckConstraint(_JOB_ID_CHECK, name="submissions_job_id_check")),
    sa.Column("submitted_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_now),
    sa.Column("claimed_at", sa.TIMESTAMP(timezone=True)),
    sa.Column("started_at", sa.TIMESTAMP(timezone=True)),
    sa.Column("finished_at", sa.TIMESTAMP(timezone=True)),
    sa.Column("ingested_at", sa.TIMESTAMP(timezone=True)),
    sa.Column("failure_reason", sa.Text),
    sa.Column("start_attempts", sa.Integer, nullable=False, server_default=_zero),
    sa.Column("next_attempt_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_now),
    sa.Column("probes", sa.Integer, nullable=False, server_default=_zero),
    sa.Column("next_probe_at", sa.TIMESTAMP(timezone=True)),
    sa.Column("updated_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=_now),
    sa.UniqueConstraint("video_bucket", "video_name", "api", "options_key", name="submissions_video_key"),
    sa.Index("submissions_open_idx", "state", "next_attempt_at", postgresql_where=_OPEN_SUBMISSION),
    sa.Index("submissions_job_id_idx", "job_id", postgresql_where=sa.text("job_id IS NOT NULL")),
)

# Job events (0014): written by triggers on jobs and erasures in the transaction of the change they announce,
# delivered by the publisher (worker/events/). Not a per-job table: a job.deleted event outlives its job.
_EVENT_TYPES = ("type = ANY (ARRAY['job.ingested'::text, 'job.failed'::text, 'job.deleted'::text, "
                "'identity.erased'::text])")
event_outbox = sa.Table(
    "event_outbox", metadata,
    sa.Column("seq", sa.BigInteger, sa.Identity(always=True), primary_key=True),
    sa.Column("event_id", postgresql.UUID(as_uuid=True), nullable=False, server_default=sa.text("gen_random_uuid()")),
    sa.Column("type", sa.Text, sa.CheckConstraint(_EVENT_TYPES, name="event_outbox_type_check"), nullable=False),
    sa.Column("job_id", sa.Text),
    sa.Column("payload", postgresql.JSONB, nullable=False),
    sa.Column("occurred_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=sa.text("clock_timestamp()")),
    sa.Column("published_at", sa.TIMESTAMP(timezone=True)),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=_zero),
    sa.Column("last_error", sa.Text),
    sa.UniqueConstraint("event_id", name="event_outbox_event_id_key"),
    sa.Index("event_outbox_pending_idx", "seq", postgresql_where=sa.text("published_at IS NULL")),
    sa.Index("event_outbox_job_idx", "job_id", "seq", postgresql_where=sa.text("published_at IS NULL")),
    sa.Index("event_outbox_occurred_idx", "occurred_at"),
)

# Tables whose rows belong to one ingest key (ingests says whose); deleting the job deletes them.
KEYED_TABLES: tuple[sa.Table, ...] = (faces, landmarks, emotions, face_matches, collection_faces, persons, raw_pages)
# Tables whose rows belong to one job (by key, or by job_id: ingests, job_retries); deleting the job deletes them.
JOB_TABLES: tuple[sa.Table, ...] = (*KEYED_TABLES, ingests, job_retries)


def columns(table: sa.Table) -> tuple[str, ...]:
    """The table's column names in declaration order: the column order of the table in the database."""
    return tuple(c.name for c in table.c)


def compared_names(default_schema: str | None) -> Callable[[str | None, str, Any], bool]:
    """alembic's ``include_name`` for autogenerate: schema rekognition only, without alembic's own table.

    alembic names the connection's default schema (the first of its search_path that exists) None;
    with the worker's search_path that is rekognition itself.
    """
    def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
        if type_ == "schema":
            return (default_schema if name is None else name) == SCHEMA
        return not (type_ == "table" and name == "alembic_version")

    return include_name


def compare_type(context: Any, inspected_column: Any, metadata_column: Any, inspected_type: Any,
                 metadata_type: Any) -> bool | None:
    """alembic's ``compare_type`` for autogenerate: enums compared by schema, name and labels.

    alembic compares an enum by its rendered name only, which names the default schema's types without
    their schema (a false difference) and ignores the labels (a missed one). None: alembic's own check.
    """
    if isinstance(metadata_type, sa.Enum) and isinstance(inspected_type, sa.Enum):
        default = context.dialect.default_schema_name

        def key(t: sa.Enum) -> tuple[str | None, str | None, tuple[str, ...]]:
            return t.schema or default, t.name, tuple(t.enums)

        return key(inspected_type) != key(metadata_type)
    return None
