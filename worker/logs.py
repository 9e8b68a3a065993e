"""structlog set-up: JSON lines off a terminal, coloured console on one.

Secrets never reach a log line: a processor redacts known secret-bearing keys and any
``scheme://user:password@`` in string values.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = frozenset(
    {"password", "aws_secret_access_key", "secret_access_key", "aws_session_token", "session_token",
     "authorization", "x-amz-security-token", "database_url", "dsn"}
)
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)(?P<tail>@)")
_AWS_SECRET = re.compile(r"(?i)(aws_secret_access_key|aws_session_token|x-amz-security-token)(\s*[=:]\s*)(\S+)")


def redact(value: str) -> str:
    """Remove passwords embedded in URLs and AWS secrets in key=value form."""
    value = _URL_PASSWORD.sub(r"\g<head>***\g<tail>", value)
    return _AWS_SECRET.sub(r"\1\2***", value)


def _redact_processor(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, val in list(event_dict.items()):
        if key.lower() in _SECRET_KEYS:
            event_dict[key] = "***"
        elif isinstance(val, str):
            event_dict[key] = redact(val)
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog once per process. ``fmt`` is auto, json or console."""
    use_console = sys.stderr.isatty() if fmt == "auto" else fmt == "console"
    level_no = logging.getLevelName(level.upper())
    if not isinstance(level_no, int):
        level_no = logging.INFO
    renderer: Any = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries log through stdlib logging; keep them quiet unless asked.
    logging.basicConfig(level=max(level_no, logging.WARNING), stream=sys.stderr)
    for noisy in ("werkzeug", "aiobotocore", "botocore", "moto", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
