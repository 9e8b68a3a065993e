"""Security: no secret in any log line, error or output; SQL only with bound values and allow-listed
identifiers; the least-privilege database role of docs/security.md works for ingesting and refuses DDL.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import io
import logging
import re
import secrets
import string
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import structlog
from aiobotocore.session import get_session
from rich.console import Console
from structlog.testing import capture_logs

from tests.helpers import dump_job
from tests.reliability import ROOT, WorkerProcess, create_database, drop_database, worker_env
from worker import backfill as backfill_module
from worker import logs
from worker.backfill import run_backfill
from worker.config import Settings
from worker.db.migrate import upgrade_to_head
from worker.local import synth
from worker.local.sqs import create_queue_with_dlq, notification, sns_envelope
from worker.messages import JobRef
from worker.report import run_report
from worker.reprocess import run_reprocess

# --- secrets that must never be printed ------------------------------------------------------------


class Secrets:
    """Fresh, recognisable secret values for one test."""

    def __init__(self) -> None:
        self.db_password = "dbpw-" + secrets.token_urlsafe(12)
        self.access_key_id = "AKIA" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16))
        self.secret_access_key = secrets.token_urlsafe(30)[:40]
        self.session_token = "FwoGZXIvYXdzE" + secrets.token_urlsafe(180)

    @property
    def values(self) -> list[str]:
        return [self.db_password, self.access_key_id, self.secret_access_key, self.session_token]

    def aws_env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
                "AWS_SESSION_TOKEN": self.session_token}

    def leaks(self, text: str) -> list[str]:
        return [name for name, value in zip(("database password", "access key id", "secret access key",
                                             "session token"), self.values, strict=True) if value in text]


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` set (the suite's PostgreSQL trusts local connections, so any works)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, parts.query, parts.fragment))


@pytest.fixture
def secret() -> Secrets:
    return Secrets()


@pytest.fixture
def configured_logging(secret: Secrets, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's real logging set-up, with the secrets in the environment as a deployment has them."""
    for name, value in secret.aws_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://worker:{secret.db_password}@db.internal:5432/rekognition")
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level, worker_level = root.handlers[:], root.level, logging.getLogger("worker").level
    hooks = sys.excepthook, threading.excepthook
    logs.configure_logging("debug", "json")
    try:
        yield
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("worker").setLevel(worker_level)
        sys.excepthook, threading.excepthook = hooks
        logging.captureWarnings(False)


# --- redaction, unit by unit ------------------------------------------------------------------------


@pytest.mark.usefixtures("configured_logging")
def test_redaction_covers_every_shape_a_secret_can_take(secret: Secrets) -> None:
    dsn = f"postgresql://worker:{secret.db_password}@db.internal:5432/rekognition?sslmode=require"
    with capture_logs(processors=logs.processors()) as events:
        log = structlog.get_logger("test")
        log.error("connect failed", error=f"could not connect to {dsn}", dsn=dsn, database_url=dsn)
        log.warning("libpq style", conninfo=f"host=db user=worker password={secret.db_password} sslmode=require")
        log.warning("query style", url=f"postgresql://db/x?user=w&password={secret.db_password}&sslmode=require")
        log.warning("aws", detail=f"aws_secret_access_key={secret.secret_access_key}",
                    header=f"X-Amz-Security-Token: {secret.session_token}",
                    credential=f"Credential={secret.access_key_id}/20261122/us-east-1/rekognition/aws4_request")
        log.warning("nested", context={"creds": [secret.secret_access_key, {"token": secret.session_token}]},
                    exc=RuntimeError(f"boto said {secret.secret_access_key}"))
        log.warning("bare", value=secret.session_token, pair=(secret.db_password, 1))
        try:
            raise ConnectionError(f"refused: {dsn}")
        except ConnectionError:
            log.exception("with a traceback")
    text = repr(events)
    assert secret.leaks(text) == [], text
    assert len(events) == 7
    assert "could not connect to postgresql://worker:***@db.internal" in events[0]["error"]
    assert events[1]["conninfo"] == "host=db user=worker password=*** sslmode=require"


