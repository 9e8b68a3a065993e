"""`events list` and `events replay`, and the delivery that follows a command that changed data.

Exit codes (README "Commands", docs/events.md): 0 success; 1 the database unreachable, nothing matched a
replay, or replayed events not delivered yet (they stay pending: `run` delivers them); 2 bad arguments or
settings (a replay with no destination configured).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from worker.config import Settings
from worker.errors import ConfigError, InvalidInput
from worker.events import EVENT_TYPES
from worker.logs import get_logger, redact, renders_json

log = get_logger(__name__)

# Commands whose changes write events (through the triggers), and so try to deliver them before exiting.
CHANGES_DATA = ("backfill", "reprocess", "delete", "erase", "jobs")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `events` command group."""
    ev = sub.add_parser("events", help="job events in the outbox: list them, deliver them again")
    actions = ev.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="events, newest first, with whether and when each was delivered")
    ls.add_argument("--pending", action="store_true", help="only events not delivered yet")
    _filters(ls, since_required=False)
    ls.add_argument("--limit", type=int, default=100, help="at most this many events (100)")
    ls.add_argument("--format", choices=("text", "json"), default="text",
                    help="json: one object per line, the event document under 'event'")
    rp = actions.add_parser("replay", help="deliver again every event since a time (the same event_ids)")
    _filters(rp, since_required=True)
    rp.add_argument("--dry-run", action="store_true", help="count the events that would be delivered again")


def _filters(p: argparse.ArgumentParser, *, since_required: bool) -> None:
    p.add_argument("--since", metavar="ISO8601", required=since_required,
                   help="events that occurred at or after this time (UTC unless a zone is given)")
    p.add_argument("--job", metavar="JOB_ID", help="only this job's events")
    p.add_argument("--type", metavar="TYPE", choices=EVENT_TYPES, help="only this type: " + ", ".join(EVENT_TYPES))


def parse_instant(text: str | None) -> datetime | None:
    """ISO 8601 (``2026-11-30``, ``2026-11-30T12:00:00Z``, with an offset); no zone means UTC."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(f"--since {text!r} is not an ISO 8601 date or time (e.g. 2026-11-30T12:00:00Z)") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def run_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """`events list` / `events replay`: database trouble ends in one line and exit code 1."""
    import asyncpg

    if args.job is not None:
        from worker.messages import validate_job_id

        validate_job_id(args.job)
    since = parse_instant(args.since)
    try:
        if args.events_command == "list":
            if args.limit < 1:
                raise InvalidInput(f"--limit must be >= 1 (got {args.limit})")
            return asyncio.run(_list(settings, args, since, console))
        assert since is not None
        return asyncio.run(_replay(settings, args, since, console))
    except (OSError, asyncpg.PostgresError) as exc:
        _error(f"database: {redact(str(exc))[:500]}")
        return 1


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items() if k != "payload"}
    out["event"] = orjson.loads(row["payload"])
    return out


async def _list(settings: Settings, args: argparse.Namespace, since: datetime | None, console: Console) -> int:
    from worker.db.engine import connect
    from worker.events import outbox

    conn = await connect(settings.asyncpg_dsn)
    try:
        rows = await outbox.list_events(conn, pending_only=args.pending, since=since, job_id=args.job,
                                        event_type=args.type, limit=args.limit)
    finally:
        await conn.close()
    if args.format == "json":
        for row in rows:
            sys.stdout.write(orjson.dumps(_plain(row)).decode() + "\n")
        return 0
    table = Table(title=f"{len(rows)} event(s), newest first" + (" (limit reached)" if len(rows) >= args.limit else ""))
    for col in ("seq", "event_id", "type", "job", "occurred", "delivered", "attempts", "last error"):
        table.add_column(col, justify="right" if col in ("seq", "attempts") else "left", overflow="fold")

    def when(value: datetime | None) -> str:
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"

    for r in rows:
        table.add_row(str(r["seq"]), r["event_id"], r["type"], r["job_id"] or "-", when(r["occurred_at"]),
                      when(r["published_at"]) if r["published_at"] else "[yellow]pending[/]", str(r["attempts"]),
                      escape(redact(r["last_error"] or ""))[:160] or "-")
    console.print(table)
    return 0


async def _replay(settings: Settings, args: argparse.Namespace, since: datetime, console: Console) -> int:
    from worker.db.engine import connect
    from worker.events import outbox
    from worker.events.publisher import flush

    if not args.dry_run and not (settings.events_sns_topic_arn or settings.events_event_bus_name):
        raise ConfigError("events replay needs EVENTS_SNS_TOPIC_ARN or EVENTS_EVENT_BUS_NAME: there is nowhere "
                          "to deliver the events to")
    conn = await connect(settings.asyncpg_dsn)
    try:
        if args.dry_run:
            rows = await outbox.list_events(conn, since=since, job_id=args.job, event_type=args.type,
                                            limit=2**31 - 1)
            console.print(f"{len(rows)} event(s) since {since.isoformat()} would be delivered again")
            return 0 if rows else _nothing(since)
        replayed = await outbox.replay(conn, since, job_id=args.job, event_type=args.type)
    finally:
        await conn.close()
    if not replayed:
        return _nothing(since)
    done = await flush(settings)
    pending = done.pending if done is not None else None
    console.print(f"{replayed} event(s) since {since.isoformat()} queued again: {done.delivered if done else 0} "
                  f"delivered now, {pending if pending is not None else '?'} pending in the outbox")
    if pending:
        _error(f"{pending} event(s) not delivered yet; `run` delivers them (events list --pending)")
        return 1
    return 0


def _nothing(since: datetime) -> int:
    _error(f"no events since {since.isoformat()} (delivered events are kept EVENTS_RETENTION_DAYS)")
    return 1


def _error(text: str) -> None:
    """One line on stderr: a JSON object under LOG_FORMAT=json, else ``error: ...``."""
    if renders_json():
        log.error("command failed", error=text)
    else:
        print(f"error: {text}", file=sys.stderr)


def deliver_after_command(settings: Settings, args: argparse.Namespace) -> None:
    """After a command that changed data: deliver the events it wrote (and any other pending ones) for at most
    EVENTS_FLUSH_TIMEOUT_S. Never changes the command's outcome: what is not delivered stays for `run`."""
    if args.command not in CHANGES_DATA or getattr(args, "dry_run", False):
        return
    if args.command == "jobs" and args.jobs_command != "retry":
        return
    if not (settings.events_sns_topic_arn or settings.events_event_bus_name):
        return
    from worker.events.publisher import flush

    try:
        done = asyncio.run(flush(settings))
    except Exception as exc:
        log.warning("job events not delivered now; `run` delivers them", error=f"{type(exc).__name__}: {exc}"[:300])
        return
    if done is not None and done.pending:
        log.warning("job events not delivered yet; `run` delivers them", pending=done.pending)
