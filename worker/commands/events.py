"""`events list` and `events replay` (docs/events.md): the outbox as an operator sees it, and delivering
events again with the same ``event_id``s. Exit codes follow docs/cli.md: 3 when a replay matches nothing, 1
when replayed events are not delivered yet (they stay pending for `run`), 2 without a destination."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from worker.commands.base import (
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    Context,
    SubParsers,
    arun,
    instant,
    note,
    positive,
)
from worker.commands.output import Column, add_format_argument, emit
from worker.errors import ConfigError

COLUMNS = (
    Column("seq", "seq", priority=3, justify="right"), Column("event_id", "event_id", priority=0),
    Column("type", "type", priority=0), Column("job_id", "job", priority=1),
    Column("occurred_at", "occurred", priority=2), Column("published_at", "delivered", priority=1),
    Column("attempts", "attempts", priority=3, justify="right"),
    Column("last_error", "last error", priority=2, flexible=True),
)


def register(sub: SubParsers) -> None:
    from worker.events import EVENT_TYPES

    ev = sub.add_parser("events", help="job events in the outbox: list them, deliver them again")
    actions = ev.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="events, newest first, with whether and when each was delivered")
    ls.add_argument("--pending", action="store_true", help="only events not delivered yet")
    ls.add_argument("--limit", type=positive, default=100, help="at most this many events (100)")
    rp = actions.add_parser("replay", help="deliver again every event since a time (the same event_ids)")
    rp.add_argument("--dry-run", action="store_true", help="count the events that would be delivered again")
    for p, since_required in ((ls, False), (rp, True)):
        p.add_argument("--since", metavar="ISO8601", required=since_required,
                       help="events that occurred at or after this time (UTC unless a zone is given)")
        p.add_argument("--job", metavar="JOB_ID", help="only this job's events")
        p.add_argument("--type", metavar="TYPE", choices=EVENT_TYPES,
                       help="only this type: " + ", ".join(EVENT_TYPES))
    add_format_argument(ls)
    ls.set_defaults(handler=run_list)
    rp.set_defaults(handler=run_replay)


def _job(ctx: Context) -> str | None:
    from worker.messages import validate_job_id

    return None if ctx.args.job is None else validate_job_id(ctx.args.job)


def run_list(ctx: Context) -> int:
    from worker.db.engine import connect
    from worker.events import outbox

    args = ctx.args
    since = instant(args.since) if args.since is not None else None
    job_id = _job(ctx)

    async def load() -> list[dict[str, Any]]:
        conn = await connect(ctx.settings.asyncpg_dsn)
        try:
            return [dict(r) for r in await outbox.list_events(
                conn, pending_only=args.pending, since=since, job_id=job_id, event_type=args.type,
                limit=args.limit)]
        finally:
            await conn.close()

    rows = arun(load())
    shown = [{**r, "published_at": r["published_at"] or "pending", "last_error": r["last_error"] or ""}
             for r in rows]
    records = [{**{k: v for k, v in r.items() if k != "payload"}, "event": orjson.loads(r["payload"])}
               for r in rows]
    emit(ctx.out, args.format, shown, COLUMNS, title=f"{len(rows)} event(s), newest first", records=records,
         warnings=["limit reached: raise --limit"] if len(rows) >= args.limit else ())
    return EXIT_OK


def run_replay(ctx: Context) -> int:
    from worker.db.engine import connect
    from worker.events import outbox
    from worker.events.publisher import flush

    args, settings = ctx.args, ctx.settings
    since: datetime = instant(args.since)
    job_id = _job(ctx)
    if not args.dry_run and not (settings.events_sns_topic_arn or settings.events_event_bus_name):
        raise ConfigError("events replay needs EVENTS_SNS_TOPIC_ARN or EVENTS_EVENT_BUS_NAME: there is nowhere "
                          "to deliver the events to")

    async def queue_again() -> int:
        conn = await connect(settings.asyncpg_dsn)
        try:
            if args.dry_run:
                return len(await outbox.list_events(conn, since=since, job_id=job_id, event_type=args.type,
                                                    limit=2**31 - 1))
            return int(await outbox.replay(conn, since, job_id=job_id, event_type=args.type))
        finally:
            await conn.close()

    count = arun(queue_again())
    if not count:
        note(f"no events since {since.isoformat()} (delivered events are kept EVENTS_RETENTION_DAYS)", warning=True)
        return EXIT_NOT_FOUND
    if args.dry_run:
        ctx.out.print(f"{count} event(s) since {since.isoformat()} would be delivered again", markup=False)
        return EXIT_OK
    done = arun(flush(settings))
    pending = done.pending if done is not None else None
    ctx.out.print(f"{count} event(s) since {since.isoformat()} queued again: {done.delivered if done else 0} "
                  f"delivered now, {pending if pending is not None else '?'} pending in the outbox", markup=False)
    if pending:
        note(f"{pending} event(s) not delivered yet; `run` delivers them (events list --pending)", warning=True)
        return EXIT_FAILED
    return EXIT_OK
