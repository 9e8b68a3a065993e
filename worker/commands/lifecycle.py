"""`delete` (jobs with every row and raw page) and `erase` (one identity everywhere, audited by keyed hash)."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from worker.commands.base import (
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    Context,
    SubParsers,
    arun,
    check_database,
    instant,
    job_error,
)
from worker.commands.output import Column, add_format_argument, emit
from worker.errors import InvalidInput, NotFound

# Given without a value (or as "-"): the identifier is read from --from-file, else from stdin.
_READ = "-"
_KINDS = ("external_image_id", "face_id", "user_id")


def register(sub: SubParsers) -> None:
    dl = sub.add_parser("delete", help="remove jobs with every row and raw page (one job per short transaction)")
    dl.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    dl.add_argument("--ingested-before", metavar="ISO8601",
                    help="every job first ingested before this time (jobs.first_ingested_at: a re-ingest or "
                         "reprocess keeps it; UTC unless a zone is given); jobs never ingested are not included")
    dl.add_argument("--dry-run", action="store_true", help="print the jobs and rows per table; delete nothing")
    add_format_argument(dl)
    dl.set_defaults(handler=run_delete)

    er = sub.add_parser(
        "erase", help="remove a collection face, its matches and the persons that matched it from every job, raw "
                      "pages included (needs ERASURE_HASH_KEY)",
        description="The identifier is best read from stdin or a file (--external-image-id - , or with "
                    "--from-file PATH), so that it stays out of ps, shell history and Job manifests. Exit 3 when "
                    "nothing matched it.")
    which = er.add_mutually_exclusive_group(required=True)
    for kind in _KINDS:
        which.add_argument(f"--{kind.replace('_', '-')}", metavar="ID", nargs="?", const=_READ,
                           help="the identifier; '-' or no value: read one line from --from-file, else stdin")
    er.add_argument("--from-file", metavar="PATH", help="read the identifier from this file (one line)")
    er.add_argument("--dry-run", action="store_true", help="print what would be removed; change nothing")
    er.set_defaults(handler=run_erase)


def _delete_columns() -> tuple[Column, ...]:
    from worker.lifecycle import JOB_TABLES

    return (Column("job_id", "job", priority=0), Column("api", "api", priority=2),
            Column("state", "state", priority=2), Column("outcome", "outcome", priority=0),
            Column("rows", "rows", priority=1, justify="right"),
            *(Column(t, t, priority=5, justify="right") for t in JOB_TABLES))


def run_delete(ctx: Context) -> int:
    from worker.lifecycle import JOB_TABLES, run_delete
    from worker.messages import validate_job_id

    args = ctx.args
    if bool(args.job_ids) == (args.ingested_before is not None):
        raise InvalidInput("delete needs JOB_ID arguments or --ingested-before ISO8601 (not both)")
    job_ids = [validate_job_id(j) for j in args.job_ids]
    before = instant(args.ingested_before) if args.ingested_before is not None else None
    removals = arun(run_delete(ctx.settings, job_ids, ingested_before=before, dry_run=args.dry_run))
    rows = [{"job_id": r.job_id, "api": r.api, "state": r.state, "outcome": r.outcome, "rows": r.total,
             **{t: r.rows.get(t, 0) for t in JOB_TABLES}} for r in removals]
    done = sum(r.outcome in ("deleted", "would delete") for r in removals)
    summary = (f"{done} job(s), {sum(r.total for r in removals)} row(s)"
               + (" would be deleted" if args.dry_run else " deleted"))
    emit(ctx.out, args.format, rows, _delete_columns(),
         title="would delete (dry run)" if args.dry_run else "deleted", notes=[summary] if removals else [])
    for r in removals:
        if r.outcome in ("missing", "reingested"):
            job_error(r.job_id, "no such job" if r.outcome == "missing" else "re-ingested while being deleted")
    if all(r.outcome in ("deleted", "would delete") for r in removals):
        return EXIT_OK
    # Nothing but jobs that do not exist: the code `report` and `reprocess` give for a job that does not exist.
    return EXIT_NOT_FOUND if all(r.outcome == "missing" for r in removals) else EXIT_FAILED


def read_identifier(value: str, from_file: str | None) -> str:
    """The identifier: the argument itself, or the one line of ``--from-file`` or stdin."""
    if value != _READ:
        if from_file is not None:
            raise InvalidInput("erase: give the identifier either as the value or with --from-file, not both")
        return value
    if from_file is not None:
        try:
            text = Path(from_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInput(f"--from-file {from_file}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise InvalidInput(f"--from-file {from_file} is not UTF-8 text") from None
        source = from_file
    elif sys.stdin is not None and sys.stdin.isatty():
        # Not echoed: the identifier stays out of the terminal's scrollback too.
        text = getpass.getpass("identifier to erase (not echoed): ")
        source = "the terminal"
    else:
        text = sys.stdin.read() if sys.stdin is not None else ""
        source = "stdin"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InvalidInput(f"erase: no identifier in {source}")
    if len(lines) > 1:
        raise InvalidInput(f"erase: {source} holds {len(lines)} lines; one erasure request names one identifier")
    return lines[0]


def run_erase(ctx: Context) -> int:
    from worker.lifecycle import ERASE_COUNTS, run_erase

    args: argparse.Namespace = ctx.args
    kind, raw = next((k, getattr(args, k)) for k in _KINDS if getattr(args, k) is not None)
    if args.from_file is not None and raw != _READ:
        raise InvalidInput("erase: give the identifier either as the value or with --from-file, not both")
    value = read_identifier(raw, args.from_file)
    check_database(ctx.settings)  # an outage is reported as one, before the key is even looked at
    result = arun(run_erase(ctx.settings, kind, value, dry_run=args.dry_run))  # type: ignore[arg-type]
    flag = f"--{kind.replace('_', '-')}"
    if not result.matched:
        # An error line and its own code: a mistyped identifier must never look like a done erasure.
        recorded = ("" if result.audit_id is None
                    else f"; audit row {result.audit_id} records the request with every count 0")
        raise NotFound(f"erase {flag}: nothing matched: no job holds this identifier (check it for typos)"
                       + ("; dry run" if args.dry_run else "") + recorded)
    verb = "would remove (dry run)" if args.dry_run else "removed"
    ctx.out.print(f"erase {flag}: {verb}: " + ", ".join(f"{name} {result.counts[name]}" for name in ERASE_COUNTS)
                  + ("" if result.audit_id is None else f"; audit row {result.audit_id}"), markup=False,
                  highlight=False)
    return EXIT_OK
