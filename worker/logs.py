"""structlog set-up: JSON lines off a terminal, coloured console on one.

Everything the process writes to stderr goes through one stdlib handler and structlog's
ProcessorFormatter: structlog's own events, records that libraries log through stdlib ``logging``
(botocore, aiohttp, asyncio, alembic, sqlalchemy), ``warnings.warn`` (captured into logging), and
exceptions nobody caught (sys.excepthook, threading.excepthook, the asyncio loop's handler). With JSON
every line is one JSON object.

Secrets never reach a log line. The last processor before rendering redacts, in every value
(nested dicts and lists included, and objects that would be rendered through their repr):
- values under secret-bearing keys (``password``, ``aws_secret_access_key``, ``dsn``, ...);
- ``scheme://user:password@`` in URLs and ``password=...`` in libpq DSNs and query strings;
- AWS secrets in ``key=value`` form and AWS access key IDs;
- the actual secret values this process holds (the database password, the AWS secret key and
  session token), wherever they appear, so an error message that quotes one is caught too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog

_SECRET_KEYS = frozenset(
    {"password", "passwd", "pgpassword", "sslpassword", "secret", "token", "aws_secret_access_key",
     "secret_access_key", "aws_session_token", "session_token", "aws_security_token", "security_token",
     "authorization", "x-amz-security-token", "database_url", "dsn"}
)
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)(?P<tail>@)")
_AWS_SECRET = re.compile(
    r"(?i)(aws_secret_access_key|aws_session_token|aws_security_token|x-amz-security-token)(\s*[=:]\s*)(\S+)"
)
# libpq key=value DSNs ("host=db password=x") and URL query parameters ("?password=x&...").
_KV_PASSWORD = re.compile(r"(?i)\b(password|sslpassword|pgpassword)(\s*=\s*)([^\s&'\"]+)")
# Long-term (AKIA) and temporary (ASIA) access key IDs: identifiers, but they name the secret's owner.
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
# Environment variables whose values are secrets. Read here, not in config.py, because they are not
# settings: botocore and libpq read them themselves, and this module only needs to know what never
# to print.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "PGPASSWORD")
# Shorter values are left to the patterns above: replacing every occurrence of a 3-letter password
# would mangle ordinary words, and real secrets are longer.
_MIN_SECRET_CHARS = 8

_secret_values: set[str] = set()
_secret_re: re.Pattern[str] | None = None


def register_secret(value: str | None) -> None:
    """Redact ``value`` from every later log line and from :func:`redact`'s output."""
    global _secret_re
    if not value or len(value) < _MIN_SECRET_CHARS or value in _secret_values:
        return
    _secret_values.add(value)
    # Longest first, so a secret that contains another is removed whole.
    _secret_re = re.compile("|".join(re.escape(v) for v in sorted(_secret_values, key=len, reverse=True)))


def register_secrets_from_env(env: Mapping[str, str] | None = None) -> None:
    """Register the secrets this process holds in its environment (see _SECRET_ENV, DATABASE_URL)."""
    env = os.environ if env is None else env
    for name in _SECRET_ENV:
        register_secret(env.get(name))
    url = env.get("DATABASE_URL")
    if url:
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            register_secret(password)
            register_secret(unquote(password))


def redact(value: str) -> str:
    """Remove passwords embedded in URLs and DSNs, AWS secrets and access key IDs, and registered secrets."""
    if _secret_re is not None:
        value = _secret_re.sub("***", value)
    value = _URL_PASSWORD.sub(r"\g<head>***\g<tail>", value)
    value = _KV_PASSWORD.sub(r"\1\2***", value)
    value = _AWS_SECRET.sub(r"\1\2***", value)
    return _ACCESS_KEY_ID.sub("***", value)


def _scrub(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if depth > 8:
        return "<nested too deep>"
    if isinstance(value, dict):
        return {k: "***" if isinstance(k, str) and k.lower() in _SECRET_KEYS else _scrub(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v, depth + 1) for v in value]
    # The JSON renderer would print repr(value) after this processor ran: redact that text now.
    return redact(repr(value))


# ProcessorFormatter's own entries (the LogRecord): never rendered, and add_logger_name reads the record.
_FORMATTER_META = frozenset({"_record", "_from_structlog"})


def _redact_processor(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, val in list(event_dict.items()):
        if key in _FORMATTER_META:
            continue
        if key.lower() in _SECRET_KEYS:
            event_dict[key] = "***"
        elif not (val is None or isinstance(val, bool | int | float)):
            event_dict[key] = _scrub(val)
    return event_dict


class RedactingFilter(logging.Filter):
    """The same redaction for records that libraries log through stdlib logging."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info:
            # Render the traceback now, redacted, so the formatter prints this text instead.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def _enrich() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]


def processors() -> list[Any]:
    """The processor chain before rendering (tests capture with exactly these)."""
    return [*_enrich(), _redact_processor]


# Libraries that log every request or connection at INFO: kept at WARNING whatever LOG_LEVEL says.
_NOISY = ("werkzeug", "aiobotocore", "botocore", "moto", "urllib3", "aiohttp.access", "sqlalchemy.engine")
_HANDLER_NAME = "worker.stderr"
_renders_json = False


def _stdlib_handler(renderer: Any) -> logging.Handler:
    """The one handler on the root logger: structlog events and foreign records alike, rendered the same."""
    formatter = structlog.stdlib.ProcessorFormatter(
        # Foreign records get the same chain as structlog's events, redaction included.
        foreign_pre_chain=[*_enrich(), structlog.stdlib.add_logger_name, _redact_processor],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    return handler


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    get_logger("worker").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return  # what threading's own hook does with SystemExit
    get_logger("worker").critical("uncaught exception in thread", thread=getattr(args.thread, "name", None),
                                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def asyncio_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's handler for errors nobody awaited (a task's exception never retrieved, a callback that raised)."""
    exc = context.get("exception")
    fields = {k: repr(v) for k, v in context.items() if k not in ("message", "exception")}
    get_logger("asyncio").error(context.get("message") or "unhandled error in the event loop",
                                exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None,
                                **fields)


def configure_logging(level: str = "info", fmt: str = "auto", *, secrets: Iterable[str] = ()) -> None:
    """Configure structlog and stdlib logging for the process; calling again replaces the set-up.

    ``fmt`` is auto, json or console. ``secrets`` are extra values never to print; the environment's
    are registered anyway.
    """
    register_secrets_from_env()
    for value in secrets:
        register_secret(value)
    use_console = sys.stderr.isatty() if fmt == "auto" else fmt == "console"
    level_no = logging.getLevelName(level.upper())
    if not isinstance(level_no, int):
        level_no = logging.INFO
    global _renders_json
    _renders_json = not use_console
    renderer: Any = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[*processors(), structlog.stdlib.add_logger_name,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(_stdlib_handler(renderer))
    # Libraries log through stdlib logging; keep them quiet unless asked. The worker's own loggers
    # (structlog's, named after the modules) follow LOG_LEVEL.
    root.setLevel(max(level_no, logging.WARNING))
    logging.getLogger("worker").setLevel(level_no)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(level_no, logging.WARNING))
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def renders_json() -> bool:
    """True when stderr carries JSON lines only: commands then report errors as log events, not text."""
    return _renders_json


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
