"""What every command gets (the parsed arguments, the settings, stdout's console) and small shared helpers."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from rich.console import Console

from worker.config import Settings
from worker.errors import InvalidInput
from worker.logs import asyncio_exception_handler, get_logger, redact, renders_json

log = get_logger("worker.cli")
T = TypeVar("T")
SubParsers = argparse._SubParsersAction

# The exit codes (docs/cli.md, "Exit codes"): the only values a command returns.
EXIT_OK = 0
EXIT_FAILED = 1  # the command ran, and some or all of what it was asked to do failed
EXIT_USAGE = 2  # bad arguments, missing or invalid settings
EXIT_NOT_FOUND = 3  # the job, submission, message or identity named does not exist
EXIT_UNAVAILABLE = 4  # the database or AWS cannot be reached or refuses: retry later
EXIT_BUG = 70  # an error nobody expected (sysexits' EX_SOFTWARE): a bug to report
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_CLOSED_PIPE = 141  # stdout's reader went away (128 + SIGPIPE, what a shell reports for Unix tools)


@dataclass(slots=True)
class Context:
    """One command run: its arguments, the settings, the console on stdout and the program's name."""

    args: argparse.Namespace
    settings: Settings
    out: Console
    prog: str


Handler = Callable[[Context], int]


def arun(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, with the loop's unhandled errors logged like everything else."""
    async def main() -> T:
        asyncio.get_running_loop().set_exception_handler(asyncio_exception_handler)
        return await coro

    return asyncio.run(main())


def err_console() -> Console:
    """stderr, for progress bars; with JSON logs it never draws (stderr then carries JSON lines only)."""
    return Console(stderr=True, force_terminal=False) if renders_json() else Console(stderr=True)


def job_error(job_id: str, text: str, *, quoted: bool = False) -> None:
    """One line about a job that did not succeed: a log event with JSON logs, plain text otherwise."""
    if renders_json():
        log.error("job error", job_id=job_id, error=text)
    else:
        shown = repr(job_id) if quoted else job_id
        print(" ".join(redact(f"error: job {shown}: {text}").split()), file=sys.stderr)


def note(text: str, *, warning: bool = False, **fields: Any) -> None:
    """A remark about the output (a summary, a limit reached) that is not data: to stderr, so pipes carry
    records only, and as a log event under LOG_FORMAT=json."""
    (log.warning if warning else log.info)(text, **fields)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def instant(text: str) -> datetime:
    """ISO 8601 (``2026-11-30``, ``2026-11-30T12:00:00Z``, with an offset); no zone means UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(f"{text!r} is not an ISO 8601 date or time (e.g. 2026-11-30T12:00:00Z)") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# A database that does not answer a connect within this long is reported unreachable (asyncpg waits 60 s).
CONNECT_CHECK_TIMEOUT_S = 15.0


def check_database(settings: Settings) -> None:
    """Connect once and disconnect, so that a command which would otherwise meet an unreachable database only
    halfway (each job of a backfill handed back as transient, S3 listed for nothing) stops first, with the
    boundary's one line naming the database."""
    from worker.db.engine import connect

    async def probe() -> None:
        conn = await connect(settings.asyncpg_dsn, timeout=CONNECT_CHECK_TIMEOUT_S)
        await conn.close()

    arun(probe())
