"""Initial normalized schema for face detection and face search results.

Every table that grows with results leads with job_id (primary key prefix), so the schema can be
hash-partitioned or distributed by job later without changing a key. Rows of one job are written
in one transaction by one writer (serialized with an advisory lock), so the bulk tables carry no
foreign keys: a foreign key check per landmark row would cost more than the whole COPY.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

LANDMARK_TYPES = (
    "eyeLeft", "eyeRight", "nose", "mouthLeft", "mouthRight", "leftEyeBrowLeft", "leftEyeBrowRight",
    "leftEyeBrowUp", "rightEyeBrowLeft", "rightEyeBrowRight", "rightEyeBrowUp", "leftEyeLeft",
    "leftEyeRight", "leftEyeUp", "leftEyeDown", "rightEyeLeft", "rightEyeRight", "rightEyeUp",
    "rightEyeDown", "noseLeft", "noseRight", "mouthUp", "mouthDown", "leftPupil", "rightPupil",
    "upperJawlineLeft", "midJawlineLeft", "chinBottom", "midJawlineRight", "upperJawlineRight",
)
EMOTION_TYPES = ("HAPPY", "SAD", "ANGRY", "CONFUSED", "DISGUSTED", "SURPRISED", "CALM", "UNKNOWN", "FEAR")


def _enum(name: str, values: tuple[str, ...]) -> str:
    labels = ", ".join(f"'{v}'" for v in values)
    return f"CREATE TYPE {name} AS ENUM ({labels});"


def _attr(name: str, value_type: str = "boolean") -> str:
    return f"{name}_value {value_type}, {name}_confidence double precision,"


UPGRADE = f"""
{_enum("face_api", ("FACE_DETECTION", "FACE_SEARCH"))}
{_enum("job_status", ("IN_PROGRESS", "SUCCEEDED", "FAILED"))}
{_enum("ingest_state", ("ingested", "failed"))}
{_enum("color_range", ("FULL", "LIMITED"))}
{_enum("gender", ("Male", "Female"))}
{_enum("landmark_type", LANDMARK_TYPES)}
{_enum("emotion_type", EMOTION_TYPES)}

