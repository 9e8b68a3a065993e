"""Command line of the Rekognition Video ingestion worker: every command is described in README.md, "Commands"."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from rich.console import Console

from worker import __version__, tombstones
from worker.config import Settings, log_format_from_env, redact_url
from worker.errors import ConfigError, InvalidInput
from worker.events.commands import add_parser as add_events_parser
from worker.events.commands import deliver_after_command
from worker.events.commands import run_command as run_events_command
from worker.logs import asyncio_exception_handler, configure_logging, get_logger, redact, renders_json
from worker.pagecodec import tune_gc

log = get_logger(__name__)
T = TypeVar("T")


def _arun(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, with the loop's unhandled errors logged like everything else."""
    async def main() -> T:
        asyncio.get_running_loop().set_exception_handler(asyncio_exception_handler)
        return await coro

    return asyncio.run(main())


def _err_console() -> Console:
    # With JSON logs stderr carries JSON lines only: no progress bar even on a terminal.
    return Console(stderr=True, force_terminal=False) if renders_json() else Console(stderr=True)


def _job_error(job_id: str, text: str, *, quoted: bool = False) -> None:
    """One line about a job that did not succeed: a log event with JSON logs, plain text otherwise."""
    if renders_json():
        log.error("job error", job_id=job_id, error=text)
    else:
        shown = repr(job_id) if quoted else job_id
        _err_console().print(redact(f"error: job {shown}: {text}"), markup=False, highlight=False)


def _command_error(exc: Exception) -> None:
    if renders_json():
        log.error("command failed", error=str(exc), error_type=type(exc).__name__)
    else:
        print(f"error: {redact(str(exc))}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("migrate", help="alembic upgrade to head on DATABASE_URL (grants rekognition_worker its DML)")

    b = sub.add_parser("backfill", help="ingest named jobs directly (no queue)")
    b.add_argument("--api", help="GetFaceDetection, GetFaceSearch, StartFace*, FACE_DETECTION, FACE_SEARCH")
    b.add_argument("--from-file", metavar="PATH", help="lines of JOB_ID or JOB_ID,API ('-' for stdin)")
    b.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    tombstones.add_restore_flag(b, "ingest the named jobs")

    r = sub.add_parser("run", help="the SQS worker on QUEUE_URL")
    r.add_argument("--exit-when-idle", action="store_true",
                   help="exit 0 once the queue is empty and nothing is in flight")

    d = sub.add_parser("demo", help="local end-to-end run: embedded PostgreSQL, emulator, moto SQS")
    d.add_argument("--stop", action="store_true", help="stop the embedded PostgreSQL a previous demo left running")

    rp = sub.add_parser("reprocess", help="rebuild jobs' rows from the raw page archive (no AWS calls)")
    rp.add_argument("--all", action="store_true", help="every ingested job that has archived pages")
    rp.add_argument("job_ids", nargs="*", metavar="JOB_ID")

    rep = sub.add_parser("report", help="human summary of one ingested job")
    rep.add_argument("job_id", metavar="JOB_ID")
    rep.add_argument("--format", choices=("text", "json"), default="text")
    rep.add_argument("--chart", metavar="PATH", help="write a timeline PNG of who is on screen when")
    _add_submit_parsers(sub)
    _add_dlq_parser(sub)
    _add_jobs_parser(sub)
    _add_lifecycle_parsers(sub)
    add_events_parser(sub)
    return p


def _add_submit_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sm = sub.add_parser("submit", help="register videos to be analysed; `run` starts them under the limits")
    sm.add_argument("--api", required=True, help="FACE_DETECTION or FACE_SEARCH (or StartFace*, GetFace*)")
    sm.add_argument("--collection-id", metavar="C", help="FACE_SEARCH: the face collection to search")
    sm.add_argument("--face-match-threshold", metavar="F", type=float,
                    help="FACE_SEARCH: lowest similarity of a match, 0..100 (Rekognition's default 80)")
    sm.add_argument("--face-attributes", metavar="DEFAULT|ALL", help="FACE_DETECTION: DEFAULT (the default) or ALL")
    sm.add_argument("--job-tag", metavar="T", help="JobTag of the jobs (in their notifications and results)")
    sm.add_argument("--from-file", metavar="PATH", help="lines of s3://bucket/key ('-' for stdin)")
    sm.add_argument("--force", action="store_true",
                    help="submit again the videos already ingested or failed with these options (a new job each)")
    sm.add_argument("sources", nargs="*", metavar="s3://bucket/prefix",
                    help="every .mp4, .mov and .m4v object under each prefix (any case); other objects are skipped")
    ss = sub.add_parser("submissions", help="submitted videos and their state")
    ss.add_argument("--state", metavar="S", help="submitted, starting, started, finished, ingested or failed")
    ss.add_argument("--limit", type=_positive, default=1000, help="at most this many rows (1000)")
    ss.add_argument("--format", choices=("text", "json"), default="text")


def _add_lifecycle_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dl = sub.add_parser("delete", help="remove jobs with every row and raw page (one job per short transaction)")
    dl.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    dl.add_argument("--ingested-before", metavar="ISO8601",
                    help="every job first ingested before this time (jobs.first_ingested_at: a re-ingest or "
                         "reprocess keeps it; UTC unless a zone is given); jobs never ingested are not included")
    dl.add_argument("--dry-run", action="store_true", help="print the jobs and rows per table; delete nothing")
    er = sub.add_parser("erase", help="remove a collection face, its matches and the persons that matched it "
                                      "from every job, raw pages included (needs ERASURE_HASH_KEY)")
    which = er.add_mutually_exclusive_group(required=True)
    which.add_argument("--external-image-id", metavar="ID")
    which.add_argument("--face-id", metavar="ID")
    which.add_argument("--user-id", metavar="ID")
    er.add_argument("--dry-run", action="store_true", help="print what would be removed; change nothing")


def _add_dlq_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = sub.add_parser("dlq", help="the dead-letter queue of QUEUE_URL (found from its redrive policy)")
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="each message: age, receives, job, why it is there, whether ingested; "
                                         "every message stays in the DLQ")
    ls.add_argument("--format", choices=("text", "json"), default="text")
    ls.add_argument("--limit", type=_positive, default=1000, help="read at most this many messages (1000)")
    rd = actions.add_parser("redrive", help="move messages back to QUEUE_URL (send, then delete)")
    which = rd.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true",
                       help="every message (SQS's message move task where available: it cannot filter)")
    which.add_argument("--job", metavar="JOB_ID", help="only this job's messages")
    rd.add_argument("--dry-run", action="store_true", help="say what would move; send and delete nothing")
    rd.add_argument("--no-move-task", action="store_true",
                    help="with --all, move one by one: skips ingested jobs, leaves unparseable messages")


