"""The one engine factory, and the one way the worker opens a PostgreSQL connection.

SQLAlchemy owns the pool; asyncpg parses the libpq-style DSN itself, so query parameters such as
``host=/socket/dir`` and ``sslmode=require`` behave as they do for psql. Every connection, pooled or
not, goes through :func:`connect`, which sets ``search_path`` so unqualified names resolve to the
worker's tables in schema ``rekognition`` (see worker/db/schema.py).
"""

from __future__ import annotations

from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from worker.config import Settings
from worker.db.schema import SEARCH_PATH


def server_settings(application_name: str = "rekognition-worker") -> dict[str, str]:
    """The session settings of every worker connection."""
    return {"application_name": application_name, "search_path": SEARCH_PATH}


async def connect(dsn: str, *, application_name: str = "rekognition-worker", **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect`` with the worker's session settings: no call site can forget the search_path."""
    return await asyncpg.connect(dsn, server_settings=server_settings(application_name), **kwargs)


def create_engine(settings: Settings, *, pool_size: int | None = None) -> AsyncEngine:
    dsn = settings.asyncpg_dsn

    async def _connect() -> asyncpg.Connection:
        # statement_cache_size stays default: the worker runs a handful of statements repeatedly.
        return await connect(dsn)

    size = pool_size if pool_size is not None else settings.db_pool_size
    return create_async_engine(
        "postgresql+asyncpg://",
        async_creator=_connect,
        pool_size=size,
        max_overflow=0,
        # A restarted PostgreSQL leaves dead connections in the pool; check before use.
        pool_pre_ping=True,
        pool_recycle=1800,
    )