@pytest.mark.usefixtures("configured_logging")
def test_library_logging_is_redacted_too(secret: Secrets, capsys: pytest.CaptureFixture[str]) -> None:
    handler: logging.StreamHandler[io.StringIO] = logging.StreamHandler(io.StringIO())
    handler.addFilter(logs.RedactingFilter())
    logger = logging.getLogger("test.library")
    logger.addHandler(handler)
    try:
        logger.warning("retrying %s with %s", f"postgresql://u:{secret.db_password}@h/db", secret.session_token)
        try:
            raise ValueError(secret.secret_access_key)
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    output = handler.stream.getvalue()
    assert "retrying postgresql://u:***@h/db with ***" in output and "Traceback" in output
    assert secret.leaks(output) == []


# --- real paths, captured with structlog ---------------------------------------------------------


@pytest.fixture
def fast_backfill_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backfill_module, "RETRY_DELAY_S", 0.01)


@pytest.mark.usefixtures("configured_logging", "fast_backfill_retries")
async def test_no_secret_in_logs_or_outcomes_of_ingest_paths(
    secret: Secrets, settings: Settings, db_url: str, db: asyncpg.Connection, rekognition_endpoint: Any,
) -> None:
    """Success, AWS errors (access denied, credentials refused), an unreachable database: every event and
    every outcome reason, as the configured processors leave them."""
    good = synth.search_job(f"sec-good-{uuid.uuid4().hex[:8]}", persons_elements=60)
    denied = synth.JobFixture(f"sec-denied-{uuid.uuid4().hex[:8]}", "GetFaceSearch", error="AccessDeniedException")
    creds = synth.JobFixture(f"sec-creds-{uuid.uuid4().hex[:8]}", "GetFaceDetection",
                             error="UnrecognizedClientException")
    invalid = synth.JobFixture(f"sec-invalid-{uuid.uuid4().hex[:8]}", "GetFaceDetection",
                               error="InvalidParameterException")
    rekognition_endpoint.add_jobs([good, denied, creds, invalid])
    refs = [JobRef.create(f.job_id, f.api) for f in (good, denied, creds, invalid)]
    console = Console(file=io.StringIO(), width=200)
    with capture_logs(processors=logs.processors()) as events:
        ok = await run_backfill(settings.with_(database_url=with_password(db_url, secret.db_password)), refs,
                                console=console)
        down = await run_backfill(
            settings.with_(database_url=f"postgresql://worker:{secret.db_password}@127.0.0.1:1/rekognition"),
            refs[:1], console=console)
    # Refused credentials are the deployment's problem (transient); a refused request fails the job.
    assert [o.outcome for o in ok] == ["ingested", "transient", "transient", "failed"], ok
    assert [o.outcome for o in down] == ["transient"], down
    assert events and any(e.get("outcome") == "transient" for e in events)
    text = repr(events) + repr(ok) + repr(down) + console.file.getvalue()  # type: ignore[attr-defined]
    assert secret.leaks(text) == [], text
    reasons = await db.fetch("SELECT failure_reason FROM jobs WHERE failure_reason IS NOT NULL")
    assert reasons and secret.leaks(repr(reasons)) == []


