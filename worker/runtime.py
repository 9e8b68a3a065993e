"""Wiring: one engine, one Rekognition client, one limiter and the ingestor, for any command."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from worker import metrics
from worker.config import Settings
from worker.db.engine import create_engine
from worker.db.store import Store
from worker.ingest import Ingestor
from worker.logs import get_logger
from worker.ratelimit import RateLimiter
from worker.rekognition import Fetcher, create_client

log = get_logger(__name__)


@dataclass(slots=True)
class Runtime:
    settings: Settings
    engine: AsyncEngine
    store: Store
    client: Any
    fetcher: Fetcher
    ingestor: Ingestor


def _rate_changed(rate_per_s: float, why: str) -> None:
    metrics.RATE_LIMIT.set(rate_per_s)
    log.info("rekognition rate changed", rate_per_s=round(rate_per_s, 3), why=why)


@asynccontextmanager
async def open_runtime(settings: Settings, *, limiter: RateLimiter | None = None) -> AsyncIterator[Runtime]:
    engine = create_engine(settings)
    limiter = limiter or RateLimiter(settings.rekognition_tps, on_change=_rate_changed)
    metrics.RATE_LIMIT.set(limiter.rate_per_s)
    try:
        async with create_client(region=settings.aws_region,
                                 max_pool_connections=max(10, settings.max_concurrent_jobs * 2)) as client:
            fetcher = Fetcher(client, limiter, page_size=settings.page_size, max_attempts=settings.max_call_attempts,
                              retry_base_s=settings.retry_base_s, retry_cap_s=settings.retry_cap_s)
            store = Store(engine, archive_raw_pages=settings.archive_raw_pages)
            ingestor = Ingestor(fetcher, store, prefetch_pages=settings.prefetch_pages)
            yield Runtime(settings, engine, store, client, fetcher, ingestor)
    finally:
        await engine.dispose()