CREATE TABLE jobs (
    job_id            text PRIMARY KEY CHECK (job_id ~ '^[a-zA-Z0-9_-]{{1,64}}$'),
    api               face_api NOT NULL,
    job_status        job_status,
    status_message    text,
    job_tag           text,
    video_bucket      text,
    video_name        text,
    video_version     text,
    video_codec       text,
    duration_ms       bigint,
    video_format      text,
    frame_rate        double precision,
    frame_height      bigint,
    frame_width       bigint,
    color_range       color_range,
    ingest_state      ingest_state NOT NULL,
    failure_code      text,
    failure_reason    text,
    pages             integer NOT NULL DEFAULT 0,
    faces             integer NOT NULL DEFAULT 0,
    persons           integer NOT NULL DEFAULT 0,
    face_matches      integer NOT NULL DEFAULT 0,
    collection_faces  integer NOT NULL DEFAULT 0,
    landmarks         integer NOT NULL DEFAULT 0,
    emotions          integer NOT NULL DEFAULT 0,
    attempts          integer NOT NULL DEFAULT 0,
    notified_at       timestamptz,
    ingest_started_at timestamptz,
    ingested_at       timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_state_idx ON jobs (ingest_state, updated_at);

-- One row per element of Faces (detection) or Persons (search), keyed by its position in the
-- result stream: face detection results carry no identifier of their own.
CREATE TABLE faces (
    job_id               text NOT NULL,
    face_seq             integer NOT NULL,
    timestamp_ms         bigint NOT NULL,
    person_index         bigint,
    person_bbox_width    double precision,
    person_bbox_height   double precision,
    person_bbox_left     double precision,
    person_bbox_top      double precision,
    has_face             boolean NOT NULL,
    bbox_width           double precision,
    bbox_height          double precision,
    bbox_left            double precision,
    bbox_top             double precision,
    confidence           double precision,
    age_low              bigint,
    age_high             bigint,
    {_attr("smile")}
    {_attr("eyeglasses")}
    {_attr("sunglasses")}
    {_attr("gender", "gender")}
    {_attr("beard")}
    {_attr("mustache")}
    {_attr("eyes_open")}
    {_attr("mouth_open")}
    pose_roll            double precision,
    pose_yaw             double precision,
    pose_pitch           double precision,
    quality_brightness   double precision,
    quality_sharpness    double precision,
    {_attr("face_occluded")}
    eye_direction_yaw        double precision,
    eye_direction_pitch      double precision,
    eye_direction_confidence double precision,
    PRIMARY KEY (job_id, face_seq)
);
CREATE INDEX faces_job_time_idx ON faces (job_id, timestamp_ms);
CREATE INDEX faces_job_person_idx ON faces (job_id, person_index, timestamp_ms)
    WHERE person_index IS NOT NULL;

CREATE TABLE landmarks (
    job_id    text NOT NULL,
    face_seq  integer NOT NULL,
    ordinal   smallint NOT NULL,
    type      landmark_type NOT NULL,
    x         double precision,
    y         double precision,
    PRIMARY KEY (job_id, face_seq, ordinal)
);

CREATE TABLE emotions (
    job_id     text NOT NULL,
    face_seq   integer NOT NULL,
    ordinal    smallint NOT NULL,
    type       emotion_type NOT NULL,
    confidence double precision,
    PRIMARY KEY (job_id, face_seq, ordinal)
);

-- Collection faces as seen by a job (FaceMatch.Face). Keyed per job so that each job's rows are
-- written and replaced atomically with no lock shared between jobs; FaceId indexes serve the
-- cross-video questions.
CREATE TABLE collection_faces (
    job_id                    text NOT NULL,
    face_id                   text NOT NULL,
    image_id                  text,
    external_image_id         text,
    user_id                   text,
    index_faces_model_version text,
    bbox_width                double precision,
    bbox_height               double precision,
    bbox_left                 double precision,
    bbox_top                  double precision,
    confidence                double precision,
    PRIMARY KEY (job_id, face_id)
);
CREATE INDEX collection_faces_face_idx ON collection_faces (face_id);
CREATE INDEX collection_faces_external_idx ON collection_faces (external_image_id)
    WHERE external_image_id IS NOT NULL;

-- Every FaceMatch of every person element is kept, not only the best one.
CREATE TABLE face_matches (
    job_id     text NOT NULL,
    face_seq   integer NOT NULL,
    ordinal    smallint NOT NULL,
    face_id    text NOT NULL,
    similarity double precision,
    PRIMARY KEY (job_id, face_seq, ordinal)
);
CREATE INDEX face_matches_face_idx ON face_matches (face_id, job_id);

-- Face search persons, derived from faces when a job is written.
CREATE TABLE persons (
    job_id        text NOT NULL,
    person_index  bigint NOT NULL,
    first_seen_ms bigint NOT NULL,
    last_seen_ms  bigint NOT NULL,
    detections    integer NOT NULL,
    PRIMARY KEY (job_id, person_index)
);

-- The raw result pages, compressed (encoding names the codec, e.g. zstd+json), written with the
-- rows they produced: Rekognition keeps results for 7 days only, the archive keeps them as long
-- as the rows.
CREATE TABLE raw_pages (
    job_id       text NOT NULL,
    page_no      integer NOT NULL,
    encoding     text NOT NULL,
    body         bytea NOT NULL,
    body_bytes   integer NOT NULL,
    fetched_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, page_no)
);
"""

DOWNGRADE = """
DROP TABLE IF EXISTS raw_pages, persons, face_matches, collection_faces, emotions, landmarks, faces, jobs;
DROP TYPE IF EXISTS emotion_type, landmark_type, gender, color_range, ingest_state, job_status, face_api;
"""


def _execute_script(script: str) -> None:
    # asyncpg prepares each statement, and a prepared statement holds exactly one command.
    for statement in script.split(";\n"):
        if statement.strip():
            op.execute(statement)


def upgrade() -> None:
    _execute_script(UPGRADE)


def downgrade() -> None:
    _execute_script(DOWNGRADE)