async def test_no_secret_in_cli_output(secret: Secrets, db_url: str, moto_url: str, rekognition_endpoint: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands as processes, with the secrets in their environment: stdout and stderr of success,
    of AWS errors, of the SQS worker with a poison message, and of an unreachable database."""
    good = synth.detection_job(f"sec-cli-{uuid.uuid4().hex[:8]}", faces=30)
    denied = synth.JobFixture(f"sec-cli-denied-{uuid.uuid4().hex[:8]}", "GetFaceDetection",
                              error="AccessDeniedException")
    # AccessDenied is handed back to the queue for ever (the deployment's fault), so the queue run gets
    # a job Rekognition refuses instead, to show an AWS error through `run` that ends.
    invalid = synth.JobFixture(f"sec-cli-invalid-{uuid.uuid4().hex[:8]}", "GetFaceDetection",
                               error="InvalidParameterException")
    rekognition_endpoint.add_jobs([good, denied, invalid])
    env = worker_env(DATABASE_URL=with_password(db_url, secret.db_password),
                     AWS_ENDPOINT_URL_REKOGNITION=rekognition_endpoint.url, AWS_ENDPOINT_URL_SQS=moto_url,
                     **secret.aws_env())
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", moto_url)
    async with get_session().create_client("sqs", region_name="us-east-1") as sqs:
        queue_url, _ = await create_queue_with_dlq(sqs, f"sec-{uuid.uuid4().hex[:8]}", visibility_timeout_s=5,
                                                   max_receive_count=1)
        for body in (sns_envelope(notification(good)), "not json", sns_envelope(notification(invalid))):
            await sqs.send_message(QueueUrl=queue_url, MessageBody=body)
    unreachable = f"postgresql://worker:{secret.db_password}@127.0.0.1:1/rekognition"
    runs = [
        (["backfill", "--api", "GetFaceDetection", good.job_id, denied.job_id], env, 1),
        (["run", "--exit-when-idle"], {**env, "QUEUE_URL": queue_url}, 0),
        (["report", good.job_id], env, 0),
        (["migrate"], {**env, "DATABASE_URL": unreachable}, None),
        (["backfill", "--api", "GetFaceDetection", good.job_id], {**env, "DATABASE_URL": unreachable}, 4),
    ]
    for args, run_env, expected in runs:  # one after another: report reads what backfill stored
        proc = WorkerProcess(args, run_env)
        rc = proc.wait(120)
        out = proc.output()
        assert (rc == expected) if expected is not None else rc != 0, (args, rc, out[-2000:])
        assert secret.leaks(out) == [], (args, out)
        if args[0] == "run":
            assert any(e.get("event") == "job finished" for e in proc.lines), out[-2000:]


# --- SQL: bound values, allow-listed identifiers --------------------------------------------------

SQL_METHODS = {"execute", "executemany", "fetch", "fetchrow", "fetchval", "exec_driver_sql", "copy_records_to_table",
               "copy_to_table", "copy_from_table", "copy_from_query", "prepare", "cursor", "text"}
# Calls named like a SQL method that are not SQL (Fetcher.fetch takes an Api and a JobId).
NOT_SQL = {"self.rt.fetcher.fetch", "self.fetcher.fetch", "fetcher.fetch", "rt.fetcher.fetch"}
SQL_WORDS = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|TRUNCATE|GRANT|COPY|WHERE|VALUES)\b")
# A statement starts with one of these (messages that merely mention SQL do not).
SQL_START = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|TRUNCATE|GRANT|REVOKE|COPY|WITH|SET)\b")
IDENTIFIERS = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*(?:[\s,=.]+[A-Za-z_][A-Za-z0-9_]*)*\s*$")
WORKER_FILES = sorted(p for p in (ROOT / "worker").rglob("*.py") if p.name != "__main__.py")


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _module_constants(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _identifier_value(module: str, name: str) -> bool:
    """The constant's runtime value is made of identifiers only (a name, a column list, ``a = EXCLUDED.a``)."""
    value = getattr(importlib.import_module(module), name)
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, tuple | frozenset) else None
    return items is not None and all(isinstance(v, str) and IDENTIFIERS.match(v) for v in items)


def _fstring_problems(node: ast.JoinedStr, parents: dict[ast.AST, ast.AST], constants: set[str],
                      module: str) -> list[str]:
    problems = []
    for part in node.values:
        if not isinstance(part, ast.FormattedValue):
            continue
        expr = part.value
        if isinstance(expr, ast.Name) and expr.id in constants:
            if not _identifier_value(module, expr.id):
                problems.append(f"{{{expr.id}}}: module constant is not made of identifiers")
            continue
        if isinstance(expr, ast.Name):
            loop = parents.get(node)
            while loop is not None and not (isinstance(loop, ast.For) and isinstance(loop.target, ast.Name)
                                            and loop.target.id == expr.id):
                loop = parents.get(loop)
            if (loop is not None and isinstance(loop, ast.For) and isinstance(loop.iter, ast.Name)
                    and loop.iter.id in constants and _identifier_value(module, loop.iter.id)):
                continue
        problems.append(f"{{{ast.unparse(expr)}}} is not an allow-listed identifier")
    return problems


