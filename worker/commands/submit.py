"""`submit` (register videos to be analysed) and `submissions` (what was submitted, and its state)."""

from __future__ import annotations

from worker.commands.base import EXIT_OK, Context, SubParsers, arun, check_database, positive
from worker.commands.output import Column, add_format_argument, emit
from worker.errors import InvalidInput

SUBMISSION_COLUMNS = (
    Column("video", "video", priority=0), Column("state", "state", priority=0), Column("job_id", "job", priority=1),
    Column("api", "api", priority=2), Column("failure_reason", "reason", priority=1, flexible=True),
    Column("submitted_at", "submitted", priority=3), Column("started_at", "started", priority=4),
    Column("finished_at", "finished", priority=5), Column("ingested_at", "ingested", priority=4),
)
_STATE_STYLE = {"state": lambda v: {"ingested": "green", "failed": "red"}.get(v, "yellow")}


def register(sub: SubParsers) -> None:
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
    sm.set_defaults(handler=run_submit)
    ss = sub.add_parser("submissions", help="submitted videos and their state")
    ss.add_argument("--state", metavar="S", help="submitted, starting, started, finished, ingested or failed")
    ss.add_argument("--limit", type=positive, default=1000, help="at most this many rows (1000)")
    ss.add_argument("--counts", action="store_true", help="how many submissions are in each state, instead")
    add_format_argument(ss)
    ss.set_defaults(handler=run_submissions)


def run_submit(ctx: Context) -> int:
    from worker.messages import parse_api
    from worker.submissions import StartOptions
    from worker.submit import print_submit_result, run_submit

    args, settings = ctx.args, ctx.settings
    if not args.sources and args.from_file is None:
        raise InvalidInput("submit needs s3://bucket/prefix arguments or --from-file PATH")
    options = StartOptions.create(parse_api(args.api), collection_id=args.collection_id,
                                  face_match_threshold=args.face_match_threshold,
                                  face_attributes=args.face_attributes, job_tag=args.job_tag)
    check_database(settings)  # before S3 is listed
    result = arun(run_submit(settings, options, list(args.sources), args.from_file, force=args.force))
    print_submit_result(result, ctx.out, settings)
    return EXIT_OK


def run_submissions(ctx: Context) -> int:
    from worker.db.submissions import SubmissionStore
    from worker.submissions import STATES

    state, limit = ctx.args.state, ctx.args.limit
    if state is not None and state not in STATES:
        raise InvalidInput(f"--state must be one of {', '.join(STATES)} (got {state!r})")

    async def load() -> tuple[list[dict[str, object]], dict[str, int]]:
        store = SubmissionStore(ctx.settings.asyncpg_dsn)
        return [dict(r) for r in await store.list(state, limit)], await store.counts()

    rows, counts = arun(load())
    if ctx.args.counts:
        emit(ctx.out, ctx.args.format, [{"state": s, "submissions": counts[s]} for s in STATES],
             (Column("state", "state", priority=0), Column("submissions", "submissions", priority=0, justify="right")),
             title="submissions by state")
        return EXIT_OK
    for r in rows:
        r["video"] = f"s3://{r['video_bucket']}/{r['video_name']}"
    warnings = [f"showing the first {limit} submissions: raise --limit or narrow with --state"] \
        if len(rows) >= limit else []
    title = "submissions" + (f" ({state})" if state else "") + ": " + ", ".join(f"{s} {counts[s]}" for s in STATES)
    emit(ctx.out, ctx.args.format, rows, SUBMISSION_COLUMNS, title=title, warnings=warnings, styles=_STATE_STYLE)
    return EXIT_OK
