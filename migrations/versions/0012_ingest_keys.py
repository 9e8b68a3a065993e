"""Per-ingest keys: the bulk tables carry a 4-byte ingest key instead of the JobId text; rows in aligned order.

Every ingest (and every reprocess or quarantine) writes its rows under a fresh key from sequence
``ingest_ids``, registered in table ``ingests`` (key -> job_id) before any row is written. ``jobs.ingest_id``
names the key whose rows are the job's: the store writes a job page by page in short transactions and
switches ``jobs.ingest_id`` in the last one, so readers (the reporting views join on it) see the previous
ingest or the new one, never a mix, and no transaction lasts as long as the job. Rows of a key no
``jobs`` row names (the previous ingest, a crashed attempt) are removed afterwards under the job's lock.

The JobId stays in ``jobs`` (and ``ingests``, ``job_retries``) and in every reporting view, which expose the
same columns as before. Per face, the 64-character JobId repeated in each landmark, emotion and match row
and in each index entry was more than half of what a face cost; the key is 4 bytes. The tables are
rebuilt (not altered) so their columns can be laid out without alignment padding: 8-byte values first,
then the booleans, then text. landmarks and emotions become one row per face, their elements as arrays
in the order sent (a row per landmark cost a tuple header, an index entry and a WAL record each: 30 per
full-attribute face). face_matches keeps one non-unique (ingest_id, face_seq) index, which btree
deduplication stores as one entry per face; uniqueness of its rows comes from the key (one writer per key).

The views over the bulk tables are recreated with their columns, grants and comments; those that aggregate
read one job's rows in a LATERAL subquery, so ``WHERE job_id = ...`` reaches the tables' indexes through
``jobs`` (tests/test_reporting_explain.py). The per-job delete trigger deletes every key of the deleted jobs.

Rewrites every row of the bulk tables: on a large database, run it in a maintenance window.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

SCHEMA = "rekognition"
_KEY_CHECK = "job_id ~ '^[a-zA-Z0-9_-]{1,64}$'"

_CONF = ("smile", "eyeglasses", "sunglasses", "gender", "beard", "mustache", "eyes_open", "mouth_open")
_BOOLS = ("smile", "eyeglasses", "sunglasses", "beard", "mustache", "eyes_open", "mouth_open", "face_occluded")

# The new tables: (name, columns DDL, columns copied from the old table, constraints/indexes after the copy).
FACES_COLUMNS = (
    "ingest_id integer NOT NULL", "face_seq integer NOT NULL", "timestamp_ms bigint NOT NULL", "person_index bigint",
    "age_low bigint", "age_high bigint",
    *(f"person_bbox_{s} double precision" for s in ("width", "height", "left", "top")),
    *(f"bbox_{s} double precision" for s in ("width", "height", "left", "top")),
    "confidence double precision",
    *(f"{a}_confidence double precision" for a in _CONF),
    "pose_roll double precision", "pose_yaw double precision", "pose_pitch double precision",
    "quality_brightness double precision", "quality_sharpness double precision",
    "face_occluded_confidence double precision",
    "eye_direction_yaw double precision", "eye_direction_pitch double precision",
    "eye_direction_confidence double precision",
    "has_face boolean NOT NULL", *(f"{a}_value boolean" for a in _BOOLS), "gender_value text",
)
TABLES = {
    "faces": (FACES_COLUMNS, (
        "ALTER TABLE faces ADD CONSTRAINT faces_pkey PRIMARY KEY (ingest_id, face_seq)",
        "CREATE INDEX faces_job_time_idx ON faces (ingest_id, timestamp_ms)",
        "CREATE INDEX faces_job_person_idx ON faces (ingest_id, person_index, timestamp_ms) "
        "WHERE person_index IS NOT NULL",
    )),
    "landmarks": (("ingest_id integer NOT NULL", "face_seq integer NOT NULL", "xs double precision[] NOT NULL",
                   "ys double precision[] NOT NULL", "types text[] NOT NULL"), (
        "ALTER TABLE landmarks ADD CONSTRAINT landmarks_pkey PRIMARY KEY (ingest_id, face_seq)",
    )),
    "emotions": (("ingest_id integer NOT NULL", "face_seq integer NOT NULL", "confidences double precision[] NOT NULL",
                  "types text[] NOT NULL"), (
        "ALTER TABLE emotions ADD CONSTRAINT emotions_pkey PRIMARY KEY (ingest_id, face_seq)",
    )),
    "face_matches": (("ingest_id integer NOT NULL", "face_seq integer NOT NULL", "similarity double precision",
                      "ordinal smallint NOT NULL", "face_id text NOT NULL"), (
        "CREATE INDEX face_matches_seq_idx ON face_matches (ingest_id, face_seq)",
        "CREATE INDEX face_matches_face_idx ON face_matches (face_id, ingest_id)",
    )),
    "collection_faces": (("ingest_id integer NOT NULL", *(f"bbox_{s} double precision"
                                                          for s in ("width", "height", "left", "top")),
                          "confidence double precision", "face_id text NOT NULL", "image_id text",
                          "external_image_id text", "user_id text", "index_faces_model_version text"), (
        "ALTER TABLE collection_faces ADD CONSTRAINT collection_faces_pkey PRIMARY KEY (ingest_id, face_id)",
        "CREATE INDEX collection_faces_face_idx ON collection_faces (face_id)",
        "CREATE INDEX collection_faces_external_idx ON collection_faces (external_image_id) "
        "WHERE external_image_id IS NOT NULL",
    )),
    "persons": (("ingest_id integer NOT NULL", "detections integer NOT NULL", "person_index bigint NOT NULL",
                 "first_seen_ms bigint NOT NULL", "last_seen_ms bigint NOT NULL"), (
        "ALTER TABLE persons ADD CONSTRAINT persons_pkey PRIMARY KEY (ingest_id, person_index)",
    )),
    "raw_pages": (("ingest_id integer NOT NULL", "page_no integer NOT NULL", "body_bytes integer NOT NULL",
                   "fetched_at timestamp with time zone NOT NULL DEFAULT now()", "encoding text NOT NULL",
                   "body bytea NOT NULL"), (
        "ALTER TABLE raw_pages ADD CONSTRAINT raw_pages_pkey PRIMARY KEY (ingest_id, page_no)",
    )),
}
# landmarks and emotions become one row per face: array column -> the per-element column it gathers.
PACKED = {"landmarks": {"xs": "x", "ys": "y", "types": "type"},
          "emotions": {"confidences": "confidence", "types": "type"}}
# Views over the bulk tables, recreated here; job_summary and pending_jobs read jobs only and stay.
VIEWS = ("person_identities", "person_appearances", "collection_face_sightings", "person_seconds", "face_observations")

_FACE_VIEW_COLUMNS = (
    "face_seq", "timestamp_ms", "person_index", "person_bbox_width", "person_bbox_height", "person_bbox_left",
    "person_bbox_top", "has_face", "bbox_width", "bbox_height", "bbox_left", "bbox_top", "confidence", "age_low",
    "age_high", "smile_value", "smile_confidence", "eyeglasses_value", "eyeglasses_confidence", "sunglasses_value",
    "sunglasses_confidence", "gender_value", "gender_confidence", "beard_value", "beard_confidence",
    "mustache_value", "mustache_confidence", "eyes_open_value", "eyes_open_confidence", "mouth_open_value",
    "mouth_open_confidence", "pose_roll", "pose_yaw", "pose_pitch", "quality_brightness", "quality_sharpness",
    "face_occluded_value", "face_occluded_confidence", "eye_direction_yaw", "eye_direction_pitch",
    "eye_direction_confidence",
)

VIEW_SQL = {
    # The aggregates run per job (LATERAL), so a filter on job_id, which only jobs holds, selects the job
    # first and its rows through the (ingest_id, ...) indexes. The window's partition leads with job_id, so
    # that filter is pushed below it.
    "person_identities": """
    CREATE VIEW reporting.person_identities AS
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
    "person_appearances": """
    CREATE VIEW reporting.person_appearances AS
    SELECT j.job_id, p.person_index, p.first_seen_ms, p.last_seen_ms, p.detections::integer AS detections,
           p.last_seen_ms - p.first_seen_ms AS span_ms,
           (SELECT count(DISTINCT f.timestamp_ms / 1000) FROM rekognition.faces f
             WHERE f.ingest_id = p.ingest_id AND f.person_index = p.person_index) AS seconds_present
    FROM rekognition.persons p
    JOIN rekognition.jobs j ON j.ingest_id = p.ingest_id AND j.ingest_state = 'ingested'
    """,
    "collection_face_sightings": """
    CREATE VIEW reporting.collection_face_sightings AS
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
    CREATE VIEW reporting.person_seconds AS
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
    "face_observations": f"""
    CREATE VIEW reporting.face_observations AS
    SELECT j.job_id, {", ".join(f"f.{c}" for c in _FACE_VIEW_COLUMNS)}, j.api
    FROM rekognition.faces f
    JOIN rekognition.jobs j ON j.ingest_id = f.ingest_id AND j.ingest_state = 'ingested'
    """,
}

_DELETE_JOB_ROWS = f"""
CREATE OR REPLACE FUNCTION {SCHEMA}.delete_job_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
{"".join(f"    DELETE FROM {SCHEMA}.{t} c USING {SCHEMA}.ingests i, gone "
         f"WHERE c.ingest_id = i.ingest_id AND i.job_id = gone.job_id;{chr(10)}" for t in TABLES)}\
    DELETE FROM {SCHEMA}.ingests c USING gone WHERE c.job_id = gone.job_id;
    DELETE FROM {SCHEMA}.job_retries c USING gone WHERE c.job_id = gone.job_id;
    RETURN NULL;
