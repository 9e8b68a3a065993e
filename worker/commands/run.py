"""`run`: the SQS worker on QUEUE_URL."""

from __future__ import annotations

from worker.commands.base import Context, SubParsers, arun, check_database


def register(sub: SubParsers) -> None:
    r = sub.add_parser("run", help="the SQS worker on QUEUE_URL")
    r.add_argument("--exit-when-idle", action="store_true",
                   help="exit 0 once the queue is empty and nothing is in flight; exit 2 at once if submitted "
                        "videos wait and no notification channel is configured to start them")
    r.set_defaults(handler=run)


def run(ctx: Context) -> int:
    from worker.errors import ConfigError
    from worker.service import run_service

    # A pod started while the database is down exits with one line (and restarts) rather than half-starting.
    check_database(ctx.settings)
    if not ctx.settings.queue_url:
        raise ConfigError("QUEUE_URL is not set")
    return arun(run_service(ctx.settings, exit_when_idle=ctx.args.exit_when_idle))
