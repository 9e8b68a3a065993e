"""`migrate`: alembic upgrade to head on DATABASE_URL."""

from __future__ import annotations

import logging

from worker.commands.base import EXIT_OK, Context, SubParsers
from worker.config import redact_url


def register(sub: SubParsers) -> None:
    p = sub.add_parser("migrate", help="alembic upgrade to head on DATABASE_URL (grants rekognition_worker its DML)")
    p.set_defaults(handler=run)


def run(ctx: Context) -> int:
    from worker.db.migrate import upgrade_to_head

    # Which revisions ran is what an operator wants from this command: alembic says so at INFO.
    logging.getLogger("alembic").setLevel(logging.getLogger("worker").getEffectiveLevel())
    upgrade_to_head(ctx.settings)
    ctx.out.print(f"database at head: {redact_url(ctx.settings.asyncpg_dsn)}", markup=False, highlight=False)
    return EXIT_OK
