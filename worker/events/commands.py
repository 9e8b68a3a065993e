"""The delivery that follows a command that changed data: the events its changes wrote go out now if they
can, for at most EVENTS_FLUSH_TIMEOUT_S; the rest wait for `run`. (`events list|replay` live in
worker/commands/events.py.)"""

from __future__ import annotations

import argparse
import asyncio

from worker.config import Settings
from worker.logs import get_logger

log = get_logger(__name__)

# Commands whose changes write events (through the triggers), and so try to deliver them before exiting.
CHANGES_DATA = ("backfill", "reprocess", "delete", "erase", "jobs")


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
