"""Run alembic migrations programmatically (the `migrate` command, tests, the demo)."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from worker.config import Settings
from worker.errors import ConfigError


def _alembic_ini() -> Path:
    # A source checkout keeps alembic.ini beside the package; the container's WORKDIR holds a copy.
    for candidate in (Path.cwd() / "alembic.ini", Path(__file__).resolve().parents[2] / "alembic.ini"):
        if candidate.is_file():
            return candidate
    raise ConfigError("alembic.ini not found: run from the project directory (or the image's WORKDIR)")


def alembic_config(settings: Settings) -> Config:
    cfg = Config(str(_alembic_ini()))
    cfg.attributes["settings"] = settings
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(Config(str(_alembic_ini()))).get_current_head()


ROLE_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def grants_sql(role: str) -> str:
    """sql/03_grants.sql for ``role``: DML on the worker's tables, read on the reporting schema."""
    if not ROLE_RE.fullmatch(role):
        raise ConfigError(f"--grant-to: {role[:80]!r} is not a plain lower-case role name")
    path = _alembic_ini().parent / "sql" / "03_grants.sql"
    try:
        script = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    # The role is a validated identifier; quoting keeps it one even if the pattern ever widens.
    return script.replace("rekognition_worker", f'"{role}"')


async def apply_worker_grants(settings: Settings, role: str) -> None:
    """Run the post-migration grants as the migration role (the owner of the objects)."""
    script = grants_sql(role)
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        await conn.execute(script)
    finally:
        await conn.close()


def upgrade_to_head(settings: Settings) -> None:
    """Blocking: call from a thread when an event loop is running (env.py runs its own loop)."""
    command.upgrade(alembic_config(settings), "head")
