"""ingest_state gets the value `pending`: a job whose completion notification arrived, not yet ingested or failed.

On its own revision because PostgreSQL refuses to use an enum value in the transaction that added it,
and alembic runs one transaction per revision here: revision 0010 (the completion clock) is the first
to use it. The enum stays an enum (0005 kept it one: the worker writes it, Rekognition does not), so
`jobs list --state` learns the value from the type with no code change.

Downgrade leaves the label in place: PostgreSQL cannot drop an enum value without rebuilding the type
under every view that reads `jobs`, and code older than 0010 never writes it (0010's downgrade removes
every pending row first).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TYPE ingest_state ADD VALUE IF NOT EXISTS 'pending' BEFORE 'ingested'")


def downgrade() -> None:
    pass
