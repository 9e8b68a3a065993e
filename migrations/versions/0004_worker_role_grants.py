"""Least privilege for the worker: DML on its tables, read on the reporting schema.

Runs as the migration role (the owner of the objects, see sql/01_roles.sql and docs/security.md).
When the role `rekognition_worker` exists it gets SELECT/INSERT/UPDATE/DELETE on the worker's tables
(no DDL, no TRUNCATE, read-only on alembic_version) and read access to `reporting`; default
privileges extend that to tables later migrations create. Where the role does not exist (local
runs, tests) nothing happens; sql/03_grants.sql applies the same grants by hand.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

GRANTS = """
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'rekognition_worker') THEN
        GRANT USAGE ON SCHEMA public TO rekognition_worker;
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO rekognition_worker;
        GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO rekognition_worker;
        REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON TABLE public.alembic_version FROM rekognition_worker;
        GRANT USAGE ON SCHEMA reporting TO rekognition_worker;
        GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO rekognition_worker;
        GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA reporting TO rekognition_worker;
        ALTER DEFAULT PRIVILEGES IN SCHEMA public
            GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO rekognition_worker;
        ALTER DEFAULT PRIVILEGES IN SCHEMA reporting GRANT SELECT ON TABLES TO rekognition_worker;
    END IF;
END
$grants$
"""


def upgrade() -> None:
    op.execute(GRANTS)


def downgrade() -> None:
    # Grants are not schema: leaving them keeps a downgraded worker working.
    pass
