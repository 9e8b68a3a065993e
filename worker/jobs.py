"""`jobs list` and `jobs retry` (worker/commands/jobs.py prints them): the jobs table as an operator sees it,
and failed jobs ingested again.

Read-only queries of the `jobs` table; a retry goes through the same path as `backfill` (one
runtime, one limiter, the ingestor with its atomic per-job writes and in-run retries of busy or
transient jobs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from worker.errors import InvalidInput
from worker.messages import Api, JobRef, validate_job_id

DEFAULT_LIST_LIMIT = 100
DEFAULT_RETRY_LIMIT = 1000

# Newest first by the last change; a NULL filter is off. The state is checked against the enum first.
_LIST_SQL = """
SELECT job_id, api::text AS api, ingest_state::text AS ingest_state, job_status::text AS job_status,
       failure_code, failure_reason, attempts, notified_at, ingested_at, updated_at
FROM jobs
WHERE ($1::text IS NULL OR ingest_state = $1::text::ingest_state)
  AND ($2::timestamptz IS NULL OR updated_at >= $2)
  AND ($3::text[] IS NULL OR job_id = ANY($3))
ORDER BY updated_at DESC, job_id
LIMIT $4
"""


def parse_since(text: str | None) -> datetime | None:
    """ISO 8601 (``2026-11-30``, ``2026-11-30T12:00:00Z``, with an offset); no zone means UTC."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(f"--since {text!r} is not an ISO 8601 date or time (e.g. 2026-11-30T12:00:00Z)") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def ingest_states(conn: asyncpg.Connection) -> list[str]:
    """The states the schema knows (the enum), so new states need no change here."""
    return [r[0] for r in await conn.fetch("SELECT unnest(enum_range(NULL::ingest_state))::text")]


async def check_state(conn: asyncpg.Connection, state: str | None) -> None:
    if state is not None and state not in (known := await ingest_states(conn)):
        raise InvalidInput(f"unknown ingest state {state!r}: expected one of {', '.join(known)}")


async def list_jobs(conn: asyncpg.Connection, *, state: str | None = None, since: datetime | None = None,
                    job_ids: Sequence[str] | None = None, limit: int = DEFAULT_LIST_LIMIT) -> list[dict[str, Any]]:
    """Jobs, newest change first, at most ``limit``."""
    await check_state(conn, state)
    rows = await conn.fetch(_LIST_SQL, state, since, list(job_ids) if job_ids is not None else None, limit)
    return [dict(r) for r in rows]


# --- retry ---------------------------------------------------------------------------------------


@dataclass
class RetryPlan:
    """Which jobs a retry ingests again, and which it leaves, with why."""

    refs: list[JobRef] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (job_id, why)
    truncated: bool = False


async def plan_retry(conn: asyncpg.Connection, *, state: str = "failed", since: datetime | None = None,
                     job_ids: Sequence[str] | None = None, include_rekognition_failed: bool = False,
                     limit: int = DEFAULT_RETRY_LIMIT) -> RetryPlan:
    """The failed jobs to ingest again, newest change first (as `jobs list` shows them)."""
    if state != "failed":
        raise InvalidInput(f"only failed jobs are retried (got --state {state}); re-ingest others with backfill")
    named = [validate_job_id(j) for j in job_ids] if job_ids else None
    rows = await list_jobs(conn, state=state, since=since, job_ids=named, limit=limit + 1)
    plan = RetryPlan(truncated=len(rows) > limit)
    rows = rows[:limit]
    for r in rows:
        if r["job_status"] == "FAILED" and not include_rekognition_failed:
            plan.skipped.append((r["job_id"], "Rekognition reported the job FAILED: retrying cannot help "
                                              "(--include-rekognition-failed to try anyway)"))
        else:
            plan.refs.append(JobRef(job_id=r["job_id"], api=Api(r["api"])))
    if named:
        found = {r["job_id"] for r in rows}
        others = {r["job_id"]: r for r in await list_jobs(conn, job_ids=[j for j in named if j not in found],
                                                          limit=len(named))}
        for job_id in dict.fromkeys(named):
            if job_id in found:
                continue
            other = others.get(job_id)
            why = "no such job in the database" if other is None else (
                f"job is {other['ingest_state']}, not failed" if other["ingest_state"] != "failed"
                else "outside --since")
            plan.skipped.append((job_id, why))
    return plan
