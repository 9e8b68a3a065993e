"""Command line of the Rekognition Video ingestion worker, and its one error boundary.

The commands live in worker/commands/, one module per command or group (docs/cli.md lists them). They
return an exit code or raise; :func:`main` alone turns what they raise into exactly one line on stderr (one
JSON object under LOG_FORMAT=json) and a code from one table (docs/cli.md, "Exit codes"): the database or
AWS unreachable or refusing, missing or invalid settings, bad arguments, something that does not exist. A
traceback is printed only for an error nobody expected (a bug), after that one line. Output into a pipe
whose reader went away (``| head``) ends quietly, as Unix tools do.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from rich.console import Console

import worker
from worker import __version__
from worker.commands import MODULES
from worker.commands.base import (
    EXIT_BUG,
    EXIT_CLOSED_PIPE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Context,
    arun,
    log,
)
from worker.commands.failure import Failure, chain, classify
from worker.config import Settings, log_format_from_env
from worker.errors import InvalidInput
from worker.events.commands import deliver_after_command
from worker.logs import configure_logging, redact, renders_json
from worker.pagecodec import tune_gc

__all__ = ["main", "tune_gc"]
_arun = arun  # the name tests and older callers know


def prog_name(argv0: str | None = None) -> str:
    """What the user typed to run this: the console script's name, or ``python -m worker``."""
    name = os.path.basename(argv0 if argv0 is not None else (sys.argv[0] if sys.argv else ""))
    return "python -m worker" if name in ("", "__main__.py", "-c") else name


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes go through the boundary: one line, exit 2 (argparse prints usage and exits)."""

    def error(self, message: str) -> NoReturn:
        raise InvalidInput(f"{message} (see `{self.prog} --help`)")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=f"{worker.__doc__} Exit codes and output formats: docs/cli.md.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in MODULES:
        importlib.import_module(f"worker.commands.{name}").register(sub)
    return p


class _Stdout(Console):
    """stdout's console: a reader gone away is the boundary's to handle (rich would exit 1 on its own)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(32, "stdout's reader went away")


def _stdout_console() -> Console:
    # Off a terminal (CI logs, `--format table` into a file) rich would wrap tables at 80 columns.
    return _Stdout() if sys.stdout.isatty() else _Stdout(width=160)


def _stdout_reader_gone() -> bool:
    """True when stdout is a pipe whose reading end is closed (poll reports an error on the write end)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _closed_pipe(exc: BaseException) -> bool:
    return any(isinstance(e, BrokenPipeError) for e in chain(exc)) and _stdout_reader_gone()


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered, and Python's flush at exit, go nowhere quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, ValueError, OSError):
        pass


def _say(failure: Failure) -> None:
    """The one line of an expected failure. Plain text, never rich markup: it may quote input or AWS."""
    if renders_json():
        log.error("command failed", error=failure.line, kind=failure.kind, exit_code=failure.code)
    else:
        print(f"error: {failure.line}", file=sys.stderr, flush=True)


def _say_bug(exc: BaseException) -> None:
    summary = " ".join(redact(f"{type(exc).__name__}: {exc}").split())[:500]
    if renders_json():
        log.critical("internal error (a bug): please report it with this line", error=summary, kind="bug",
                     exit_code=EXIT_BUG, exc_info=(type(exc), exc, exc.__traceback__))
        return
    print(f"error: internal error (a bug, please report it with what follows): {summary}", file=sys.stderr)
    print(redact("".join(traceback.format_exception(exc))), file=sys.stderr, end="", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script and ``python -m worker``: run one command, return its exit code."""
    prog = prog_name()
    # Before anything can fail, so that even a bad setting is reported in the format asked for.
    configure_logging("info", log_format_from_env())
    settings: Settings | None = None
    try:
        args = build_parser(prog).parse_args(argv)
        tune_gc()
        settings = Settings.from_env()
        configure_logging(settings.log_level, settings.log_format)
        code = int(args.handler(Context(args, settings, _stdout_console(), prog)))
        sys.stdout.flush()  # here, not at exit, so a closed pipe is handled like any other
        # A command that changed data delivers the job events its changes wrote, if it can (the rest wait
        # for `run`); this never changes the command's own outcome.
        deliver_after_command(settings, args)
        return code
    except SystemExit as exc:  # --help and --version (argparse swallows a closed pipe's error itself)
        if _stdout_reader_gone():
            _quiet_stdout()
            return EXIT_CLOSED_PIPE
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        if _stdout_reader_gone():
            _quiet_stdout()
        _say(Failure(EXIT_INTERRUPTED, "interrupted", "interrupted"))
        return EXIT_INTERRUPTED
    except Exception as exc:
        if _closed_pipe(exc):
            # `... | head`: the reader has what it wanted. No line, as Unix tools do.
            _quiet_stdout()
            return EXIT_CLOSED_PIPE
        dsn = None
        if settings is not None and settings.database_url:
            try:
                dsn = settings.asyncpg_dsn
            except Exception:
                dsn = None
        failure = classify(exc, dsn=dsn, prog=prog)
        if failure is None:
            _say_bug(exc)
            return EXIT_BUG
        _say(failure)
        return failure.code
