"""What went wrong, in one line and one exit code: the classification behind cli.py's error boundary.

Pure apart from reading the exception: the boundary passes what failed and the database URL it used,
and gets back the line to print (naming what failed and what to check) and the code from the table in
docs/cli.md. Errors arrive wrapped (SQLAlchemy's ``orig``, ``raise ... from``, a pool's connect), so the
whole chain is read, outermost first.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from worker.commands.base import EXIT_NOT_FOUND, EXIT_UNAVAILABLE, EXIT_USAGE
from worker.errors import ConfigError, InvalidInput, NotFound, Unavailable
from worker.logs import redact

MAX_LINE_CHARS = 600


@dataclass(frozen=True, slots=True)
class Failure:
    """One expected failure: the exit code, a kind for JSON logs, and the line for a person."""

    code: int
    kind: str
    message: str

    @property
    def line(self) -> str:
        """One line, whatever the exception's text held (newlines, secrets), never overlong."""
        text = " ".join(redact(self.message).split())
        return text if len(text) <= MAX_LINE_CHARS else text[:MAX_LINE_CHARS - 1] + "…"


@dataclass(frozen=True, slots=True)
class DatabasePlace:
    """Where DATABASE_URL points, as far as an error line may say: never the password."""

    host: str
    port: str
    dbname: str
    user: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.dbname}"


def database_place(dsn: str | None) -> DatabasePlace | None:
    """host:port/dbname and the role of a libpq-style URL (query parameters such as ``host=`` included)."""
    if not dsn:
        return None
    try:
        parts = urlsplit(dsn)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        host = parts.hostname or query.get("host") or "localhost"
        port = str(parts.port or query.get("port") or 5432)
    except ValueError:
        return None
    user = parts.username or query.get("user") or "(the login user)"
    dbname = parts.path.lstrip("/") or query.get("dbname") or user
    return DatabasePlace(host, port, dbname, user)


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: SQLAlchemy's ``orig``, ``__cause__``, ``__context__``; each once."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for inner in (getattr(e, "orig", None), e.__cause__, e.__context__):
            if isinstance(inner, BaseException):
                todo.append(inner)
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)


def classify(exc: BaseException, *, dsn: str | None = None, prog: str = "worker") -> Failure | None:
    """The failure ``exc`` stands for, or None for an error nobody expected (a bug)."""
    for e in chain(exc):
        found = _own(e) or _aws(e) or _database(e, database_place(dsn), prog)
        if found is not None:
            return found
    return None


def _own(e: BaseException) -> Failure | None:
    if isinstance(e, ConfigError):
        return Failure(EXIT_USAGE, "configuration", str(e))
    if isinstance(e, NotFound):
        return Failure(EXIT_NOT_FOUND, "not_found", str(e))
    if isinstance(e, InvalidInput):
        return Failure(EXIT_USAGE, "usage", str(e))
    if isinstance(e, Unavailable):
        return Failure(EXIT_UNAVAILABLE, "unavailable", str(e))
    return None


_NO_QUEUE_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})


