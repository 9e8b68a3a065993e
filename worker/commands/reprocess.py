"""`reprocess`: rebuild jobs' rows from the raw page archive (no AWS calls)."""

from __future__ import annotations

from worker.commands.backfill import print_outcomes
from worker.commands.base import EXIT_FAILED, EXIT_NOT_FOUND, EXIT_OK, Context, SubParsers, arun, job_error
from worker.commands.output import add_format_argument
from worker.errors import InvalidInput


def register(sub: SubParsers) -> None:
    rp = sub.add_parser("reprocess", help="rebuild jobs' rows from the raw page archive (no AWS calls)")
    rp.add_argument("--all", action="store_true", help="every ingested job that has archived pages")
    rp.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    add_format_argument(rp)
    rp.set_defaults(handler=run)


def run(ctx: Context) -> int:
    from worker.reprocess import run_reprocess

    args = ctx.args
    if bool(args.all) == bool(args.job_ids):
        raise InvalidInput("reprocess needs JOB_ID arguments or --all (not both)")
    outcomes = arun(run_reprocess(ctx.settings, None if args.all else list(args.job_ids)))
    for o in outcomes:
        if o.outcome != "ingested":
            job_error(o.job_id, o.reason or o.outcome)
    print_outcomes(ctx, outcomes, title="reprocess summary")
    if outcomes and all(o.outcome == "ingested" for o in outcomes):
        return EXIT_OK
    # Every named job missing: the same answer as `report` and `delete` give for a job that does not exist.
    missing = [o for o in outcomes if o.reason == "no such job in the database"]
    return EXIT_NOT_FOUND if outcomes and len(missing) == len(outcomes) else EXIT_FAILED
