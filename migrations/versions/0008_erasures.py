"""The erasure audit: one row per `erase` run, with a keyed hash of the identifier, never the identifier.

``selector_hash`` is HMAC-SHA256 over ``kind:value`` with ERASURE_HASH_KEY (kept outside the database),
so a later request about the same person can be shown to have been carried out without the table
itself naming anybody. The counts are what the run removed. The worker role may add rows and read
them, not change or remove them: the audit is append-only for it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

COUNTS = ("jobs", "collection_faces", "face_matches", "persons", "faces", "landmarks", "emotions",
          "pages_rewritten")

GRANTS = """
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'rekognition_worker') THEN
        GRANT SELECT, INSERT ON TABLE erasures TO rekognition_worker;
        REVOKE UPDATE, DELETE, TRUNCATE ON TABLE erasures FROM rekognition_worker;
    END IF;
END
$grants$
"""


def upgrade() -> None:
    counts = ",\n".join(f"    {name} integer NOT NULL DEFAULT 0 CHECK ({name} >= 0)" for name in COUNTS)
    op.execute(
        f"""
        CREATE TABLE erasures (
            id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            erased_at     timestamptz NOT NULL DEFAULT now(),
            selector_kind text NOT NULL CHECK (selector_kind IN ('external_image_id', 'face_id', 'user_id')),
            -- hex HMAC-SHA256(ERASURE_HASH_KEY, selector_kind || ':' || identifier)
            selector_hash text NOT NULL CHECK (selector_hash ~ '^[0-9a-f]{{64}}$'),
        {counts}
        )
        """
    )
    op.execute("CREATE INDEX erasures_hash_idx ON erasures (selector_hash)")
    op.execute(GRANTS)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS erasures")
