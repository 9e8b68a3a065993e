"""Run alembic migrations programmatically (the `migrate` command, `run`'s schema check, tests, the demo).

The migrations ship inside the package (the wheel maps the repository's migrations/ to
worker/migrations), so an installed console script migrates from any directory; a source checkout
uses migrations/ beside the package. The repository's alembic.ini is for developers running `alembic`
by hand; nothing here reads it.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from worker.config import Settings
from worker.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parents[1]


def script_location() -> Path:
    """Where the migrations are: inside the installed package, else beside it in a source checkout."""
    for candidate in (_PACKAGE / "migrations", _PACKAGE.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigError(f"migrations not found in {_PACKAGE} or beside it: a broken installation")


def alembic_config(settings: Settings | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.set_main_option("path_separator", "os")
    if settings is not None:
        cfg.attributes["settings"] = settings
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade_to_head(settings: Settings) -> None:
    """Blocking: call from a thread when an event loop is running (env.py runs its own loop)."""
    command.upgrade(alembic_config(settings), "head")
