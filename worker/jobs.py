"""`jobs list` and `jobs retry`: the jobs table as an operator sees it, and failed jobs ingested again.

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
import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from worker.config import Settings
from worker.db.engine import connect
from worker.errors import InvalidInput
from worker.ingest import JobOutcome
from worker.logs import redact
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


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


def jobs_table(rows: Sequence[dict[str, Any]], *, title: str) -> Table:
    table = Table(title=title)
    for col in ("job", "api", "state", "rekognition", "failure", "attempts", "notified", "ingested", "updated"):
        table.add_column(col, justify="right" if col == "attempts" else "left", overflow="fold",
                         no_wrap=col != "failure")

    def when(value: datetime | None) -> str:
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"

    for r in rows:
        style = {"ingested": "green", "pending": "yellow"}.get(r["ingest_state"], "red")
        failure = ": ".join(x for x in (r["failure_code"], r["failure_reason"]) if x)
        table.add_row(r["job_id"], r["api"], f"[{style}]{r['ingest_state']}[/]", r["job_status"] or "-",
                      escape(redact(failure))[:160] or "-", str(r["attempts"]), when(r["notified_at"]),
                      when(r["ingested_at"]), when(r["updated_at"]))
    return table


async def run_list(settings: Settings, *, state: str | None, since: str | None, limit: int, fmt: str,
                   console: Console) -> int:
    """The `jobs list` command."""
    since_at = parse_since(since)
    conn = await connect(settings.asyncpg_dsn)
    try:
        rows = await list_jobs(conn, state=state, since=since_at, limit=limit)
    finally:
        await conn.close()
    if fmt == "json":
        print(orjson.dumps([_plain(r) for r in rows], option=orjson.OPT_INDENT_2).decode())
        return 0
    more = " (limit reached: raise --limit or narrow with --state/--since)" if len(rows) >= limit else ""
    console.print(jobs_table(rows, title=f"{len(rows)} job(s), newest first{more}"))
    return 0


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


def plan_table(plan: RetryPlan, *, dry_run: bool) -> Table:
    table = Table(title="jobs retry plan" + (" (dry run)" if dry_run else ""))
    table.add_column("job")
    table.add_column("api")
    table.add_column("action")
    for ref in plan.refs:
        table.add_row(ref.job_id, ref.api.value, "retry")
    for job_id, why in plan.skipped:
        table.add_row(job_id, "-", f"skip: {escape(why)}")
    return table


async def run_retry(settings: Settings, *, state: str, since: str | None, job_ids: Sequence[str] | None,
                    include_rekognition_failed: bool, dry_run: bool, limit: int, console: Console) -> int:
    """The `jobs retry` command: 0 only if every retried job ended ingested."""
    from worker.backfill import run_backfill, summary_table

    since_at = parse_since(since)
    conn = await connect(settings.asyncpg_dsn)
    try:
        plan = await plan_retry(conn, state=state, since=since_at, job_ids=job_ids,
                                include_rekognition_failed=include_rekognition_failed, limit=limit)
    finally:
        await conn.close()
    err = Console(stderr=True)
    if dry_run or not plan.refs:
        console.print(plan_table(plan, dry_run=dry_run))
        console.print(f"{len(plan.refs)} job(s) to retry, {len(plan.skipped)} skipped"
                      + ("; more match: raise --limit" if plan.truncated else ""))
        return 0
    for job_id, why in plan.skipped:
        err.print(f"skipped {job_id}: {why}", markup=False, highlight=False)
    outcomes: list[JobOutcome] = await run_backfill(settings, plan.refs, console=err)
    for o in outcomes:
        if o.outcome != "ingested":
            err.print(redact(f"error: job {o.job_id}: {o.outcome}: {o.reason}"), markup=False, highlight=False)
    table = summary_table(outcomes)
    table.title = "jobs retry summary"
    console.print(table)
    ingested = sum(o.outcome == "ingested" for o in outcomes)
    console.print(f"retried {len(outcomes)}: {ingested} ingested, {len(outcomes) - ingested} not; "
                  f"{len(plan.skipped)} skipped" + ("; more match: raise --limit" if plan.truncated else ""))
    return 0 if ingested == len(outcomes) else 1
