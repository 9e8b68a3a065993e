"""Data that stays gone: erased identifiers, tombstones of deleted jobs, one retention clock.

- ``erased_identifiers``: one row per erased identifier, as the keyed hash the erasure audit uses
  (HMAC-SHA256 over ``kind:value`` with ERASURE_HASH_KEY), never the identifier. `erase` adds the
  identifier it was given and, for an ExternalImageId or UserId, the FaceIds found for it. Every write
  that makes an ingest visible (the switch of worker/db/store.py) first removes what these hashes name
  from the new rows and raw pages, so no ingest, reprocess, retry, redrive or re-notification brings an
  erased identity back. Append-only for the worker role, like ``erasures``: un-erasing is not a
  routine step.
- ``tombstones``: one row per job removed by `delete` or the retention purge (JobId, when, why; no face
  data), written in the transaction that removes the job. A later notification of the job is settled
  without ingesting it; `backfill --restore-deleted` / `jobs retry --restore-deleted` remove it.
- ``jobs.first_ingested_at``: when the job's results were first stored completely (its first switch).
  Re-ingests, `reprocess` and `jobs retry` keep it (the store writes the least of it and the previous
  ``ingested_at``); `delete --ingested-before` and RETENTION_DAYS count from it, while ``ingested_at``
  keeps its meaning (the last complete ingest). Jobs ingested before this revision start from their
  ``ingested_at``: the earliest time still known.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_KEY_CHECK = "job_id ~ '^[a-zA-Z0-9_-]{1,64}$'"

GRANTS = """
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'rekognition_worker') THEN
        GRANT SELECT, INSERT ON TABLE erased_identifiers TO rekognition_worker;
        REVOKE UPDATE, DELETE, TRUNCATE ON TABLE erased_identifiers FROM rekognition_worker;
        GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE tombstones TO rekognition_worker;
    END IF;
END
$grants$
"""


def upgrade() -> None:
    op.execute("""
        CREATE TABLE erased_identifiers (
            -- hex HMAC-SHA256(ERASURE_HASH_KEY, selector_kind || ':' || identifier), as erasures.selector_hash
            selector_hash text PRIMARY KEY CHECK (selector_hash ~ '^[0-9a-f]{64}$'),
            selector_kind text NOT NULL CHECK (selector_kind IN ('external_image_id', 'face_id', 'user_id')),
            erased_at timestamptz NOT NULL DEFAULT now()
        )""")
    op.execute(f"""
        CREATE TABLE tombstones (
            job_id text PRIMARY KEY CONSTRAINT tombstones_job_id_check CHECK ({_KEY_CHECK}),
            api face_api,
            reason text NOT NULL CONSTRAINT tombstones_reason_check CHECK (reason IN ('deleted', 'expired')),
            deleted_at timestamptz NOT NULL DEFAULT now()
        )""")
    op.execute("ALTER TABLE jobs ADD COLUMN first_ingested_at timestamptz")
    op.execute("UPDATE jobs SET first_ingested_at = ingested_at WHERE ingested_at IS NOT NULL")
    op.execute(GRANTS)


def downgrade() -> None:
    op.execute("ALTER TABLE jobs DROP COLUMN IF EXISTS first_ingested_at")
    op.execute("DROP TABLE IF EXISTS tombstones")
    op.execute("DROP TABLE IF EXISTS erased_identifiers")