END
$$
"""
_DELETE_JOB_ROWS_0007 = f"""
CREATE OR REPLACE FUNCTION {SCHEMA}.delete_job_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
{"".join(f"    DELETE FROM {SCHEMA}.{t} c USING gone WHERE c.job_id = gone.job_id;{chr(10)}"
         for t in (*TABLES, "job_retries"))}\
    RETURN NULL;
END
$$
"""

_GRANTS = """
SELECT CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(g.grantee)) END AS grantee,
       g.privilege_type, g.is_grantable
FROM pg_class c, aclexplode(c.relacl) g
WHERE c.oid = to_regclass(:name) AND g.grantee <> c.relowner
"""
_COMMENTS = """
SELECT a.attname AS name, col_description(a.attrelid, a.attnum) AS comment
FROM pg_attribute a WHERE a.attrelid = to_regclass(:name) AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL SELECT NULL, obj_description(to_regclass(:name), 'pg_class')
"""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _save_views() -> dict[str, tuple[list[tuple[str, str, bool]], list[tuple[str | None, str]]]]:
    conn = op.get_bind()
    saved = {}
    for view in VIEWS:
        name = f"reporting.{view}"
        grants = [tuple(r) for r in conn.execute(sa.text(_GRANTS), {"name": name})]
        comments = [(r.name, r.comment) for r in conn.execute(sa.text(_COMMENTS), {"name": name})
                    if r.comment is not None]
        saved[view] = (grants, comments)
    return saved


def _restore_views(saved: dict[str, tuple[list[tuple[str, str, bool]], list[tuple[str | None, str]]]]) -> None:
    for view, (grants, comments) in saved.items():
        for grantee, privilege, grantable in grants:
            op.execute(f"GRANT {privilege} ON reporting.{view} TO {grantee}{' WITH GRANT OPTION' if grantable else ''}")
        for column, comment in comments:
            target = f"VIEW reporting.{view}" if column is None else f'COLUMN reporting.{view}."{column}"'
            op.execute(f"COMMENT ON {target} IS {_literal(comment)}")


def upgrade() -> None:
    saved = _save_views()
    for view in VIEWS:
        op.execute(f"DROP VIEW reporting.{view}")
    op.execute("CREATE SEQUENCE ingest_ids AS integer CYCLE")
    op.execute(f"""
        CREATE TABLE ingests (
            ingest_id integer PRIMARY KEY,
            job_id text NOT NULL CONSTRAINT ingests_job_id_check CHECK ({_KEY_CHECK}),
            started_at timestamp with time zone NOT NULL DEFAULT now()
        )""")
    op.execute("CREATE INDEX ingests_job_idx ON ingests (job_id)")
    op.execute("ALTER TABLE jobs ADD COLUMN ingest_id integer")
    # Every job with rows gets a key; rows of no job (none are expected) stay behind with the old tables.
    op.execute("""
        UPDATE jobs j SET ingest_id = nextval('ingest_ids')
        WHERE EXISTS (SELECT 1 FROM faces f WHERE f.job_id = j.job_id)
           OR EXISTS (SELECT 1 FROM raw_pages r WHERE r.job_id = j.job_id)
           OR EXISTS (SELECT 1 FROM collection_faces c WHERE c.job_id = j.job_id)""")
    op.execute("INSERT INTO ingests (ingest_id, job_id) SELECT ingest_id, job_id FROM jobs WHERE ingest_id IS NOT NULL")
    op.execute("CREATE UNIQUE INDEX jobs_ingest_idx ON jobs (ingest_id)")
    for table, (columns, after) in TABLES.items():
        names = [c.split()[0] for c in columns]
        old = f"{table}_0011"
        op.execute(f"ALTER TABLE {table} RENAME TO {old}")
        for index in op.get_bind().execute(sa.text(
                "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
                "WHERE x.indrelid = to_regclass(:t)"), {"t": old}).scalars().all():
            op.execute(f"ALTER INDEX {index} RENAME TO {index}_0011")
        for con in op.get_bind().execute(sa.text(
                "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(:t) AND contype = 'p'"),
                {"t": old}).scalars().all():
            op.execute(f"ALTER TABLE {old} RENAME CONSTRAINT {con} TO {con}_0011")
        op.execute(f"CREATE TABLE {table} ({', '.join(columns)})")
        if table in PACKED:
            # One row per face: the elements as arrays in ordinal order.
            arrays = ", ".join(f"array_agg(o.{c} ORDER BY o.ordinal)" for c in PACKED[table].values())
            op.execute(f"INSERT INTO {table} (ingest_id, face_seq, {', '.join(PACKED[table])}) "
                       f"SELECT j.ingest_id, o.face_seq, {arrays} FROM {old} o JOIN jobs j ON j.job_id = o.job_id "
                       f"WHERE j.ingest_id IS NOT NULL GROUP BY j.ingest_id, o.face_seq ORDER BY 1, 2")
        else:
            selected = ", ".join("j.ingest_id" if n == "ingest_id" else f"o.{n}" for n in names)
            op.execute(f"INSERT INTO {table} ({', '.join(names)}) SELECT {selected} FROM {old} o "
                       f"JOIN jobs j ON j.job_id = o.job_id WHERE j.ingest_id IS NOT NULL ORDER BY 1, 2")
        op.execute(f"DROP TABLE {old}")
        for statement in after:
            op.execute(statement)
    op.execute(_DELETE_JOB_ROWS)
    for view in VIEWS:
        op.execute(VIEW_SQL[view])
    _restore_views(saved)


# 0010's tables, for the downgrade: (columns in their order, primary key, indexes).
_OLD_FACES = (
    "job_id text NOT NULL", "face_seq integer NOT NULL", "timestamp_ms bigint NOT NULL", "person_index bigint",
    *(f"person_bbox_{s} double precision" for s in ("width", "height", "left", "top")), "has_face boolean NOT NULL",
    *(f"bbox_{s} double precision" for s in ("width", "height", "left", "top")), "confidence double precision",
    "age_low bigint", "age_high bigint",
    *(column for a in _CONF
      for column in (f"{a}_value {'text' if a == 'gender' else 'boolean'}", f"{a}_confidence double precision")),
    "pose_roll double precision", "pose_yaw double precision", "pose_pitch double precision",
    "quality_brightness double precision", "quality_sharpness double precision",
    "face_occluded_value boolean", "face_occluded_confidence double precision",
    "eye_direction_yaw double precision", "eye_direction_pitch double precision",
    "eye_direction_confidence double precision",
)
OLD_TABLES = {
    "faces": (_OLD_FACES, "job_id, face_seq", (
        "CREATE INDEX faces_job_time_idx ON faces (job_id, timestamp_ms)",
        "CREATE INDEX faces_job_person_idx ON faces (job_id, person_index, timestamp_ms) "
        "WHERE person_index IS NOT NULL")),
    "landmarks": (("job_id text NOT NULL", "face_seq integer NOT NULL", "ordinal smallint NOT NULL",
                   "type text NOT NULL", "x double precision", "y double precision"), "job_id, face_seq, ordinal", ()),
    "emotions": (("job_id text NOT NULL", "face_seq integer NOT NULL", "ordinal smallint NOT NULL",
                  "type text NOT NULL", "confidence double precision"), "job_id, face_seq, ordinal", ()),
    "face_matches": (("job_id text NOT NULL", "face_seq integer NOT NULL", "ordinal smallint NOT NULL",
                      "face_id text NOT NULL", "similarity double precision"), "job_id, face_seq, ordinal", (
        "CREATE INDEX face_matches_face_idx ON face_matches (face_id, job_id)",)),
    "collection_faces": (("job_id text NOT NULL", "face_id text NOT NULL", "image_id text", "external_image_id text",
                          "user_id text", "index_faces_model_version text",
                          *(f"bbox_{s} double precision" for s in ("width", "height", "left", "top")),
                          "confidence double precision"), "job_id, face_id", (
        "CREATE INDEX collection_faces_face_idx ON collection_faces (face_id)",
        "CREATE INDEX collection_faces_external_idx ON collection_faces (external_image_id) "
        "WHERE external_image_id IS NOT NULL")),
    "persons": (("job_id text NOT NULL", "person_index bigint NOT NULL", "first_seen_ms bigint NOT NULL",
                 "last_seen_ms bigint NOT NULL", "detections integer NOT NULL"), "job_id, person_index", ()),
    "raw_pages": (("job_id text NOT NULL", "page_no integer NOT NULL", "encoding text NOT NULL", "body bytea NOT NULL",
                   "body_bytes integer NOT NULL", "fetched_at timestamp with time zone NOT NULL DEFAULT now()"),
                  "job_id, page_no", ()),
}

# 0002's views (face_observations' f.* is faces with job_id first), recreated by the downgrade.
OLD_VIEW_SQL = {
    "person_identities": """
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
    "person_appearances": """
    CREATE VIEW reporting.person_appearances AS
    SELECT p.job_id, p.person_index, p.first_seen_ms, p.last_seen_ms, p.detections,
           p.last_seen_ms - p.first_seen_ms AS span_ms,
           (SELECT count(DISTINCT f.timestamp_ms / 1000) FROM faces f
             WHERE f.job_id = p.job_id AND f.person_index = p.person_index) AS seconds_present
    FROM persons p
    JOIN jobs j ON j.job_id = p.job_id AND j.ingest_state = 'ingested'

    """,
    "collection_face_sightings": """
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
    "person_seconds": """
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
    "face_observations": """
    CREATE VIEW reporting.face_observations AS
    SELECT f.*, j.api
    FROM faces f
    JOIN jobs j ON j.job_id = f.job_id AND j.ingest_state = 'ingested'

    """,
}


