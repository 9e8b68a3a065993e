"""Alembic environment: async, URL from worker.config (never from alembic.ini).

The migration connection resolves unqualified names in schema `rekognition` first (the engine's
search_path), so a migration's `CREATE TABLE x` lands beside the worker's other tables; the version
table stays `public.alembic_version`. target_metadata is worker/db/schema.py, for autogenerate and
`alembic check`: only schema `rekognition` is compared (the reporting views are SQL, in migrations).
"""

from __future__ import annotations

import asyncio
import logging

from alembic import context
from sqlalchemy.engine import Connection

from worker.config import Settings
from worker.db import citus
from worker.db.engine import create_engine
from worker.db.schema import SEARCH_PATH, compare_type, compared_names, metadata

config = context.config


def _settings() -> Settings:
    # `python -m worker migrate` passes its Settings object; plain `alembic upgrade` reads the env.
    settings = config.attributes.get("settings")
    return settings if isinstance(settings, Settings) else Settings.from_env()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, transaction_per_migration=True,
                      version_table_schema="public", include_schemas=True,
                      include_name=compared_names(connection.dialect.default_schema_name), compare_type=compare_type,
                      compare_server_default=True)
    with context.begin_transaction():
        context.run_migrations()
    _distribute(connection)


def _distribute(connection: Connection) -> None:
    """On Citus, distribute the bulk tables once the schema is at head (worker/db/citus.py); idempotent, and
    nothing on plain PostgreSQL or after a downgrade."""
    if set(context.get_context().get_current_heads()) != set(context.script.get_heads()):
        return
    if connection.in_transaction():
        done = citus.distribute(connection)
    else:
        with connection.begin():
            done = citus.distribute(connection)
    if done:
        logging.getLogger("alembic.runtime.migration").info("Distributed on Citus by ingest_id: %s", ", ".join(done))


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
        # A caller's connection (in its own transaction) gets the search_path the engine's connections have.
        connection.exec_driver_sql(f"SET search_path = {SEARCH_PATH}")
        _run(connection)
    else:
        asyncio.run(_run_async())


if context.is_offline_mode():
    context.configure(url="postgresql://", literal_binds=True, target_metadata=metadata, version_table_schema="public")
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
