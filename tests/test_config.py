"""Settings: one object from the environment, clear errors, libpq-style URLs."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from worker.config import Settings, normalize_database_url, redact_url
from worker.errors import ConfigError


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.database_url is None and s.rekognition_tps == 5.0 and s.max_concurrent_jobs == 4
    assert s.rate_limit_scope == "process" and s.health_port == 8080 and s.archive_raw_pages


def test_reads_every_documented_variable() -> None:
    s = Settings.from_env({
        "DATABASE_URL": "postgresql+asyncpg://u:p@db:5432/x?sslmode=require", "QUEUE_URL": "https://q",
        "REKOGNITION_TPS": "2.5", "MAX_CONCURRENT_JOBS": "7", "RATE_LIMIT_SCOPE": "FLEET", "HEALTH_PORT": "9000",
        "SHUTDOWN_GRACE_S": "5", "ARCHIVE_RAW_PAGES": "false", "AWS_REGION": "eu-west-1",
    })
    assert s.rekognition_tps == 2.5 and s.max_concurrent_jobs == 7 and s.rate_limit_scope == "fleet"
    assert s.queue_url == "https://q" and s.health_port == 9000 and s.shutdown_grace_s == 5.0
    assert not s.archive_raw_pages and s.aws_region == "eu-west-1"
    assert s.asyncpg_dsn == "postgresql://u:p@db:5432/x?sslmode=require"


@pytest.mark.parametrize(("name", "value"), [
    ("REKOGNITION_TPS", "fast"), ("REKOGNITION_TPS", "0"), ("REKOGNITION_TPS", "nan"), ("MAX_CONCURRENT_JOBS", "0"),
    ("RATE_LIMIT_SCOPE", "global"), ("DATABASE_URL", "mysql://x"), ("PAGE_SIZE", "5000"),
    ("ARCHIVE_RAW_PAGES", "maybe"),
])
def test_invalid_values_are_clear_errors(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name if name != "DATABASE_URL" else "DATABASE_URL"):
        Settings.from_env({name: value})


@pytest.mark.parametrize("url", [
    "postgresql://u@h/db", "postgres://u@h/db", "postgresql+asyncpg://u@h/db", "POSTGRESQL://u@h/db",
])
def test_url_schemes(url: str) -> None:
    assert normalize_database_url(url).startswith("postgresql://")


def test_redact_url_hides_the_password() -> None:
    assert redact_url("postgresql://user:s3cret@h/db") == "postgresql://user:***@h/db"
    assert "s3cret" not in redact_url("postgresql+asyncpg://user:s3cret@h:5/db?sslmode=require")
    # An empty password hides nothing: the printed URL must stay usable (the demo prints one for psql).
    assert redact_url("postgresql://postgres:@/postgres?host=/d") == "postgresql://postgres:@/postgres?host=/d"


async def test_socket_directory_query_parameter_connects(pg_server_url: str) -> None:
    # The embedded server listens only on a Unix socket: ?host=/dir must reach it, in both schemes.
    if "?host=/" not in pg_server_url and "&host=/" not in pg_server_url:
        pytest.skip("DATABASE_URL names a TCP server; the socket-directory form needs a Unix socket")
    for url in (pg_server_url, pg_server_url.replace("postgresql://", "postgresql+asyncpg://")):
        conn = await asyncpg.connect(Settings(database_url=url).asyncpg_dsn)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()


async def _tcp_forwarder(socket_path: str) -> asyncio.Server:
    """127.0.0.1:<port> -> the server's Unix socket, so that TLS negotiation happens over TCP."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_unix_connection(socket_path)
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _uses_tls(dsn: str) -> bool:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return bool(await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
    finally:
        await conn.close()


async def test_sslmode_from_the_url_is_honoured(pg_server_url: str) -> None:
    parts = urlsplit(pg_server_url)
    query = parse_qs(parts.query)
    port = int(query.get("port", [parts.port or 5432])[0])
    socket_dir = query.get("host", [""])[0]
    server = await _tcp_forwarder(f"{socket_dir}/.s.PGSQL.{port}") if socket_dir.startswith("/") else None
    if server is not None:
        host, port = "127.0.0.1", server.sockets[0].getsockname()[1]
    else:
        host = parts.hostname or "localhost"
    userinfo = parts.netloc.rpartition("@")[0]
    base = f"postgresql://{userinfo}@{host}:{port}{parts.path or '/postgres'}"
    try:
        assert await _uses_tls(Settings(database_url=base + "?sslmode=disable").asyncpg_dsn) is False
        conn = await asyncpg.connect(Settings(database_url=base).asyncpg_dsn, timeout=5)
        try:
            offers_tls = await conn.fetchval("SHOW ssl") == "on"
        finally:
            await conn.close()
        require = Settings(database_url=base + "?sslmode=require").asyncpg_dsn
        if offers_tls:
            assert await _uses_tls(require) is True
        else:
            # The server offers no TLS: require must refuse instead of silently connecting in clear text.
            with pytest.raises((ConnectionError, OSError, asyncpg.PostgresError)):
                await asyncpg.connect(require, timeout=5)
    finally:
        if server is not None:
            server.close()