def downgrade() -> None:
    """Back to one JobId per row: the current ingest of each job is kept, other keys' rows are dropped."""
    saved = _save_views()
    for view in VIEWS:
        op.execute(f"DROP VIEW reporting.{view}")
    for table, (columns, key, indexes) in OLD_TABLES.items():
        names = [c.split()[0] for c in columns]
        op.execute(f"ALTER TABLE {table} RENAME TO {table}_0012")
        for index in op.get_bind().execute(sa.text(
                "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
                "WHERE x.indrelid = to_regclass(:t)"), {"t": f"{table}_0012"}).scalars().all():
            op.execute(f"ALTER INDEX {index} RENAME TO {index}_0012")
        for con in op.get_bind().execute(sa.text(
                "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(:t) AND contype = 'p'"),
                {"t": f"{table}_0012"}).scalars().all():
            op.execute(f"ALTER TABLE {table}_0012 RENAME CONSTRAINT {con} TO {con}_0012")
        op.execute(f"CREATE TABLE {table} ({', '.join(columns)}, CONSTRAINT {table}_pkey PRIMARY KEY ({key}))")
        if table in PACKED:
            arrays = ", ".join(f"o.{c}" for c in PACKED[table])
            elements = ", ".join(f"u.{c}" for c in PACKED[table].values())
            op.execute(f"INSERT INTO {table} (job_id, face_seq, ordinal, {', '.join(PACKED[table].values())}) "
                       f"SELECT j.job_id, o.face_seq, u.n - 1, {elements} FROM {table}_0012 o "
                       f"JOIN jobs j ON j.ingest_id = o.ingest_id, "
                       f"unnest({arrays}) WITH ORDINALITY u({', '.join(PACKED[table].values())}, n)")
        else:
            selected = ", ".join("j.job_id" if n == "job_id" else f"o.{n}" for n in names)
            op.execute(f"INSERT INTO {table} ({', '.join(names)}) SELECT {selected} FROM {table}_0012 o "
                       f"JOIN jobs j ON j.ingest_id = o.ingest_id")
        op.execute(f"DROP TABLE {table}_0012")
        for statement in indexes:
            op.execute(statement)
    op.execute(_DELETE_JOB_ROWS_0007)
    op.execute("DROP INDEX jobs_ingest_idx")
    op.execute("ALTER TABLE jobs DROP COLUMN ingest_id")
    op.execute("DROP TABLE ingests")
    op.execute("DROP SEQUENCE ingest_ids")
    for view in VIEWS:
        op.execute(OLD_VIEW_SQL[view])
    _restore_views(saved)