def _aws(e: BaseException) -> Failure | None:
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    from worker.errors import aws_message, aws_request_id
    from worker.rekognition import CREDENTIAL_CODES

    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return Failure(EXIT_USAGE, "configuration", f"no usable AWS credentials ({e}): set AWS_PROFILE, or "
                       "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run with a role")
    if isinstance(e, NoRegionError):
        return Failure(EXIT_USAGE, "configuration", "no AWS region: set AWS_REGION")
    if isinstance(e, ClientError):
        code = str((e.response.get("Error") or {}).get("Code") or "Error")
        op = e.operation_name or "a call"
        message = aws_message(e, 300) or str(e)
        rid = aws_request_id(e)
        tail = f" (request id {rid})" if rid else ""
        if code in _NO_QUEUE_CODES:
            return Failure(EXIT_USAGE, "configuration", f"AWS {op}: no such queue ({message}): check QUEUE_URL "
                           "and AWS_REGION")
        if code in ("NoSuchBucket", "NoSuchKey"):
            return Failure(EXIT_NOT_FOUND, "not_found", f"AWS {op}: {code}: {message}{tail}")
        if code in CREDENTIAL_CODES:
            return Failure(EXIT_UNAVAILABLE, "aws_refused", f"AWS refused {op}: {code}: {message}{tail}: check the "
                           "credentials and the IAM policy (deploy/iam-policy.json)")
        return Failure(EXIT_UNAVAILABLE, "aws_error", f"AWS {op} failed: {code}: {message}{tail}: retry later")
    if isinstance(e, BotoCoreError):
        return Failure(EXIT_UNAVAILABLE, "aws_unreachable", f"AWS unreachable: {e}: check the network, AWS_REGION "
                       "and any AWS_ENDPOINT_URL* setting")
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - a dependency of aiobotocore
        return None
    if isinstance(e, aiohttp.ClientError):
        return Failure(EXIT_UNAVAILABLE, "aws_unreachable", f"AWS unreachable: {type(e).__name__}: {e}: check the "
                       "network, AWS_REGION and any AWS_ENDPOINT_URL* setting")
    return None


def _database(e: BaseException, place: DatabasePlace | None, prog: str) -> Failure | None:
    import asyncpg

    where = f"database {place}" if place is not None else "the database"
    role = repr(place.user) if place is not None else "of DATABASE_URL"
    if isinstance(e, asyncpg.InvalidCatalogNameError):
        return Failure(EXIT_UNAVAILABLE, "database", f"{where} does not exist: check the database name in "
                       "DATABASE_URL, or create it (sql/02_database.sql)")
    if isinstance(e, asyncpg.InvalidAuthorizationSpecificationError):
        return Failure(EXIT_UNAVAILABLE, "database", f"{where} refused the role {role}: {e}: check the user and "
                       "password in DATABASE_URL (or PGPASSWORD) and the server's pg_hba.conf")
    if isinstance(e, asyncpg.InsufficientPrivilegeError):
        return Failure(EXIT_UNAVAILABLE, "database", f"{where} refused a statement to the role {role}: {e}: "
                       f"check its grants (`{prog} migrate` grants rekognition_worker its DML; sql/03_grants.sql)")
    if isinstance(e, (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError, asyncpg.UndefinedFunctionError)):
        return Failure(EXIT_USAGE, "database", f"{where} has no worker schema ({e}): run `{prog} migrate` first")
    if isinstance(e, (asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
                      asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
        return Failure(EXIT_UNAVAILABLE, "database", f"{where} is not accepting connections ({e}): retry later")
    if isinstance(e, socket.gaierror):
        return Failure(EXIT_UNAVAILABLE, "database", f"{where} is unreachable: unknown host ({e.strerror or e}): "
                       "check the host in DATABASE_URL")
    if _network_error(e):
        reason = "connection refused" if isinstance(e, ConnectionRefusedError) else (
            "timed out" if isinstance(e, TimeoutError) else (getattr(e, "strerror", None) or str(e)))
        return Failure(EXIT_UNAVAILABLE, "database", f"{where} is unreachable ({reason}): check that PostgreSQL "
                       "runs there and that DATABASE_URL names the right host and port")
    return None


_NETWORK_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH,
                             errno.ETIMEDOUT, errno.EADDRNOTAVAIL, errno.ECONNABORTED, errno.EHOSTDOWN})


def _network_error(e: BaseException) -> bool:
    """A connection that failed (not a file, not stdout's closed pipe: those are not the database's)."""
    if isinstance(e, BrokenPipeError):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if not isinstance(e, OSError):
        return False
    if e.errno in _NETWORK_ERRNOS:
        return True
    # asyncio's create_connection, having tried several addresses (::1 and 127.0.0.1), raises a plain
    # OSError without an errno that lists each attempt.
    return e.errno is None and ("Connect call failed" in str(e) or "Multiple exceptions" in str(e))
