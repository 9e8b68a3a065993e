"""Wiring: one engine, one Rekognition client, one limiter and the ingestor, for any command."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from worker import metrics
from worker.config import Settings
from worker.db.engine import create_engine
from worker.db.store import Store
from worker.fleet import FleetRateLimiter
from worker.ingest import Ingestor
from worker.logs import get_logger
from worker.pagecodec import PageDecoder, default_processes
from worker.ratelimit import Limiter, OnRateChange, RateLimiter
from worker.rekognition import Fetcher, create_client
from worker.watchdog import Watchdog

log = get_logger(__name__)


@dataclass(slots=True)
class Runtime:
    settings: Settings
    engine: AsyncEngine
    store: Store
    client: Any
    fetcher: Fetcher
    ingestor: Ingestor
    watchdog: Watchdog


def _rate_changed(rate_per_s: float, why: str) -> None:
    metrics.RATE_LIMIT.set(rate_per_s)
    log.info("rekognition rate changed", rate_per_s=round(rate_per_s, 3), why=why)


async def open_limiter(settings: Settings, stack: AsyncExitStack, *, bucket: str, ceiling_per_s: float,
                       on_change: OnRateChange | None = None) -> Limiter:
    """A call budget: this process's own AIMD bucket, or (RATE_LIMIT_SCOPE=fleet) the fleet's shared row named
    ``bucket``, closed with ``stack``. The Get* budget and the Start* budget are two of them."""
    if settings.rate_limit_scope != "fleet":
        return RateLimiter(ceiling_per_s, on_change=on_change)
    fleet = FleetRateLimiter(settings.asyncpg_dsn, ceiling_per_s=ceiling_per_s, name=bucket, on_change=on_change)
    await fleet.open()
    stack.push_async_callback(fleet.close)
    log.info("fleet rate limit joined", bucket=fleet.name, ceiling_per_s=ceiling_per_s,
             rate_per_s=round(fleet.rate_per_s, 3))
    return fleet


@asynccontextmanager
async def open_runtime(settings: Settings, *, limiter: Limiter | None = None) -> AsyncIterator[Runtime]:
    engine = create_engine(settings)
    try:
        async with AsyncExitStack() as stack:
            pool_connections = max(10, settings.max_concurrent_jobs * 2)
            client = await stack.enter_async_context(
                create_client(region=settings.aws_region, max_pool_connections=pool_connections))
            # Quotas are per account and region: one shared bucket per region, whatever shares the database.
            limiter = limiter or await open_limiter(
                settings, stack, bucket=f"rekognition:{client.meta.region_name or 'default'}",
                ceiling_per_s=settings.rekognition_tps, on_change=_rate_changed)
            metrics.RATE_LIMIT.set(limiter.rate_per_s)
            metrics.RATE_CEILING.set(settings.rekognition_tps)
            fetcher = Fetcher(client, limiter, page_size=settings.page_size, max_attempts=settings.max_call_attempts,
                              retry_base_s=settings.retry_base_s, retry_cap_s=settings.retry_cap_s,
                              max_pages=settings.max_pages_per_job)
            store = Store(engine, archive_raw_pages=settings.archive_raw_pages,
                          erasure_key=settings.erasure_hash_key)
            decoder = PageDecoder(settings.decode_processes if settings.decode_processes >= 0
                                  else default_processes())
            stack.callback(decoder.close)
            if settings.decode_warm_start:
                decoder.start()  # the process starts and imports while the first call is on the wire
            watchdog = await stack.enter_async_context(Watchdog(settings.job_stall_timeout_s))
            ingestor = Ingestor(fetcher, store, prefetch_pages=settings.prefetch_pages, decoder=decoder,
                                watchdog=watchdog, max_identical_failures=settings.max_identical_failures)
            yield Runtime(settings, engine, store, client, fetcher, ingestor, watchdog)
    finally:
        await engine.dispose()