def sql_problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents, constants = _parents(tree), _module_constants(tree)
    module = _module_name(path)
    where = path.relative_to(ROOT)
    problems: list[str] = []
    for node in ast.walk(tree):
        literal = ""
        if isinstance(node, ast.JoinedStr):
            literal = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
            call = parents.get(node)
            passed_to_sql = (isinstance(call, ast.Call) and call.args and call.args[0] is node
                             and isinstance(call.func, ast.Attribute | ast.Name)
                             and (getattr(call.func, "attr", None) or getattr(call.func, "id", None)) in SQL_METHODS)
            if passed_to_sql or SQL_START.match(literal):
                problems += [f"{where}:{node.lineno}: {p}" for p in _fstring_problems(node, parents, constants, module)]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and isinstance(side.value, str) and SQL_WORDS.search(side.value):
                    problems.append(f"{where}:{node.lineno}: SQL built with {type(node.op).__name__}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
              and isinstance(node.func.value, ast.Constant) and SQL_WORDS.search(str(node.func.value.value))):
            problems.append(f"{where}:{node.lineno}: SQL built with str.format")
        elif isinstance(node, ast.Call) and node.args:
            problems += _call_problems(node, parents, constants, where)
    return problems


def _call_problems(node: ast.Call, parents: dict[ast.AST, ast.AST], constants: set[str], where: Path) -> list[str]:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in SQL_METHODS or ast.unparse(func) in NOT_SQL:
        return []
    first = node.args[0]
    if isinstance(first, ast.Constant | ast.JoinedStr):
        return []  # a literal, or an f-string checked on its own
    if (isinstance(first, ast.Call) and first.args
            and (getattr(first.func, "attr", None) or getattr(first.func, "id", None)) == "text"):
        return []  # sqlalchemy's text(...): that call is checked on its own
    if isinstance(first, ast.Name) and first.id in constants:
        return []  # a module constant (its f-string, if any, is checked on its own)
    if isinstance(first, ast.Name):
        # A wrapper's parameter (fleet's _fetchrow(sql, *args)): its callers must pass constants.
        func_def = parents.get(node)
        while func_def is not None and not isinstance(func_def, ast.FunctionDef | ast.AsyncFunctionDef):
            func_def = parents.get(func_def)
        if func_def is not None and first.id in {a.arg for a in func_def.args.args} and func_def.name.startswith("_"):
            SQL_METHODS.add(func_def.name)
            return []
    return [f"{where}:{node.lineno}: {name}() with SQL from {ast.unparse(first)!r}"]


# SQL that cannot bind a value and interpolates one checked by the code itself: (file, the interpolation).
CHECKED_ELSEWHERE = {
    # The local Citus cluster's test databases: CREATE DATABASE takes no parameters; DATABASE_NAME checks it.
    ("worker/local/citus.py", "{database} is not an allow-listed identifier"),
}


def test_sql_uses_only_bound_values_and_allow_listed_identifiers() -> None:
    """Every f-string that builds SQL in worker/ interpolates only module constants made of identifiers
    (or a loop variable over one); every SQL call gets a literal or such a constant; no % or format()."""
    # Twice: a wrapper discovered in one file (SQL_METHODS grows) is then checked in every file.
    for _ in range(2):
        problems = [p for path in WORKER_FILES for p in sql_problems(path)
                    if not any(p.startswith(f"{where}:") and p.endswith(what) for where, what in CHECKED_ELSEWHERE)]
    assert problems == []
    assert "_fetchrow" in SQL_METHODS or not (ROOT / "worker" / "fleet.py").exists()


def test_the_sql_check_catches_unsafe_sql(tmp_path: Path) -> None:
    bad = ast.parse('def f(conn, table, job_id):\n    conn.execute(f"DELETE FROM {table} WHERE job_id = {job_id}")\n'
                    '    conn.execute("SELECT * FROM jobs WHERE job_id = \'%s\'" % job_id)\n'
                    '    conn.fetch(query)\n')
    problems: list[str] = []
    parents = _parents(bad)
    for node in ast.walk(bad):
        if isinstance(node, ast.JoinedStr):
            problems += _fstring_problems(node, parents, set(), "")
        elif isinstance(node, ast.Call) and node.args:
            problems += _call_problems(node, parents, set(), Path("x.py"))
    assert any("{table}" in p for p in problems) and any("{job_id}" in p for p in problems)
    assert any("query" in p for p in problems)


# --- the least-privilege worker role -------------------------------------------------------------

ROLES_SQL = [ROOT / "sql" / name for name in ("01_roles.sql", "02_database.sql", "03_grants.sql")]


