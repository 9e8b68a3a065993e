"""The outbox's statements: claim, mark delivered or failed, backlog, list, replay, prune.

Every statement is a single-table statement on ``event_outbox`` (a table local to the coordinator under
Citus). Events are written by the triggers of migration 0014, never here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

# The oldest undelivered events, at most one per job: an event waits while an earlier one of its job is
# undelivered (being delivered by another replica, or failing), so each job's events go out in order.
# SKIP LOCKED: replicas claim different events and never wait on each other.
_CLAIM_SQL = """
SELECT o.seq, o.event_id::text AS event_id, o.type, o.job_id, o.payload::text AS payload
FROM event_outbox o
WHERE o.published_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM event_outbox e
                  WHERE e.job_id = o.job_id AND e.published_at IS NULL AND e.seq < o.seq)
ORDER BY o.seq
LIMIT $1
FOR UPDATE OF o SKIP LOCKED
"""
_MARK_PUBLISHED_SQL = ("UPDATE event_outbox SET published_at = clock_timestamp(), last_error = NULL "
                       "WHERE seq = ANY($1::bigint[])")
_MARK_FAILED_SQL = "UPDATE event_outbox SET attempts = attempts + 1, last_error = $2 WHERE seq = $1"
_BACKLOG_SQL = """
SELECT count(*)::bigint AS pending,
       COALESCE(extract(epoch FROM now() - min(occurred_at)), 0)::double precision AS oldest_age_s
FROM event_outbox WHERE published_at IS NULL
"""
_LIST_SQL = """
SELECT seq, event_id::text AS event_id, type, job_id, occurred_at, published_at, attempts, last_error,
       payload::text AS payload
FROM event_outbox
WHERE ($1::bool IS NOT TRUE OR published_at IS NULL)
  AND ($2::timestamptz IS NULL OR occurred_at >= $2)
  AND ($3::text IS NULL OR job_id = $3)
  AND ($4::text IS NULL OR type = $4)
ORDER BY seq DESC
LIMIT $5
"""
_REPLAY_SQL = """
UPDATE event_outbox SET published_at = NULL
WHERE occurred_at >= $1 AND ($2::text IS NULL OR job_id = $2) AND ($3::text IS NULL OR type = $3)
RETURNING seq
"""
# Delivered events past the retention window, in batches; with ``$2`` (no destination configured) the
# undelivered ones too, which nothing would ever deliver.
_PRUNE_SQL = """
DELETE FROM event_outbox WHERE seq = ANY(ARRAY(
    SELECT seq FROM event_outbox
    WHERE occurred_at < $1 AND (published_at IS NOT NULL OR $2::bool)
    ORDER BY seq LIMIT $3))
"""
PRUNE_BATCH = 10_000


@dataclass(frozen=True, slots=True)
class Event:
    """One outbox row as the publisher sends it: ``payload`` is the JSON document, byte for byte."""

    seq: int
    event_id: str
    type: str
    job_id: str | None
    payload: str


@dataclass(frozen=True, slots=True)
class Backlog:
    pending: int
    oldest_age_s: float


async def claim(conn: asyncpg.Connection, limit: int) -> list[Event]:
    """Lock the next deliverable events; the caller's transaction holds them until it commits."""
    rows = await conn.fetch(_CLAIM_SQL, limit)
    return [Event(r["seq"], r["event_id"], r["type"], r["job_id"], r["payload"]) for r in rows]


async def mark_published(conn: asyncpg.Connection, seqs: Sequence[int]) -> None:
    if seqs:
        await conn.execute(_MARK_PUBLISHED_SQL, list(seqs))


async def mark_failed(conn: asyncpg.Connection, seq: int, error: str) -> None:
    await conn.execute(_MARK_FAILED_SQL, seq, error[:500])


async def backlog(conn: asyncpg.Connection) -> Backlog:
    row = await conn.fetchrow(_BACKLOG_SQL)
    return Backlog(int(row["pending"]), float(row["oldest_age_s"]))


async def list_events(conn: asyncpg.Connection, *, pending_only: bool = False, since: datetime | None = None,
                      job_id: str | None = None, event_type: str | None = None,
                      limit: int = 100) -> list[dict[str, Any]]:
    """Events, newest first."""
    rows = await conn.fetch(_LIST_SQL, pending_only, since, job_id, event_type, limit)
    return [dict(r) for r in rows]


async def replay(conn: asyncpg.Connection, since: datetime, *, job_id: str | None = None,
                 event_type: str | None = None) -> int:
    """Make the events since ``since`` pending again (same rows, same event_ids); returns how many."""
    return len(await conn.fetch(_REPLAY_SQL, since, job_id, event_type))


async def prune(conn: asyncpg.Connection, before: datetime, *, undelivered_too: bool) -> int:
    """Delete events older than ``before`` (delivered ones; all with ``undelivered_too``); returns how many."""
    total = 0
    while True:
        status = await conn.execute(_PRUNE_SQL, before, undelivered_too, PRUNE_BATCH)
        n = int(status.rsplit(" ", 1)[-1])
        total += n
        if n < PRUNE_BATCH:
            return total
