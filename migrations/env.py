"""Alembic environment: async, URL from worker.config (never from alembic.ini)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from worker.config import Settings
from worker.db.engine import create_engine

config = context.config


def _settings() -> Settings:
    # `python -m worker migrate` passes its Settings object; plain `alembic upgrade` reads the env.
    settings = config.attributes.get("settings")
    return settings if isinstance(settings, Settings) else Settings.from_env()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_engine(_settings(), pool_size=1)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
            await conn.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        asyncio.run(_run_async())


if context.is_offline_mode():
    context.configure(url="postgresql://", literal_binds=True, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