def roles_sections(migrator: str, worker: str) -> list[str]:
    """The three steps of sql/, with the role names replaced (roles are cluster-wide: keep tests apart)."""
    return [path.read_text(encoding="utf-8").replace("rekognition_migrator", migrator)
            .replace("rekognition_worker", worker) for path in ROLES_SQL]


def as_role(url: str, role: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{role}@{host}", parts.path, parts.query, parts.fragment))


@pytest.fixture
async def role_database(pg_server_url: str) -> AsyncIterator[tuple[str, str, str]]:
    """(database URL as superuser, migration role, worker role): an empty database set up per sql/."""
    suffix = uuid.uuid4().hex[:8]
    migrator, worker = f"rekognition_migrator_{suffix}", f"rekognition_worker_{suffix}"
    cluster, database, _ = roles_sections(migrator, worker)
    admin = await asyncpg.connect(pg_server_url)
    try:
        await admin.execute(cluster)
        await admin.execute(cluster)  # idempotent
        url = await create_database(pg_server_url)
        await admin.execute(f'ALTER DATABASE "{urlsplit(url).path.lstrip("/")}" OWNER TO "{migrator}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(database)
        await conn.execute(database)  # idempotent
    finally:
        await conn.close()
    try:
        yield url, migrator, worker
    finally:
        await drop_database(pg_server_url, url)
        admin = await asyncpg.connect(pg_server_url)
        try:
            for role in (worker, migrator):
                await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        finally:
            await admin.close()


async def test_worker_role_can_ingest_but_not_change_the_schema(
    role_database: tuple[str, str, str], settings: Settings, rekognition_endpoint: Any, pg_server_url: str,
) -> None:
    url, migrator, worker = role_database
    _, _, post_migrate = roles_sections(migrator, worker)

    # The migration role migrates (DDL) and applies the post-migration grants, no superuser needed.
    await asyncio.to_thread(upgrade_to_head, Settings(database_url=as_role(url, migrator)))
    conn = await asyncpg.connect(as_role(url, migrator))
    try:
        await conn.execute(post_migrate)
        await conn.execute(post_migrate)  # idempotent
    finally:
        await conn.close()
    # The worker role ingests, reprocesses and reports: every command it runs in production.
    fx = synth.search_job(f"role-{uuid.uuid4().hex[:8]}", persons_elements=80)
    rekognition_endpoint.add_job(fx)
    ref = JobRef.create(fx.job_id, fx.api)
    as_worker = settings.with_(database_url=as_role(url, worker))
    outcomes = await run_backfill(as_worker, [ref], console=Console(file=io.StringIO()))
    assert [o.outcome for o in outcomes] == ["ingested"], outcomes
    fleet = await run_backfill(as_worker.with_(rate_limit_scope="fleet"), [ref], console=Console(file=io.StringIO()))
    assert [o.outcome for o in fleet] == ["ingested"], fleet
    assert [o.outcome for o in await run_reprocess(as_worker, [fx.job_id])] == ["ingested"]
    assert await run_report(as_worker, fx.job_id, fmt="json", chart=None, console=Console(file=io.StringIO())) == 0
    conn = await asyncpg.connect(as_role(url, worker))
    try:
        assert (await dump_job(conn, fx.job_id))["faces"]
        assert await conn.fetchval("SELECT faces FROM reporting.job_summary WHERE job_id = $1", fx.job_id) == 80
        assert await conn.fetchval("SELECT version_num FROM alembic_version")
        for ddl in ("CREATE TABLE intruder (x int)", "DROP TABLE faces", "ALTER TABLE faces ADD COLUMN x int",
                    "TRUNCATE faces", "CREATE INDEX intruder_idx ON faces (confidence)", "CREATE SCHEMA intruder",
                    "CREATE VIEW reporting.intruder AS SELECT 1", "DROP VIEW reporting.job_summary",
                    "CREATE TYPE intruder AS ENUM ('x')", "CREATE TEMP TABLE intruder (x int)",
                    "UPDATE alembic_version SET version_num = '0000'", "DELETE FROM alembic_version",
                    f'ALTER ROLE "{worker}" SUPERUSER', f'CREATE ROLE "{worker}_2"'):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(ddl)
    finally:
        await conn.close()
