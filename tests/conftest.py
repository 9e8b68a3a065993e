"""Shared fixtures: a real PostgreSQL (embedded unless DATABASE_URL is set), a fresh migrated
database per test, the Rekognition emulator over HTTP, and no way to reach a real AWS account."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from hypothesis import settings as hypothesis_settings

from worker.config import Settings, normalize_database_url
from worker.db.schema import SEARCH_PATH

# `make test` must give the same verdict on every run, so its property tests draw from a fixed seed
# (Hypothesis's advice for CI). `make fuzz` (HYPOTHESIS_PROFILE=explore) draws fresh examples each run;
# a failure it finds prints the seed and a blob to replay it with.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis_settings.register_profile("explore", derandomize=False, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Captured before the AWS/env scrub below; DATABASE_URL points the suite at another server.
_EXTERNAL_DB = os.environ.get("DATABASE_URL")
# `make test-citus`: each test process starts a coordinator and two workers from the installed Citus
# (worker/local/citus.py; CITUS_PG_BIN names PostgreSQL's bin directory) and every test database is a
# clone of a migrated, distributed template on every node.
_CITUS = os.environ.get("TEST_CITUS") == "1"
_CITUS_PG_BIN = os.environ.get("CITUS_PG_BIN", "/usr/lib/postgresql/15/bin")


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_") or name in ("DATABASE_URL", "QUEUE_URL"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


async def create_database(admin: asyncpg.Connection, name: str, template: str | None = None) -> None:
    """CREATE DATABASE (cloned from ``template``), where plain connections resolve the worker's tables.

    The worker sets its search_path on every connection it opens; the tests' own connections (and psql)
    get it from the database. CREATE DATABASE ... TEMPLATE does not copy per-database settings, so
    every database a test creates comes through here.
    """
    await admin.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    await admin.execute(f'ALTER DATABASE "{name}" SET search_path = {SEARCH_PATH}')
    workers = os.environ.get(_CITUS_WORKERS_ENV)
    if template is not None and workers:
        # Under `make test-citus` a clone of the distributed template needs the template's shards: its
        # clone on every worker too (the coordinator's node list names them by port, the database by name).
        await asyncio.gather(*(_clone(url, name, template) for url in workers.split()))


# The admin URLs of this test process's Citus workers under `make test-citus`, set by the citus_cluster
# fixture. An environment variable, not a global: test modules import this file again as tests.conftest.
_CITUS_WORKERS_ENV = "TEST_CITUS_WORKER_URLS"


async def _clone(admin_url: str, name: str, template: str) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        # A test that drops its database on the coordinator alone and creates it again leaves a worker's copy.
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        await admin.execute(f'ALTER DATABASE "{name}" SET search_path = {SEARCH_PATH}')
    finally:
        await admin.close()


def with_database(url: str, name: str) -> str:
    parts = urlsplit(normalize_database_url(url))
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def citus_cluster() -> Iterator[Any]:
    """The Citus cluster of `make test-citus` (None in the ordinary suite)."""
    if not _CITUS:
        yield None
        return
    from worker.local.citus import start_cluster

    cluster = start_cluster(bin_dir=Path(_CITUS_PG_BIN))
    os.environ[_CITUS_WORKERS_ENV] = " ".join(node.url() for node in cluster.workers)
    try:
        yield cluster
    finally:
        del os.environ[_CITUS_WORKERS_ENV]
        cluster.stop()


async def _clone_on_every_node(cluster: Any, name: str, template: str) -> None:
    """A Citus test database: the template cloned on each worker and on the coordinator. The clones hold the
    same shards and metadata as the template, so they form a cluster of their own."""
    await asyncio.gather(*(_clone(node.url(), name, template) for node in cluster.nodes))


async def _freeze_template(cluster: Any, name: str) -> None:
    """Close the template to connections on every node (Citus keeps a maintenance daemon connected to each
    database with the extension, and CREATE DATABASE ... TEMPLATE needs the template to itself)."""
    for node in cluster.nodes:
        admin = await asyncpg.connect(node.url())
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        finally:
            await admin.close()


async def _drop_on_every_node(cluster: Any, name: str) -> None:
    # Closed to connections first: Citus restarts a database's maintenance daemon when a session starts there.
    async def drop(node: Any) -> None:
        admin = await asyncpg.connect(node.url())
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            for attempt in range(5):
                try:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    return
                except asyncpg.ObjectInUseError:
                    if attempt == 4:
                        raise
                    await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                                        name)
        finally:
            await admin.close()

    await asyncio.gather(*(drop(node) for node in cluster.nodes))


@pytest.fixture(scope="session")
def pg_server_url(citus_cluster: Any) -> Iterator[str]:
    if citus_cluster is not None:
        yield citus_cluster.url()
        return
    if _EXTERNAL_DB:
        yield normalize_database_url(_EXTERNAL_DB)
        return
    from worker.local.pg import start_embedded_postgres

    tmp = Path(tempfile.mkdtemp(prefix="worker-tests-pg-"))
    server, url = start_embedded_postgres(tmp / "pgdata")
    try:
        yield url
    finally:
        server.cleanup_mode = "delete"
        server.cleanup()


@pytest.fixture(scope="session")
def template_db(pg_server_url: str, citus_cluster: Any) -> str:
    """A migrated database that every test database is cloned from (on Citus: on every node, distributed)."""
    from worker.db.migrate import upgrade_to_head
    from worker.local.citus import create_citus_database

    name = f"worker_template_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        if citus_cluster is not None:
            await create_citus_database(citus_cluster, name)
        conn = await asyncpg.connect(pg_server_url)
        try:
            if citus_cluster is None:
                await create_database(conn, name)
            else:
                await conn.execute(f'ALTER DATABASE "{name}" SET search_path = {SEARCH_PATH}')
        finally:
            await conn.close()

    asyncio.run(create())
    upgrade_to_head(Settings(database_url=with_database(pg_server_url, name)))
    if citus_cluster is not None:
        asyncio.run(_freeze_template(citus_cluster, name))
    return name


@pytest.fixture
async def db_url(pg_server_url: str, template_db: str, citus_cluster: Any) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    if citus_cluster is not None:
        await _clone_on_every_node(citus_cluster, name, template_db)
        yield with_database(pg_server_url, name)
        await _drop_on_every_node(citus_cluster, name)
        return
    conn = await asyncpg.connect(pg_server_url)
    try:
        await create_database(conn, name, template_db)
    finally:
        await conn.close()
    yield with_database(pg_server_url, name)
    conn = await asyncpg.connect(pg_server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def settings(db_url: str) -> Settings:
    # Pages decode inline here (DECODE_PROCESSES=0) to spare a process start per test; the pool
    # path runs in the CLI tests, the benchmark smoke run and tests/test_pagecodec.py.
    return Settings(database_url=db_url, rekognition_tps=1000.0, max_concurrent_jobs=4, retry_base_s=0.01,
                    retry_cap_s=0.05, max_call_attempts=4, log_format="json", decode_processes=0)


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(db_url)
    yield conn
    await conn.close()


@pytest.fixture(scope="session")
def emulator() -> Iterator[object]:
    from worker.local.emulator import EmulatorConfig, EmulatorThread

    with EmulatorThread(EmulatorConfig()) as emu:
        yield emu


@pytest.fixture
def rekognition_endpoint(emulator: object, monkeypatch: pytest.MonkeyPatch) -> object:
    """Point botocore's own endpoint resolution at the emulator, as a user would."""
    emulator.configure(quota_tps=None, fault_rate=0.0, latency_s=0.0)  # type: ignore[attr-defined]
    monkeypatch.setenv("AWS_ENDPOINT_URL_REKOGNITION", emulator.url)  # type: ignore[attr-defined]
    return emulator


@pytest.fixture
def emu(rekognition_endpoint: Any) -> Iterator[Any]:
    """The session's emulator with fresh call statistics; whatever a test configures is undone after it."""
    rekognition_endpoint.reset_stats()
    try:
        yield rekognition_endpoint
    finally:
        rekognition_endpoint.configure(quota_tps=None, fault_rate=0.0, latency_s=0.0, access_denied=False)


@pytest.fixture
async def queues(sqs: Any) -> Any:
    """A fresh SQS queue (visibility 2 s) with a dead-letter queue after two receives."""
    from test_service_support import make_queues

    return await make_queues(sqs, visibility_timeout_s=2, max_receive_count=2)


def unique_job_id(prefix: str = "job") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """moto's SQS in server mode (real HTTP), one per test module so queue names never collide."""
    from worker.local.sqs import start_moto_server

    server, url = start_moto_server()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
async def sqs(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[object]:
    """An SQS client resolved as the worker resolves it: AWS_ENDPOINT_URL_SQS from the environment."""
    from aiobotocore.session import get_session

    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", moto_url)
    async with get_session().create_client("sqs", region_name="us-east-1") as client:
        yield client