def _add_jobs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    jobs = sub.add_parser("jobs", help="jobs in PostgreSQL: list them, retry failed ones")
    actions = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="jobs, newest change first")
    ls.add_argument("--state", metavar="S", help="an ingest state: ingested, failed")
    ls.add_argument("--since", metavar="ISO8601", help="changed at or after this time (UTC unless a zone is given)")
    ls.add_argument("--limit", type=_positive, default=100, help="at most this many jobs (100)")
    ls.add_argument("--format", choices=("text", "json"), default="text")
    rt = actions.add_parser("retry", help="ingest failed jobs again from Rekognition")
    rt.add_argument("--state", metavar="S", default="failed", help="only failed (the default)")
    rt.add_argument("--since", metavar="ISO8601", help="failed at or after this time")
    rt.add_argument("--job", dest="job_ids", metavar="JOB_ID", nargs="+", action="extend",
                    help="only these jobs")
    rt.add_argument("--include-rekognition-failed", action="store_true",
                    help="also jobs Rekognition itself reported FAILED (normally skipped: retrying cannot help)")
    rt.add_argument("--dry-run", action="store_true", help="list what would be retried and stop")
    rt.add_argument("--limit", type=_positive, default=1000, help="at most this many jobs (1000)")
    tombstones.add_restore_flag(rt, "with --job, retry the named jobs")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def _cmd_migrate(settings: Settings, console: Console) -> int:
    from worker.db.migrate import upgrade_to_head

    # Which revisions ran is what an operator wants from this command: alembic says so at INFO.
    logging.getLogger("alembic").setLevel(logging.getLogger("worker").getEffectiveLevel())
    upgrade_to_head(settings)
    console.print(f"database at head: {redact_url(settings.asyncpg_dsn)}")
    return 0


