"""Run alembic migrations programmatically (the `migrate` command, tests, the demo)."""

from __future__ import annotations

from pathlib import Path

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


def upgrade_to_head(settings: Settings) -> None:
    """Blocking: call from a thread when an event loop is running (env.py runs its own loop)."""
    command.upgrade(alembic_config(settings), "head")
