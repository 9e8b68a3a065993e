"""`backfill`: ingest named jobs directly (no queue), with progress and a closing summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from worker import tombstones
from worker.commands.base import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Context,
    SubParsers,
    arun,
    check_database,
    err_console,
    job_error,
    note,
)
from worker.commands.output import Column, add_format_argument, emit
from worker.errors import InvalidInput

if TYPE_CHECKING:  # imported by the commands that run: `--help` and a typo need none of the pipeline
    from worker.ingest import JobOutcome

OUTCOME_COLUMNS = (
    Column("job_id", "job", priority=0), Column("api", "api", priority=1), Column("outcome", "status", priority=0),
    Column("pages", "pages", priority=3, justify="right"), Column("faces", "faces", priority=2, justify="right"),
    Column("persons", "persons", priority=3, justify="right"),
    Column("matches", "matches", priority=3, justify="right"),
    Column("seconds", "seconds", priority=4, justify="right", show=lambda v: f"{v:.2f}"),
    Column("reason", "reason", priority=1, flexible=True),
)
_OUTCOME_STYLES = {"outcome": lambda v: "green" if v == "ingested" else "red"}


def register(sub: SubParsers) -> None:
    b = sub.add_parser("backfill", help="ingest named jobs directly (no queue)")
    b.add_argument("--api", help="GetFaceDetection, GetFaceSearch, StartFace*, FACE_DETECTION, FACE_SEARCH")
    b.add_argument("--from-file", metavar="PATH", help="lines of JOB_ID or JOB_ID,API ('-' for stdin)")
    b.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    tombstones.add_restore_flag(b, "ingest the named jobs")
    add_format_argument(b)
    b.set_defaults(handler=run)


def print_outcomes(ctx: Context, outcomes: Sequence[JobOutcome], *, title: str) -> None:
    """The closing summary of backfill, reprocess and jobs retry: one row per job."""
    rows = [{"job_id": o.job_id, "api": o.api, "outcome": o.outcome, "pages": o.pages, "faces": o.faces,
             "persons": o.persons, "matches": o.matches, "seconds": o.seconds, "reason": o.reason or ""}
            for o in outcomes]
    emit(ctx.out, ctx.args.format, rows, OUTCOME_COLUMNS, title=title, styles=_OUTCOME_STYLES)


def run(ctx: Context) -> int:
    from worker.backfill import refs_from_args, run_backfill

    args, settings = ctx.args, ctx.settings
    if not args.job_ids and not args.from_file:
        raise InvalidInput("backfill needs JOB_ID arguments (with --api) or --from-file PATH")
    found = refs_from_args(args.api, args.job_ids, args.from_file)
    refs, unresolved, invalid = found.refs, found.unresolved, found.errors
    for o in invalid:
        job_error(o.job_id, o.reason or "invalid", quoted=True)
    if refs or unresolved:
        check_database(settings)
        if args.restore_deleted:
            restored = arun(tombstones.run_restore(settings, [*(r.job_id for r in refs), *unresolved]))
            note("deleted jobs restored for ingest", jobs=restored)
    outcomes = (arun(run_backfill(settings, refs, console=err_console(), unresolved=unresolved))
                if refs or unresolved else [])
    for o in outcomes:
        if not o.ok:
            job_error(o.job_id, f"{o.outcome}: {o.reason}")
    print_outcomes(ctx, [*outcomes, *invalid], title="backfill summary")
    if invalid and not outcomes:
        return EXIT_USAGE  # nothing but invalid JobIds: the command line is what to fix
    return EXIT_OK if outcomes and not invalid and all(o.outcome == "ingested" for o in outcomes) else EXIT_FAILED
