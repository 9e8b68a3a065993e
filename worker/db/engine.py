"""The one engine factory.

SQLAlchemy owns the pool; asyncpg parses the libpq-style DSN itself, so query parameters such as
``host=/socket/dir`` and ``sslmode=require`` behave as they do for psql.
"""

from __future__ import annotations

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from worker.config import Settings


def create_engine(settings: Settings, *, pool_size: int | None = None) -> AsyncEngine:
    dsn = settings.asyncpg_dsn

    async def connect() -> asyncpg.Connection:
        # statement_cache_size stays default: the worker runs a handful of statements repeatedly.
        return await asyncpg.connect(dsn, server_settings={"application_name": "rekognition-worker"})

    size = pool_size if pool_size is not None else settings.db_pool_size
    return create_async_engine(
        "postgresql+asyncpg://",
        async_creator=connect,
        pool_size=size,
        max_overflow=0,
        # A restarted PostgreSQL leaves dead connections in the pool; check before use.
        pool_pre_ping=True,
        pool_recycle=1800,
    )
