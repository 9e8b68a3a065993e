"""Fleet rate limit: one row per shared bucket, holding the fleet's pacing and AIMD state.

With RATE_LIMIT_SCOPE=fleet every worker process takes each Rekognition Get* slot from this row with
one atomic UPDATE (see worker/fleet.py): tokens refill by elapsed server time at ``rate_per_s``, a
negative balance is a reservation to wait for, and a throttle seen by any process cuts ``rate_per_s``
for all of them. The table stays tiny (one row per bucket name) and is updated a few times a second.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE rate_limit_buckets (
            name            text PRIMARY KEY,
            ceiling_per_s   double precision NOT NULL CHECK (ceiling_per_s > 0),
            rate_per_s      double precision NOT NULL CHECK (rate_per_s > 0),
            -- At most 1 (no bursts); below 0 it counts slots already promised to callers.
            tokens          double precision NOT NULL DEFAULT 1 CHECK (tokens <= 1),
            refilled_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
            -- The rate that was last throttled, and when it was cut (epoch: never).
            cut_rate_per_s  double precision,
            cut_at          timestamptz NOT NULL DEFAULT 'epoch',
            increased_at    timestamptz NOT NULL DEFAULT 'epoch',
            -- The last time a call had to wait for its slot: the rate only climbs while it is what limits calls.
            waited_at       timestamptz NOT NULL DEFAULT 'epoch',
            grants          bigint NOT NULL DEFAULT 0,
            cuts            bigint NOT NULL DEFAULT 0,
            updated_at      timestamptz NOT NULL DEFAULT clock_timestamp()
        )
        """
    )
    # Updated several times a second: leave room on each page so updates stay HOT and the row small.
    op.execute("ALTER TABLE rate_limit_buckets SET (fillfactor = 50)")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS rate_limit_buckets")
