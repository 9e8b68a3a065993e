"""Jobs being retried, and why: the streak of identical failures that ends a job after MAX_IDENTICAL_FAILURES.

One row per job that has failed an attempt and is not finished yet; the row goes in the transaction
that ingests the job or records it failed, so the table lists exactly the jobs still being retried.
``streak`` counts consecutive attempts that ended with the same error of the job (same ``fingerprint``:
the error's type and message with numbers blanked). Outages (database, network, Rekognition throttling or
faults, credentials) are the deployment's, not the job's: they are counted apart (``outages``) and
neither extend nor reset the streak.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE job_retries (
            job_id            text PRIMARY KEY CHECK (job_id ~ '^[a-zA-Z0-9_-]{1,64}$'),
            api               text NOT NULL,
            -- The job's own failures: the last one, and how many attempts in a row ended with it.
            fingerprint       text,
            last_error        text,
            streak            integer NOT NULL DEFAULT 0 CHECK (streak >= 0),
            streak_started_at timestamptz,
            failures          integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
            -- Outages seen by this job's attempts: never held against it.
            outages           integer NOT NULL DEFAULT 0 CHECK (outages >= 0),
            last_outage       text,
            first_failed_at   timestamptz NOT NULL DEFAULT now(),
            last_failed_at    timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX job_retries_streak_idx ON job_retries (streak DESC, last_failed_at)")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS job_retries")
