"""`jobs list` and `jobs retry`: jobs in PostgreSQL by state, and failed ones ingested again."""

from __future__ import annotations

from typing import Any

from worker import tombstones
from worker.commands.backfill import print_outcomes
from worker.commands.base import (
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    Context,
    SubParsers,
    arun,
    err_console,
    job_error,
    note,
    positive,
)
from worker.commands.output import Column, add_format_argument, emit
from worker.errors import InvalidInput


def _failure(row: dict[str, Any]) -> str:
    return ": ".join(x for x in (row.get("failure_code"), row.get("failure_reason")) if x)


JOB_COLUMNS = (
    Column("job_id", "job", priority=0), Column("api", "api", priority=1),
    Column("ingest_state", "state", priority=0), Column("failure", "failure", priority=0, flexible=True),
    Column("job_status", "rekognition", priority=3), Column("attempts", "attempts", priority=4, justify="right"),
    Column("updated_at", "updated", priority=2), Column("notified_at", "notified", priority=5),
    Column("ingested_at", "ingested", priority=5),
)
_STATE_STYLE = {"ingest_state": lambda v: {"ingested": "green", "pending": "yellow"}.get(v, "red")}


def register(sub: SubParsers) -> None:
    jobs = sub.add_parser("jobs", help="jobs in PostgreSQL: list them, retry failed ones")
    actions = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="jobs, newest change first")
    ls.add_argument("--state", metavar="S", help="an ingest state: ingested, failed")
    ls.add_argument("--since", metavar="ISO8601", help="changed at or after this time (UTC unless a zone is given)")
    ls.add_argument("--limit", type=positive, default=100, help="at most this many jobs (100)")
    add_format_argument(ls)
    ls.set_defaults(handler=run_list)
    rt = actions.add_parser("retry", help="ingest failed jobs again from Rekognition")
    rt.add_argument("--state", metavar="S", default="failed", help="only failed (the default)")
    rt.add_argument("--since", metavar="ISO8601", help="failed at or after this time")
    rt.add_argument("--job", dest="job_ids", metavar="JOB_ID", nargs="+", action="extend",
                    help="only these jobs")
    rt.add_argument("--include-rekognition-failed", action="store_true",
                    help="also jobs Rekognition itself reported FAILED (normally skipped: retrying cannot help)")
    rt.add_argument("--dry-run", action="store_true", help="list what would be retried and stop")
    rt.add_argument("--limit", type=positive, default=1000, help="at most this many jobs (1000)")
    tombstones.add_restore_flag(rt, "with --job, retry the named jobs")
    add_format_argument(rt)
    rt.set_defaults(handler=run_retry)


def run_list(ctx: Context) -> int:
    from worker.db.engine import connect
    from worker.jobs import list_jobs, parse_since

    args = ctx.args
    since = parse_since(args.since)

    async def load() -> list[dict[str, Any]]:
        conn = await connect(ctx.settings.asyncpg_dsn)
        try:
            return await list_jobs(conn, state=args.state, since=since, limit=args.limit)
        finally:
            await conn.close()

    rows = arun(load())
    for r in rows:
        r["failure"] = _failure(r)
    warnings = [f"limit reached: {len(rows)} job(s) shown; raise --limit or narrow with --state/--since"] \
        if len(rows) >= args.limit else []
    emit(ctx.out, args.format, rows, JOB_COLUMNS, title=f"{len(rows)} job(s), newest first", warnings=warnings,
         records=[{k: v for k, v in r.items() if k != "failure"} for r in rows], styles=_STATE_STYLE)
    return EXIT_OK


_PLAN_COLUMNS = (Column("job_id", "job", priority=0), Column("api", "api", priority=1),
                 Column("action", "action", priority=0, flexible=True))


def run_retry(ctx: Context) -> int:
    from worker.backfill import run_backfill
    from worker.db.engine import connect
    from worker.jobs import RetryPlan, parse_since, plan_retry

    args, settings = ctx.args, ctx.settings
    since = parse_since(args.since)
    if args.restore_deleted:
        if not args.job_ids:
            raise InvalidInput(f"{tombstones.RESTORE_FLAG} needs --job JOB_ID: deleted jobs are restored by name")
        restored = arun(tombstones.run_restore(settings, args.job_ids, for_retry=True))
        note("deleted jobs restored for a retry", jobs=restored)

    async def plan() -> RetryPlan:
        conn = await connect(settings.asyncpg_dsn)
        try:
            return await plan_retry(conn, state=args.state, since=since, job_ids=args.job_ids,
                                    include_rekognition_failed=args.include_rekognition_failed, limit=args.limit)
        finally:
            await conn.close()

    retry = arun(plan())
    more = "; more match: raise --limit" if retry.truncated else ""
    missing = [job_id for job_id, why in retry.skipped if why == "no such job in the database"]
    if args.dry_run or not retry.refs:
        rows: list[dict[str, str | None]] = [{"job_id": r.job_id, "api": r.api.value, "action": "retry"}
                                             for r in retry.refs]
        rows += [{"job_id": job_id, "api": None, "action": f"skip: {why}"} for job_id, why in retry.skipped]
        emit(ctx.out, args.format, rows, _PLAN_COLUMNS,
             title="jobs retry plan" + (" (dry run)" if args.dry_run else ""),
             notes=[f"{len(retry.refs)} job(s) to retry, {len(retry.skipped)} skipped{more}"])
        for job_id in missing:
            job_error(job_id, "no such job in the database")
        # Jobs named with --job that do not exist: the code `report` gives for a job that does not exist.
        return EXIT_NOT_FOUND if args.job_ids and missing and not retry.refs else EXIT_OK
    for job_id, why in retry.skipped:
        job_error(job_id, f"skipped: {why}")
    outcomes = arun(run_backfill(settings, retry.refs, console=err_console()))
    for o in outcomes:
        if o.outcome != "ingested":
            job_error(o.job_id, f"{o.outcome}: {o.reason}")
    ingested = sum(o.outcome == "ingested" for o in outcomes)
    print_outcomes(ctx, outcomes, title="jobs retry summary")
    text = (f"retried {len(outcomes)}: {ingested} ingested, {len(outcomes) - ingested} not; "
            f"{len(retry.skipped)} skipped{more}")
    if ctx.out.is_terminal or args.format in ("table", "text"):
        ctx.out.print(text, markup=False, highlight=False)
    else:
        note(text)
    return EXIT_OK if ingested == len(outcomes) and not missing else EXIT_FAILED
