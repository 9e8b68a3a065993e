"""The submissions table: `submit` records videos, `run`'s scheduler claims, starts and probes them.

Every statement is one short transaction. The MAX_REKOGNITION_JOBS limit holds across replicas because a
claim counts the running submissions and takes a new slot under one transaction-scoped advisory lock:
two replicas never both see the last free slot. A claimed start whose replica died before recording the
JobId keeps its slot until ``lease_s`` has passed; then any replica retries it with the same token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from worker.db.engine import connect
from worker.messages import Api
from worker.submissions import RUNNING_STATES, STATES, StartOptions, Video, client_request_token

# A fixed key; JobIds cannot contain '.', so it never meets a job's lock (hashtextextended(job_id, 0)).
_SLOTS_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('worker.submissions.slots', 0))"
_RUNNING = "SELECT count(*) FROM submissions WHERE state = ANY($1::text[])"

# A stale claim first (it holds its slot already), else a submitted row if a slot is free ($2).
_CLAIM = """
WITH pick AS (
    SELECT submission_id FROM submissions
    WHERE (state = 'starting' AND claimed_at < now() - make_interval(secs => $1))
       OR (state = 'submitted' AND next_attempt_at <= now() AND $2)
    ORDER BY state = 'starting' DESC, next_attempt_at, submission_id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE submissions s
SET state = 'starting', claimed_at = now(), start_attempts = s.start_attempts + 1, updated_at = now()
FROM pick WHERE s.submission_id = pick.submission_id
RETURNING s.submission_id, s.video_bucket, s.video_name, s.api::text AS api, s.options, s.generation,
          s.client_request_token, s.start_attempts
"""

_RECORD_STARTED = """
UPDATE submissions
SET state = 'started', job_id = $3, started_at = coalesce(started_at, now()), claimed_at = NULL,
    next_probe_at = now() + make_interval(secs => $4), probes = 0, updated_at = now()
WHERE submission_id = $1 AND generation = $2 AND state = 'starting'
"""
# The job may be known already: its notification was handled (by another replica) before the JobId was
# recorded here, or an earlier claim of this start got as far. The trigger could not see this row then.
_CATCH_UP = """
UPDATE submissions s
SET state = CASE j.ingest_state::text WHEN 'ingested' THEN 'ingested' WHEN 'failed' THEN 'failed'
                ELSE 'finished' END,
    finished_at = coalesce(j.completed_at, now()),
    ingested_at = CASE WHEN j.ingest_state::text = 'ingested' THEN j.ingested_at END,
    failure_reason = CASE WHEN j.ingest_state::text = 'failed' THEN j.failure_reason END,
    updated_at = now()
FROM jobs j
WHERE s.submission_id = $1 AND s.state = 'started' AND j.job_id = s.job_id
"""
_RETRY_LATER = """
UPDATE submissions
SET state = 'submitted', claimed_at = NULL, next_attempt_at = now() + make_interval(secs => $3), updated_at = now()
WHERE submission_id = $1 AND generation = $2 AND state = 'starting'
"""
_START_FAILED = """
UPDATE submissions
SET state = 'failed', claimed_at = NULL, failure_reason = $3, finished_at = now(), updated_at = now()
WHERE submission_id = $1 AND generation = $2 AND state = 'starting'
"""

# One started job whose notification is overdue; the next probe is booked at once, so that two replicas
# never probe it together and a crash mid-probe only delays it.
_CLAIM_PROBE = """
WITH pick AS (
    SELECT submission_id FROM submissions
    WHERE state = 'started'
      AND (next_probe_at <= now() OR (probes = 0 AND started_at < now() - make_interval(secs => $3::float8)))
    ORDER BY next_probe_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE submissions s
SET probes = s.probes + 1,
    next_probe_at = now() + make_interval(secs => least($2::float8, $1::float8 * power(2, s.probes))),
    updated_at = now()
FROM pick WHERE s.submission_id = pick.submission_id
RETURNING s.submission_id, s.job_id, s.api::text AS api, s.options, s.video_bucket, s.video_name, s.started_at,
          s.probes
"""
_PROBED_FINISHED = """
UPDATE submissions SET state = 'finished', finished_at = coalesce(finished_at, now()), updated_at = now()
WHERE submission_id = $1 AND state = 'started'
"""
_PROBED_FAILED = """
UPDATE submissions SET state = 'failed', failure_reason = $2, finished_at = coalesce(finished_at, now()),
    updated_at = now()
WHERE submission_id = $1 AND state = 'started'
"""

# How long this deployment's jobs ran lately, start to Rekognition's completion time (notified ones only:
# a probed job's finish is when the probe found it).
_RECENT_RUN_S = """
SELECT percentile_cont(0.9) WITHIN GROUP (ORDER BY run_s), count(*)
FROM (SELECT extract(epoch FROM finished_at - started_at)::float8 AS run_s
      FROM submissions
      WHERE finished_at IS NOT NULL AND started_at IS NOT NULL AND probes = 0 AND finished_at >= started_at
      ORDER BY finished_at DESC
      LIMIT 50) recent
"""
_OPEN = "SELECT count(*) FROM submissions WHERE state = ANY(ARRAY['submitted', 'starting', 'started'])"
_BY_STATE = "SELECT state, count(*) AS n FROM submissions GROUP BY state"
_WAITING = "SELECT count(*) FROM submissions WHERE state = ANY(ARRAY['submitted', 'starting'])"

_INSERT = """
INSERT INTO submissions (video_bucket, video_name, api, options, options_key, client_request_token)
SELECT u.bucket, u.name, $3::face_api, $4::jsonb, $5, u.token
FROM unnest($1::text[], $2::text[], $6::text[]) AS u(bucket, name, token)
ON CONFLICT ON CONSTRAINT submissions_video_key DO NOTHING
RETURNING video_bucket, video_name
"""
_KNOWN = """
SELECT s.submission_id, s.video_bucket, s.video_name, s.state, s.generation
FROM submissions s, unnest($1::text[], $2::text[]) AS u(bucket, name)
WHERE s.video_bucket = u.bucket AND s.video_name = u.name AND s.api = $3::face_api AND s.options_key = $4
FOR UPDATE OF s
"""
_RESUBMIT = """
UPDATE submissions
SET generation = $2, client_request_token = $3, state = 'submitted', job_id = NULL, submitted_at = now(),
    claimed_at = NULL, started_at = NULL, finished_at = NULL, ingested_at = NULL, failure_reason = NULL,
    start_attempts = 0, next_attempt_at = now(), probes = 0, next_probe_at = NULL, updated_at = now()
WHERE submission_id = $1
"""
_LIST = """
SELECT video_bucket, video_name, api, state, job_id, submitted_at, started_at, finished_at, ingested_at,
       failure_reason, start_attempts, probes
FROM reporting.submissions
WHERE $1::text IS NULL OR state = $1
ORDER BY submitted_at, video_bucket, video_name
LIMIT $2
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """A submission claimed for a Start* call (state ``starting``)."""

    submission_id: int
    video: Video
    options: StartOptions
    generation: int
    token: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Probe:
    """A started submission whose completion notification is overdue."""

    submission_id: int
    job_id: str
    options: StartOptions
    video: Video
    started_at: datetime
    probes: int


@dataclass(frozen=True, slots=True)
class Recorded:
    new: int
    known: int
    resubmitted: int


def _options(api: str, raw: Any) -> StartOptions:
    data = orjson.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw)
    return StartOptions.from_json(Api(api), data)


class SubmissionStore:
    """The commands' statements (`submit`, `submissions`), each on a connection of its own."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    # --- submit ----------------------------------------------------------------------------------------

    async def record(self, videos: Sequence[Video], options: StartOptions, *, force: bool) -> Recorded:
        """Register ``videos`` in one transaction: new ones as submitted; known ones stay as they are
        unless ``force``, which resubmits those that are finished (ingested or failed) under a new token."""
        conn = await connect(self._dsn)  # its own, closed after: never a connection a subclass keeps
        try:
            async with conn.transaction():
                return await self._record(conn, videos, options, force=force)
        finally:
            await conn.close()

    async def _record(self, conn: asyncpg.Connection, videos: Sequence[Video], options: StartOptions, *,
                      force: bool) -> Recorded:
        buckets = [v.bucket for v in videos]
        names = [v.name for v in videos]
        tokens = [client_request_token(v, options, 1) for v in videos]
        options_json = orjson.dumps(options.as_json()).decode()
        inserted = await conn.fetch(_INSERT, buckets, names, options.api.value, options_json, options.key, tokens)
        new = len(inserted)
        resubmitted = 0
        if force and new < len(videos):
            known = await conn.fetch(_KNOWN, buckets, names, options.api.value, options.key)
            fresh = {(r["video_bucket"], r["video_name"]) for r in inserted}
            again = [r for r in known if (r["video_bucket"], r["video_name"]) not in fresh
                     and r["state"] in ("ingested", "failed")]
            for row in again:
                generation = int(row["generation"]) + 1
                token = client_request_token(Video(row["video_bucket"], row["video_name"]), options, generation)
                await conn.execute(_RESUBMIT, row["submission_id"], generation, token)
            resubmitted = len(again)
        return Recorded(new=new, known=len(videos) - new - resubmitted, resubmitted=resubmitted)

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await connect(self._dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def list(self, state: str | None, limit: int) -> list[Mapping[str, Any]]:
        return [dict(r) for r in await self._fetch(_LIST, state, limit)]

    async def counts(self) -> dict[str, int]:
        """Submissions by state (every state present, 0 where none)."""
        counts = dict.fromkeys(STATES, 0)
        counts.update({r["state"]: int(r["n"]) for r in await self._fetch(_BY_STATE)})
        return counts


class SchedulerStore(SubmissionStore):
    """The statements of `run`'s scheduler, on one connection it keeps (reopened after a failure).

    The scheduler's loop and the service's message handlers (``open_count``) share it: one statement or
    transaction at a time, under a lock.
    """

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(self._dsn)
        return self._conn

    @contextlib.asynccontextmanager
    async def _using(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._lock:
            conn = await self._connection()
            try:
                yield conn
            except BaseException:
                # Interrupted or failed mid-statement: the connection's state is unknown, so it goes (the
                # next call opens another); a transaction on it rolls back with it.
                await self.close()
                raise

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self._using() as conn:
            return list(await conn.fetch(sql, *args))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def open_count(self) -> int:
        """Submissions not started or still running at Rekognition."""
        return int((await self._fetch(_OPEN))[0][0])

    async def waiting_count(self) -> int:
        """Submissions not started yet (submitted, or claimed and starting)."""
        return int((await self._fetch(_WAITING))[0][0])

    async def claim(self, max_running: int, lease_s: float) -> Claim | None:
        """Take one submission to start, if a slot is free (or a stale claim waits); None when there is none."""
        async with self._using() as conn, conn.transaction():
            await conn.execute(_SLOTS_LOCK)
            running = int(await conn.fetchval(_RUNNING, list(RUNNING_STATES)))
            row = await conn.fetchrow(_CLAIM, float(lease_s), running < max_running)
        if row is None:
            return None
        return Claim(int(row["submission_id"]), Video(row["video_bucket"], row["video_name"]),
                     _options(row["api"], row["options"]), int(row["generation"]), row["client_request_token"],
                     int(row["start_attempts"]))

    async def started(self, claim: Claim, job_id: str, probe_after_s: float) -> None:
        async with self._using() as conn, conn.transaction():
            await conn.execute(_RECORD_STARTED, claim.submission_id, claim.generation, job_id, float(probe_after_s))
            await conn.execute(_CATCH_UP, claim.submission_id)

    async def retry_later(self, claim: Claim, delay_s: float) -> None:
        await self._fetch(_RETRY_LATER, claim.submission_id, claim.generation, float(delay_s))

    async def start_failed(self, claim: Claim, reason: str) -> None:
        await self._fetch(_START_FAILED, claim.submission_id, claim.generation, reason[:2000])

    async def claim_probe(self, first_after_s: float, cap_s: float, early_after_s: float | None = None
                          ) -> Probe | None:
        """One started job to probe: its notification overdue (``first_after_s`` after its start, then
        doubling up to ``cap_s``), or, for a first probe, running longer than ``early_after_s``."""
        early = first_after_s if early_after_s is None else min(early_after_s, first_after_s)
        rows = await self._fetch(_CLAIM_PROBE, float(first_after_s), float(cap_s), float(early))
        if not rows:
            return None
        row = rows[0]
        return Probe(int(row["submission_id"]), row["job_id"], _options(row["api"], row["options"]),
                     Video(row["video_bucket"], row["video_name"]), row["started_at"], int(row["probes"]))

    async def recent_run_s(self) -> tuple[float | None, int]:
        """The 90th percentile of how long the last 50 notified jobs ran, and how many there were."""
        p90, n = (await self._fetch(_RECENT_RUN_S))[0]
        return (None if p90 is None else float(p90)), int(n)

    async def probed_finished(self, probe: Probe) -> None:
        await self._fetch(_PROBED_FINISHED, probe.submission_id)

    async def probed_failed(self, probe: Probe, reason: str) -> None:
        await self._fetch(_PROBED_FAILED, probe.submission_id, reason[:2000])


def chunks(items: Iterable[Video], size: int) -> Iterable[list[Video]]:
    batch: list[Video] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
