"""Rekognition's enumerations become text: values newer than this version are stored as sent.

landmarks.type, emotions.type, faces.gender_value, jobs.color_range and jobs.job_status were
PostgreSQL enums, so a value Rekognition added later (a new landmark type, emotion, gender, color
range, job status) could only be refused, failing the whole job. Adding labels at run time is DDL on
a type the worker role does not own (it has DML grants only, see 0004), so the columns become text;
the normalizer still checks what text can hold (a string, no NUL, at most 256 characters). face_api
and ingest_state stay enums: the worker writes them, Rekognition does not.

The views that read these columns (0002: job_summary, face_observations, or whatever depends on them
when this runs) are dropped and recreated from their own definitions, with their grants and comments,
so the reporting surface is unchanged apart from those columns being text. The conversion rewrites
faces, landmarks, emotions and jobs under an ACCESS EXCLUSIVE lock: stop the workers while it runs.
It reads the catalog, so it cannot be rendered offline (alembic --sql).

Downgrade converts back and fails, changing nothing, when a value outside the old enums is stored:
such rows cannot be expressed in the old schema (delete or reingest them with the old version first).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from dataclasses import dataclass

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# The labels of migration 0001, copied: a migration must not change when the code does.
ENUMS: dict[str, tuple[str, ...]] = {
    "landmark_type": (
        "eyeLeft", "eyeRight", "nose", "mouthLeft", "mouthRight", "leftEyeBrowLeft", "leftEyeBrowRight",
        "leftEyeBrowUp", "rightEyeBrowLeft", "rightEyeBrowRight", "rightEyeBrowUp", "leftEyeLeft",
        "leftEyeRight", "leftEyeUp", "leftEyeDown", "rightEyeLeft", "rightEyeRight", "rightEyeUp",
        "rightEyeDown", "noseLeft", "noseRight", "mouthUp", "mouthDown", "leftPupil", "rightPupil",
        "upperJawlineLeft", "midJawlineLeft", "chinBottom", "midJawlineRight", "upperJawlineRight",
    ),
    "emotion_type": ("HAPPY", "SAD", "ANGRY", "CONFUSED", "DISGUSTED", "SURPRISED", "CALM", "UNKNOWN", "FEAR"),
    "gender": ("Male", "Female"),
    "color_range": ("FULL", "LIMITED"),
    "job_status": ("IN_PROGRESS", "SUCCEEDED", "FAILED"),
}
# table -> (column, its enum type before this revision); one ALTER TABLE per table, one rewrite each.
COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "jobs": (("job_status", "job_status"), ("color_range", "color_range")),
    "faces": (("gender_value", "gender"),),
    "landmarks": (("type", "landmark_type"),),
    "emotions": (("type", "emotion_type"),),
}

# Views whose query reads one of the columns (a view's rule depends on each column it reads).
_DEPENDENT_VIEWS = """
SELECT DISTINCT v.oid, quote_ident(n.nspname) || '.' || quote_ident(v.relname) AS name
FROM pg_depend d
JOIN pg_rewrite r ON r.oid = d.objid
JOIN pg_class v ON v.oid = r.ev_class
JOIN pg_namespace n ON n.oid = v.relnamespace
JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
  AND d.refobjid = to_regclass(:table) AND a.attname = :column AND v.oid <> d.refobjid AND v.relkind = 'v'
"""
_GRANTS = """
SELECT CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(g.grantee)) END AS grantee,
       g.privilege_type, g.is_grantable
FROM pg_class c, aclexplode(c.relacl) g
WHERE c.oid = :oid AND g.grantee <> c.relowner
"""
_COMMENTS = """
SELECT a.attnum, quote_ident(a.attname) AS name, quote_literal(col_description(a.attrelid, a.attnum)) AS comment
FROM pg_attribute a WHERE a.attrelid = :oid AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL SELECT 0, NULL, quote_literal(obj_description(:oid, 'pg_class'))
"""


@dataclass(frozen=True)
class _View:
    name: str
    definition: str
    options: list[str] | None
    grants: list[tuple[str, str, bool]]
    comments: list[tuple[int, str | None, str]]  # (0 for the view itself or a column number, column, literal)


def _dependent_views(conn: sa.Connection) -> list[_View]:
    oids: dict[int, str] = {}
    for table, columns in COLUMNS.items():
        for column, _ in columns:
            for oid, name in conn.execute(sa.text(_DEPENDENT_VIEWS), {"table": table, "column": column}):
                oids[oid] = name
    views = []
    for oid, name in sorted(oids.items()):
        definition, options = conn.execute(sa.text(
            "SELECT pg_get_viewdef(CAST(:oid AS oid)), reloptions FROM pg_class WHERE oid = :oid"), {"oid": oid}).one()
        grants = [tuple(r) for r in conn.execute(sa.text(_GRANTS), {"oid": oid})]
        comments = [tuple(r) for r in conn.execute(sa.text(_COMMENTS), {"oid": oid}) if r.comment is not None]
        views.append(_View(name, definition, options, grants, comments))
    return views


def _recreate(view: _View) -> None:
    options = f" WITH ({', '.join(view.options)})" if view.options else ""
    op.execute(f"CREATE VIEW {view.name}{options} AS {view.definition}")
    for grantee, privilege, grantable in view.grants:
        op.execute(f"GRANT {privilege} ON {view.name} TO {grantee}{' WITH GRANT OPTION' if grantable else ''}")
    for attnum, column, comment in view.comments:
        target = f"VIEW {view.name}" if attnum == 0 else f"COLUMN {view.name}.{column}"
        op.execute(f"COMMENT ON {target} IS {comment}")  # COMMENT takes no parameters: a quoted literal


def _convert(to_type: dict[str, str]) -> None:
    """ALTER every column to ``to_type[enum]``, with the views that read them dropped meanwhile."""
    views = _dependent_views(op.get_bind())
    for view in views:
        # No CASCADE: a view built on these views is the operator's to move, not ours to drop.
        op.execute(f"DROP VIEW {view.name}")
    for table, columns in COLUMNS.items():
        changes = ", ".join(f"ALTER COLUMN {column} TYPE {to_type[enum]} USING {column}::text::{to_type[enum]}"
                            for column, enum in columns)
        op.execute(f"ALTER TABLE {table} {changes}")
    for view in views:
        _recreate(view)


def upgrade() -> None:
    _convert({enum: "text" for enum in ENUMS})
    # No CASCADE: anything else still using a type makes this fail instead of losing it.
    op.execute(f"DROP TYPE {', '.join(ENUMS)}")


def downgrade() -> None:
    conn = op.get_bind()
    problems = []
    for table, columns in COLUMNS.items():
        for column, enum in columns:
            found = conn.execute(sa.text(
                f"SELECT DISTINCT left({column}, 64) FROM {table} "
                f"WHERE {column} IS NOT NULL AND NOT ({column} = ANY(:labels)) LIMIT 5"),
                {"labels": list(ENUMS[enum])}).scalars().all()
            if found:
                problems.append(f"{table}.{column}: {', '.join(map(repr, found))}")
    if problems:
        raise RuntimeError("cannot downgrade below 0005: values unknown to the old enum types are stored ("
                           + "; ".join(problems) + "); delete or reingest those jobs first")
    for enum, labels in ENUMS.items():
        op.execute(f"CREATE TYPE {enum} AS ENUM ({', '.join(repr(label) for label in labels)})")
    _convert({enum: enum for enum in ENUMS})