def _cmd_backfill(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    from worker.backfill import refs_from_args, run_backfill, summary_table

    if not args.job_ids and not args.from_file:
        raise InvalidInput("backfill needs JOB_ID arguments (with --api) or --from-file PATH")
    found = refs_from_args(args.api, args.job_ids, args.from_file)
    refs, unresolved, invalid = found.refs, found.unresolved, found.errors
    for o in invalid:
        _job_error(o.job_id, o.reason or "invalid", quoted=True)
    settings.asyncpg_dsn  # noqa: B018 - fail early with a clear message when DATABASE_URL is unset
    if args.restore_deleted:
        restored = _arun(tombstones.run_restore(settings, [*(r.job_id for r in refs), *unresolved]))
        log.info("deleted jobs restored for ingest", jobs=restored)
    outcomes = (_arun(run_backfill(settings, refs, console=_err_console(), unresolved=unresolved))
                if refs or unresolved else [])
    for o in outcomes:
        if not o.ok:
            _job_error(o.job_id, f"{o.outcome}: {o.reason}")
    console.print(summary_table([*outcomes, *invalid]))
    return 0 if outcomes and not invalid and all(o.outcome == "ingested" for o in outcomes) else 1


def _cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from worker.service import run_service

    return _arun(run_service(settings, exit_when_idle=args.exit_when_idle))


def _cmd_demo(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    from worker.local.demo import run_demo, stop_demo

    if args.stop:
        return stop_demo(console)
    return run_demo(settings, console)


def _cmd_reprocess(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    from worker.backfill import summary_table
    from worker.reprocess import run_reprocess

    if bool(args.all) == bool(args.job_ids):
        raise InvalidInput("reprocess needs JOB_ID arguments or --all (not both)")
    outcomes = _arun(run_reprocess(settings, None if args.all else list(args.job_ids)))
    for o in outcomes:
        if o.outcome != "ingested":
            _job_error(o.job_id, o.reason or o.outcome)
    console.print(summary_table(outcomes))
    return 0 if outcomes and all(o.outcome == "ingested" for o in outcomes) else 1


def _cmd_report(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    from worker.report import run_report

    return _arun(run_report(settings, args.job_id, fmt=args.format, chart=args.chart, console=console))


def _cmd_dlq(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    import asyncpg
    from botocore.exceptions import BotoCoreError, ClientError

    from worker import dlq
    from worker.messages import validate_job_id

    try:
        if args.dlq_command == "list":
            return asyncio.run(dlq.run_list(settings, fmt=args.format, limit=args.limit, console=console))
        job_id = validate_job_id(args.job) if args.job is not None else None
        return asyncio.run(dlq.run_redrive(settings, job_id=job_id, dry_run=args.dry_run,
                                           use_move_task=not args.no_move_task, console=console))
    except (ClientError, BotoCoreError) as exc:
        print(f"error: SQS: {redact(str(exc))[:500]}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"error: database: {redact(str(exc))[:500]}", file=sys.stderr)
        return 1


def _cmd_jobs(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    import asyncpg

    from worker import jobs

    try:
        if args.jobs_command == "list":
            return asyncio.run(jobs.run_list(settings, state=args.state, since=args.since, limit=args.limit,
                                             fmt=args.format, console=console))
        if args.restore_deleted:
            if not args.job_ids:
                raise InvalidInput(f"{tombstones.RESTORE_FLAG} needs --job JOB_ID: deleted jobs are restored by name")
            restored = asyncio.run(tombstones.run_restore(settings, args.job_ids, for_retry=True))
            log.info("deleted jobs restored for a retry", jobs=restored)
        return asyncio.run(jobs.run_retry(settings, state=args.state, since=args.since, job_ids=args.job_ids,
                                          include_rekognition_failed=args.include_rekognition_failed,
                                          dry_run=args.dry_run, limit=args.limit, console=console))
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"error: database: {redact(str(exc))[:500]}", file=sys.stderr)
        return 1


def _cmd_delete(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from worker.lifecycle import JOB_TABLES, run_delete
    from worker.messages import validate_job_id

    if bool(args.job_ids) == (args.ingested_before is not None):
        raise InvalidInput("delete needs JOB_ID arguments or --ingested-before ISO8601 (not both)")
    job_ids = [validate_job_id(j) for j in args.job_ids]
    before = _instant(args.ingested_before) if args.ingested_before is not None else None
    removals = _arun(run_delete(settings, job_ids, ingested_before=before, dry_run=args.dry_run))
    table = Table(title="would delete (dry run)" if args.dry_run else "deleted")
    table.add_column("job", no_wrap=True)
    for name in ("api", "state", "outcome", *JOB_TABLES):
        table.add_column(name, justify="left" if name in ("api", "state", "outcome") else "right")
    for r in removals:
        table.add_row(r.job_id, r.api or "", r.state or "", r.outcome, *(str(r.rows.get(t, 0)) for t in JOB_TABLES))
    console.print(table)
    console.print(f"{sum(r.outcome in ('deleted', 'would delete') for r in removals)} job(s), "
                  f"{sum(r.total for r in removals)} row(s)" + (" would be deleted" if args.dry_run else " deleted"))
    for r in removals:
        if r.outcome in ("missing", "reingested"):
            _job_error(r.job_id, "no such job" if r.outcome == "missing" else "re-ingested while being deleted")
    return 0 if all(r.outcome in ("deleted", "would delete") for r in removals) else 1


def _instant(text: str) -> datetime:
    """ISO 8601 (``2026-11-30``, ``2026-11-30T12:00:00Z``, with an offset); no zone means UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(f"{text!r} is not an ISO 8601 date or time (e.g. 2026-11-30T12:00:00Z)") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _cmd_submit(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    from worker.messages import parse_api
    from worker.submissions import StartOptions
    from worker.submit import SubmitError, print_submit_result, run_submit

    if not args.sources and args.from_file is None:
        raise InvalidInput("submit needs s3://bucket/prefix arguments or --from-file PATH")
    options = StartOptions.create(parse_api(args.api), collection_id=args.collection_id,
                                  face_match_threshold=args.face_match_threshold,
                                  face_attributes=args.face_attributes, job_tag=args.job_tag)
    settings.asyncpg_dsn  # noqa: B018 - DATABASE_URL checked before S3 is listed
    try:
        result = _arun(run_submit(settings, options, list(args.sources), args.from_file, force=args.force))
    except SubmitError as exc:
        _command_error(exc)
        return 1
    print_submit_result(result, console, settings)
    return 0


def _cmd_submissions(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    from worker.submit import run_submissions

    return _arun(run_submissions(settings, args.state, limit=args.limit, fmt=args.format, console=console))


def _cmd_erase(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    from worker.lifecycle import ERASE_COUNTS, run_erase

    kind, value = next((k, getattr(args, k)) for k in ("external_image_id", "face_id", "user_id")
                       if getattr(args, k) is not None)
    result = _arun(run_erase(settings, kind, value, dry_run=args.dry_run))  # type: ignore[arg-type]
    verb = "would remove (dry run)" if args.dry_run else "removed"
    console.print(f"erase --{kind.replace('_', '-')}: {verb}: "
                  + ", ".join(f"{name} {result.counts[name]}" for name in ERASE_COUNTS)
                  + ("" if result.audit_id is None else f"; audit row {result.audit_id}"))
    return 0


def _delivering(settings: Settings, args: argparse.Namespace, code: int) -> int:
    """A command that changed data: the events its changes wrote go out now if they can (the rest wait for `run`)."""
    deliver_after_command(settings, args)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tune_gc()
    # Off a terminal (CI logs, pipes) rich would wrap tables at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    # Before the settings are read, so that an error in them is reported in the format asked for.
    configure_logging("info", log_format_from_env())
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_level, settings.log_format)
        if args.command == "migrate":
            return _cmd_migrate(settings, console)
        if args.command == "backfill":
            return _delivering(settings, args, _cmd_backfill(settings, args, console))
        if args.command == "run":
            return _cmd_run(settings, args)
        if args.command == "demo":
            return _cmd_demo(settings, args, console)
        if args.command == "reprocess":
            return _delivering(settings, args, _cmd_reprocess(settings, args, console))
        if args.command == "delete":
            return _delivering(settings, args, _cmd_delete(settings, args, console))
        if args.command == "erase":
            return _delivering(settings, args, _cmd_erase(settings, args, console))
        if args.command == "submit":
            return _cmd_submit(settings, args, console)
        if args.command == "submissions":
            return _cmd_submissions(settings, args, console)
        if args.command in ("dlq", "jobs", "events"):
            handler = {"dlq": _cmd_dlq, "jobs": _cmd_jobs, "events": run_events_command}[args.command]
            return _delivering(settings, args, handler(settings, args, console))
        return _cmd_report(settings, args, console)
    except (ConfigError, InvalidInput) as exc:
        _command_error(exc)
        return 2
    except KeyboardInterrupt:
        return 130
