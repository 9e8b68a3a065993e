"""`dlq list` and `dlq redrive`: the dead-letter queue of QUEUE_URL (found from its redrive policy)."""

from __future__ import annotations

from worker.commands.base import EXIT_FAILED, EXIT_OK, Context, SubParsers, arun, check_database, positive
from worker.commands.output import Column, add_format_argument, emit


def _age(seconds: int | None) -> str:
    from worker.dlq import _age as age

    return age(seconds)


DLQ_COLUMNS = (
    Column("message_id", "message id", priority=4), Column("sent_at", "sent", priority=5,
                                                           show=lambda v: (v or "?")[:19].replace("T", " ")),
    Column("age_s", "age", priority=2, justify="right", show=_age),
    Column("receive_count", "receives", priority=4, justify="right"),
    Column("job_id", "job", priority=0), Column("api", "api", priority=3),
    Column("ingested", "ingested", priority=1, show=lambda v: {True: "yes", False: "no"}.get(v, "-")),
    Column("reason", "reason", priority=0, flexible=True),
)


def register(sub: SubParsers) -> None:
    dlq = sub.add_parser("dlq", help="the dead-letter queue of QUEUE_URL (found from its redrive policy)")
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="each message: age, receives, job, why it is there, whether ingested; "
                                         "every message stays in the DLQ")
    add_format_argument(ls)
    ls.add_argument("--limit", type=positive, default=1000, help="read at most this many messages (1000)")
    ls.set_defaults(handler=run_list)
    rd = actions.add_parser("redrive", help="move messages back to QUEUE_URL (send, then delete)")
    which = rd.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true",
                       help="every message (SQS's message move task where available: it cannot filter)")
    which.add_argument("--job", metavar="JOB_ID", help="only this job's messages")
    rd.add_argument("--dry-run", action="store_true", help="say what would move; send and delete nothing")
    rd.add_argument("--no-move-task", action="store_true",
                    help="with --all, move one by one: skips ingested jobs, leaves unparseable messages")
    rd.set_defaults(handler=run_redrive)


def run_list(ctx: Context) -> int:
    from worker.dlq import read_listing

    if ctx.settings.database_url:
        check_database(ctx.settings)  # the database first: it is what an outage most often is
    listing, database = arun(read_listing(ctx.settings, limit=ctx.args.limit))
    warnings = []
    if listing.truncated:
        warnings.append(f"more messages than --limit {ctx.args.limit}: raise --limit to see them")
    if not database:
        warnings.append("DATABASE_URL is not set: job states were not looked up")
    emit(ctx.out, ctx.args.format, listing.rows, DLQ_COLUMNS, warnings=warnings,
         title=f"dead-letter queue {listing.dlq_url}: {len(listing.rows)} message(s)",
         styles={"ingested": lambda v: "green" if v else None})
    return EXIT_OK


def run_redrive(ctx: Context) -> int:
    from worker.dlq import run_redrive
    from worker.errors import NotFound
    from worker.messages import validate_job_id

    args = ctx.args
    job_id = validate_job_id(args.job) if args.job is not None else None
    check_database(ctx.settings)  # the database first: it is what an outage most often is
    result = arun(run_redrive(ctx.settings, job_id=job_id, dry_run=args.dry_run,
                              use_move_task=not args.no_move_task, console=ctx.out))
    if job_id is not None and not (result.moved or result.skipped_ingested or result.failed
                                   or result.duplicates_left) and not result.truncated:
        raise NotFound(f"no message of job {job_id} in the dead-letter queue")
    return EXIT_OK if result.ok else EXIT_FAILED
