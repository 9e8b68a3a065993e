"""The end of a job's data: `delete`, the retention purge of `run`, `erase` of one person, the erasure audit.

Every change to a job happens under the job's advisory lock (the store's key, ``hashtextextended(job_id,
0)``), waited for outside any transaction and held by the session across the change's short transactions
(worker/db/joblock.py), so it never interleaves with an ingest or a reprocess of that job, never holds
back vacuum while it waits, and other jobs are never locked at all. A job with more faces than
``chunk_faces`` is deleted in several short transactions: the first hides it (state failed, failure_code
``Deleting``, counters 0: out of every reporting view but job_summary) and drops its raw pages, persons and
collection faces; the next ones delete ``chunk_faces`` faces with their landmarks, emotions and matches
each; the last removes the jobs row. A run cut short leaves a hidden job that the next `delete` (or
retention pass) finishes, since ``ingested_at`` and ``updated_at`` are kept.

`erase` rewrites the archived raw pages as well as the rows, so `reprocess` cannot bring erased entries
back; ERASURE_HASH_KEY keys the audit's hash, so the audit never names the person it is about. It keeps
the hashes of what it erased, which every later write applies (worker/erased.py). A deleted or expired
job leaves a tombstone (worker/tombstones.py). Retention counts from when a job was first ingested
(``first_ingested_at``, kept across re-ingests) and also drops the rows of ingests that stopped part-way.

All SQL is unqualified (the search_path picks the schema) and children are deleted explicitly: nothing
here relies on foreign keys or cascades.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from worker import erased, metrics, tombstones
from worker.archive import ArchivedPage
from worker.config import Settings
from worker.db import schema
from worker.db.joblock import JobLockBusy, job_lock
from worker.db.store import drop_ingest, drop_stale_ingests
from worker.erased import selector_hash
from worker.errors import ConfigError, InvalidInput
from worker.ingest import failure_fingerprint
from worker.logs import get_logger

log = get_logger(__name__)

# Deleted in one go when a large job is hidden, before its faces go in chunks.
_HIDE_FIRST_TABLES = ("raw_pages", "persons", "collection_faces", "job_retries")
# A chunk of faces: their children first, then the faces.
_FACE_CHUNK_TABLES = ("landmarks", "emotions", "face_matches", "faces")
# The rows of an erased person's faces that hang off face_seq alone.
_FACE_DETAIL_TABLES = ("landmarks", "emotions")
# Every table that holds a job's data (schema.py keeps the list), then the jobs row itself, deleted last.
JOB_TABLES = (*(table.name for table in schema.JOB_TABLES), "jobs")
# The tables keyed by ingest key (ingests says whose); the others name the job itself.
_KEYED = frozenset(table.name for table in schema.KEYED_TABLES)
# Faces (with their ~40 landmarks, emotions and matches each) per delete transaction: 5000 full-attribute
# faces are ~200,000 rows, well under a second of work.
DEFAULT_CHUNK_FACES = 5000
# Jobs listed per retention query; each is then deleted on its own.
RETENTION_BATCH_JOBS = 50
# One replica purges at a time: a session-level advisory lock on a fixed key. JobIds cannot contain '.',
# so no job's lock (hashtextextended(job_id, 0)) can be this one.
RETENTION_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtextextended('worker.retention', 0))"
# The unlock also ends the session's event reason (below), before the connection goes back to the pool.
RETENTION_UNLOCK_SQL = ("SELECT pg_advisory_unlock(hashtextextended('worker.retention', 0)), "
                        "set_config('rekognition.event_reason', '', false)")
_DELETING = "Deleting"
# A job's lock held across the several transactions of a key's drop (released in the same pass).
_SESSION_TRY_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"
_SESSION_UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtextextended($1, 0))"

SelectorKind = Literal["external_image_id", "face_id", "user_id"]
SELECTOR_KINDS: tuple[SelectorKind, ...] = ("external_image_id", "face_id", "user_id")
# Which collection_faces column a selector names, as bound values only: no identifier is interpolated.
# With the kind known when the statement is planned, PostgreSQL drops the other branches and uses the
# column's index.
_FACES_IN_JOB = ("SELECT face_id FROM collection_faces WHERE ingest_id = $3 AND "
                 "(($1 = 'external_image_id' AND external_image_id = $2) OR ($1 = 'face_id' AND face_id = $2) "
                 "OR ($1 = 'user_id' AND user_id = $2))")
_FACES = ("SELECT DISTINCT face_id FROM collection_faces WHERE "
          "(($1 = 'external_image_id' AND external_image_id = $2) OR ($1 = 'face_id' AND face_id = $2) "
          "OR ($1 = 'user_id' AND user_id = $2))")
# Keys whose rows no jobs row names (an ingest being written or replaced, an attempt that stopped) are looked
# at too: their job is erased once its lock is free, the keys it no longer names dropped first.
# The bulk tables are read in uncorrelated IN subqueries, never joined to ingests or jobs: on Citus those are
# coordinator tables and the bulk tables distributed, and Citus runs such a subquery first and hands its keys
# to the rest ("direct joins between distributed and local tables are not supported"); PostgreSQL plans the
# same semi-joins as before.
_JOBS_OF = ("SELECT i.job_id FROM ingests i WHERE i.ingest_id IN ("
            "SELECT c.ingest_id FROM collection_faces c WHERE "
            "(($1 = 'external_image_id' AND c.external_image_id = $2) OR ($1 = 'face_id' AND c.face_id = $2) "
            "OR ($1 = 'user_id' AND c.user_id = $2)) "
            "UNION SELECT m.ingest_id FROM face_matches m WHERE m.face_id = ANY($3::text[])) "
            "UNION SELECT i.job_id FROM ingests i "
            "WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.ingest_id = i.ingest_id) "
            "UNION SELECT j.job_id FROM jobs j WHERE j.api = 'FACE_SEARCH' AND j.ingest_state <> 'ingested' "
            "AND j.ingest_id IN (SELECT r.ingest_id FROM raw_pages r WHERE r.ingest_id IN ("
            "SELECT k.ingest_id FROM jobs k WHERE k.api = 'FACE_SEARCH' AND k.ingest_state <> 'ingested')) "
            "ORDER BY 1")
# The member of FaceMatch.Face that each selector names, in the raw pages.
_PAGE_MEMBER = {"external_image_id": "ExternalImageId", "face_id": "FaceId", "user_id": "UserId"}


async def _driver(sa_conn: Any) -> asyncpg.Connection:
    raw = await sa_conn.get_raw_connection()
    return raw.driver_connection


def _affected(status: str) -> int:
    """Rows affected, from a command tag such as ``DELETE 12``."""
    return int(status.rsplit(" ", 1)[-1])


# --- delete ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class JobRemoval:
    """What deleting one job removed (or, in a dry run, would remove): rows per table."""

    job_id: str
    api: str | None
    state: str | None
    rows: dict[str, int] = field(default_factory=dict)
    outcome: Literal["deleted", "would delete", "busy", "missing", "reingested"] = "deleted"
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.rows.values())


async def _keys(conn: asyncpg.Connection, job_id: str) -> list[int]:
    """Every ingest key of the job: the current one, and any other (replaced, stopped, being written)."""
    return [r["ingest_id"] for r in await conn.fetch("SELECT ingest_id FROM ingests WHERE job_id = $1", job_id)]


async def count_job_rows(conn: asyncpg.Connection, job_id: str) -> dict[str, int]:
    """Rows of ``job_id`` in every table that holds job data (under any of its keys)."""
    counts: dict[str, int] = {}
    keys = await _keys(conn, job_id)
    for table in JOB_TABLES:
        if table in _KEYED:
            counts[table] = int(await conn.fetchval(f"SELECT count(*) FROM {table} WHERE ingest_id = ANY($1::int[])",
                                                    keys))
        else:
            counts[table] = int(await conn.fetchval(f"SELECT count(*) FROM {table} WHERE job_id = $1", job_id))
    return counts


async def _delete_all(conn: asyncpg.Connection, job_id: str, rows: dict[str, int]) -> None:
    keys = await _keys(conn, job_id)
    for table in JOB_TABLES:
        if table in _KEYED:
            status = await conn.execute(f"DELETE FROM {table} WHERE ingest_id = ANY($1::int[])", keys)
        else:
            status = await conn.execute(f"DELETE FROM {table} WHERE job_id = $1", job_id)
        rows[table] = rows.get(table, 0) + _affected(status)


async def delete_job(conn: asyncpg.Connection, job_id: str, *, wait: bool = True,
                     chunk_faces: int = DEFAULT_CHUNK_FACES, why: str = "deleted") -> JobRemoval:
    """Delete every row and raw page of ``job_id``, in short transactions under the job's lock, which is
    waited for outside any transaction (worker/db/joblock.py) and held until the last one, leaving a
    tombstone (``why``: deleted, or expired by retention) in the first one, so that no later notification,
    backfill or retry brings the job back (worker/tombstones.py).

    ``wait=False`` (retention) gives up with outcome ``busy`` when the job is being written right now.
    """
    started = time.monotonic()
    removal = JobRemoval(job_id, None, None)
    try:
        async with job_lock(conn, job_id, wait=wait):
            await _delete_locked(conn, job_id, removal, chunk_faces, why)
    except JobLockBusy:
        removal.outcome = "busy"
    removal.seconds = round(time.monotonic() - started, 3)
    return removal


async def _delete_locked(conn: asyncpg.Connection, job_id: str, removal: JobRemoval, chunk_faces: int,
                         why: str) -> None:
    rows = removal.rows
    async with conn.transaction():
        job = await conn.fetchrow("SELECT api::text AS api, ingest_state::text AS state, failure_code "
                                  "FROM jobs WHERE job_id = $1", job_id)
        removal.api, removal.state = (job["api"], job["state"]) if job is not None else (None, None)
        keys = await _keys(conn, job_id)
        if job is not None or keys:
            await tombstones.bury(conn, job_id, removal.api, why)
        top = await conn.fetchval("SELECT max(face_seq) FROM faces WHERE ingest_id = ANY($1::int[])", keys)
        if top is None or top < chunk_faces:
            await _delete_all(conn, job_id, rows)
            if removal.total == 0:
                removal.outcome = "missing"
            return
        # Too large for one short transaction: hide it first, and drop the archive (the biometric source).
        await conn.execute(
            "UPDATE jobs SET ingest_state = 'failed', failure_code = $2, "
            "failure_reason = 'being deleted: rows are removed in batches', pages = 0, faces = 0, persons = 0, "
            "face_matches = 0, collection_faces = 0, landmarks = 0, emotions = 0 WHERE job_id = $1",
            job_id, _DELETING)
        for table in _HIDE_FIRST_TABLES:
            if table in _KEYED:
                status = await conn.execute(f"DELETE FROM {table} WHERE ingest_id = ANY($1::int[])", keys)
            else:
                status = await conn.execute(f"DELETE FROM {table} WHERE job_id = $1", job_id)
            rows[table] = _affected(status)
    for low in range(0, top + 1, chunk_faces):
        async with conn.transaction():
            if not await _still_deleting(conn, job_id):
                removal.outcome = "reingested"
                return
            for table in _FACE_CHUNK_TABLES:
                rows[table] = rows.get(table, 0) + _affected(await conn.execute(
                    f"DELETE FROM {table} WHERE ingest_id = ANY($1::int[]) AND face_seq >= $2 AND face_seq < $3",
                    keys, low, low + chunk_faces))
    async with conn.transaction():
        if not await _still_deleting(conn, job_id):
            removal.outcome = "reingested"
            return
        await _delete_all(conn, job_id, rows)


async def _still_deleting(conn: asyncpg.Connection, job_id: str) -> bool:
    """False when an ingest rewrote the job between two batches: its new rows are not ours to delete."""
    code = await conn.fetchrow("SELECT failure_code FROM jobs WHERE job_id = $1", job_id)
    return code is None or code["failure_code"] == _DELETING


# The retention clock: when the job's results were first stored (kept across re-ingests and reprocess); the
# last ingested_at too, for a row the store has not rewritten since first_ingested_at exists: the clock is
# least(first_ingested_at, ingested_at) in both statements below.
_INGESTED_BEFORE_SQL = ("SELECT job_id FROM jobs WHERE least(first_ingested_at, ingested_at) < $1 "
                        "ORDER BY least(first_ingested_at, ingested_at), job_id")


async def jobs_ingested_before(conn: asyncpg.Connection, before: datetime) -> list[str]:
    """Exactly the jobs first ingested before ``before`` (``first_ingested_at``: a re-ingest, `reprocess` or
    `jobs retry` does not move it). A job never ingested is not among them (retention purges failed jobs by
    updated_at); a job hidden by an interrupted delete keeps its times."""
    return [r["job_id"] for r in await conn.fetch(_INGESTED_BEFORE_SQL, before)]


async def run_delete(settings: Settings, job_ids: list[str], *, ingested_before: datetime | None = None,
                     dry_run: bool = False, chunk_faces: int = DEFAULT_CHUNK_FACES) -> list[JobRemoval]:
    """The `delete` command: the named jobs, or every job ingested before ``ingested_before``."""
    from worker.db.engine import create_engine

    engine = create_engine(settings, pool_size=1)
    try:
        async with engine.connect() as sa_conn:
            conn = await _driver(sa_conn)
            if ingested_before is not None:
                job_ids = await jobs_ingested_before(conn, ingested_before)
            out: list[JobRemoval] = []
            for job_id in job_ids:
                if dry_run:
                    job = await conn.fetchrow("SELECT api::text AS api, ingest_state::text AS state FROM jobs "
                                              "WHERE job_id = $1", job_id)
                    removal = JobRemoval(job_id, job and job["api"], job and job["state"],
                                         await count_job_rows(conn, job_id), "would delete")
                    if removal.total == 0:
                        removal.outcome = "missing"
                else:
                    removal = await delete_job(conn, job_id, chunk_faces=chunk_faces)
                    log.info("job deleted", job_id=job_id, outcome=removal.outcome, rows=removal.total,
                             seconds=removal.seconds)
                out.append(removal)
            return out
    finally:
        await engine.dispose()


# --- retention ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class PurgeResult:
    """One retention pass."""

    cutoff: datetime
    jobs: int = 0
    busy: int = 0
    stopped_ingests: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


_EXPIRED_SQL = """
SELECT job_id FROM jobs
WHERE (least(first_ingested_at, ingested_at) < $1 OR (ingest_state = 'failed' AND updated_at < $1))
  AND NOT (job_id = ANY($2::text[]))
ORDER BY coalesce(least(first_ingested_at, ingested_at), updated_at), job_id
LIMIT $3
"""
# Keys no jobs row names: an ingest being written, or one that stopped (OOM, a lost node) for a job still
# pending or for a backfill that died before the job had a row. Only those whose job nobody holds go.
_UNNAMED_KEYS_SQL = """
SELECT i.ingest_id, i.job_id FROM ingests i
WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.ingest_id = i.ingest_id) AND NOT (i.ingest_id = ANY($1::int[]))
ORDER BY i.ingest_id
LIMIT $2
"""


async def purge_expired(engine: AsyncEngine, retention_days: float, *, now: datetime,
                        stop: asyncio.Event | None = None, batch_jobs: int = RETENTION_BATCH_JOBS,
                        chunk_faces: int = DEFAULT_CHUNK_FACES) -> PurgeResult | None:
    """Delete the jobs ingested before ``now - retention_days``, and the failed jobs last updated before it
    (their quarantined raw pages are biometric data too). None when another replica is purging right now.

    A job being written right now is skipped (the next pass gets it), so a purge never waits on an ingest.
    """
    started = time.monotonic()
    result = PurgeResult(cutoff=now - timedelta(days=retention_days))
    async with engine.connect() as sa_conn:
        conn = await _driver(sa_conn)
        if not await conn.fetchval(RETENTION_LOCK_SQL):
            return None
        try:
            # The job.deleted events of this session's deletes say the retention purge made them (0014's trigger).
            await conn.execute("SELECT set_config('rekognition.event_reason', 'retention', false)")
            skipped: list[str] = []
            while stop is None or not stop.is_set():
                ids = [r["job_id"] for r in await conn.fetch(_EXPIRED_SQL, result.cutoff, skipped, batch_jobs)]
                if not ids:
                    break
                for job_id in ids:
                    if stop is not None and stop.is_set():
                        break
                    removal = await delete_job(conn, job_id, wait=False, chunk_faces=chunk_faces, why="expired")
                    if removal.outcome in ("busy", "reingested"):
                        result.busy += 1
                        skipped.append(job_id)
                        continue
                    result.jobs += 1
                    for table, n in removal.rows.items():
                        result.rows[table] = result.rows.get(table, 0) + n
                        metrics.RETENTION_ROWS_PURGED.labels(table).inc(n)
            await _purge_stopped_ingests(conn, result, stop, batch_jobs)
        finally:
            await _unlock_retention(sa_conn, conn)
    result.seconds = round(time.monotonic() - started, 3)
    return result


async def _purge_stopped_ingests(conn: asyncpg.Connection, result: PurgeResult, stop: asyncio.Event | None,
                                 batch: int) -> None:
    """Drop the rows of every key no jobs row names and no running ingest holds, whatever its age: they are
    nobody's data, and a job that is pending (or has no row at all) is never reached by the clock above.

    A writer holds the job's session lock for its whole ingest, so a key whose job lock is free is not being
    written; it is checked to be unnamed again once the lock is held.
    """
    busy: list[int] = []
    while stop is None or not stop.is_set():
        found = await conn.fetch(_UNNAMED_KEYS_SQL, busy, batch)
        if not found:
            return
        for r in found:
            key, job_id = r["ingest_id"], r["job_id"]
            if not await conn.fetchval(_SESSION_TRY_LOCK_SQL, job_id):
                busy.append(key)
                continue
            try:
                if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM jobs WHERE ingest_id = $1)", key):
                    busy.append(key)  # the ingest switched to it meanwhile: the job's own rows now
                    continue
                rows: dict[str, int] = {}
                await drop_ingest(conn, key, rows=rows)
            finally:
                async with asyncio.timeout(5.0):  # a broken connection fails here, and the caller discards it
                    await conn.execute(_SESSION_UNLOCK_SQL, job_id)
            result.stopped_ingests += 1
            log.info("rows of a stopped ingest purged", job_id=job_id, ingest_id=key, rows=sum(rows.values()))
            for table, n in rows.items():
                result.rows[table] = result.rows.get(table, 0) + n
                metrics.RETENTION_ROWS_PURGED.labels(table).inc(n)


async def _unlock_retention(sa_conn: Any, conn: asyncpg.Connection) -> None:
    # Runs on cancel paths too: bounded, and a connection that cannot unlock is thrown away (which unlocks).
    try:
        async with asyncio.timeout(5.0):
            await conn.execute(RETENTION_UNLOCK_SQL)
    except BaseException:
        await sa_conn.invalidate()
        raise


async def retention_loop(engine: AsyncEngine, settings: Settings, stop: asyncio.Event, *,
                         clock: Callable[[], datetime] = lambda: datetime.now(tz=UTC)) -> None:
    """`run`'s retention: a purge pass every RETENTION_INTERVAL_S until ``stop`` is set. Never raises
    for a failed pass (the next one tries again)."""
    assert settings.retention_days is not None
    while not stop.is_set():
        try:
            result = await purge_expired(engine, settings.retention_days, now=clock(), stop=stop)
        except Exception as exc:
            metrics.RETENTION_PASSES.labels("error").inc()
            log.error("retention pass failed", error=f"{type(exc).__name__}: {exc}"[:500])
        else:
            if result is None:
                metrics.RETENTION_PASSES.labels("skipped").inc()
                log.info("retention pass skipped: another replica is purging")
            else:
                metrics.RETENTION_PASSES.labels("done").inc()
                log.info("retention pass", cutoff=result.cutoff.isoformat(), jobs=result.jobs, busy=result.busy,
                         stopped_ingests=result.stopped_ingests,
                         rows=sum(result.rows.values()), rows_by_table=result.rows, seconds=result.seconds)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.retention_interval_s):
                await stop.wait()


# --- erase -------------------------------------------------------------------------------------------


ERASE_COUNTS = ("jobs", "collection_faces", "face_matches", "persons", "faces", "landmarks", "emotions",
                "pages_rewritten")
# The counts only the identity found in the data raises: none of them, and the erase matched nothing (a
# typo, or an identity erased before). The audit row is kept even then, every count 0: the request is on record.
IDENTITY_COUNTS = ERASE_COUNTS[1:]


@dataclass(slots=True)
class Erasure:
    """What `erase` removed (or, dry, would remove): totals, and the jobs it touched."""

    kind: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERASE_COUNTS, 0))
    job_ids: list[str] = field(default_factory=list)
    audit_id: int | None = None
    seconds: float = 0.0

    @property
    def matched(self) -> bool:
        return any(self.counts[name] for name in IDENTITY_COUNTS)


# Whether a collection face (FaceMatch.Face of a page) is one being erased.
FacePredicate = Callable[[dict[str, Any]], bool]


def _selector(member: str, value: str) -> FacePredicate:
    return lambda face: face.get(member) == value


def _scan_page(body: Any, erased_face: FacePredicate, face_ids: set[str], matched: dict[int, set[str]]) -> None:
    """Add the FaceIds whose Face ``erased_face`` picks on this page to ``face_ids``, and each person's
    matched FaceIds to ``matched`` (person index -> FaceIds)."""
    for element in body.get("Persons") or () if isinstance(body, dict) else ():
        if not isinstance(element, dict):
            continue
        person = element.get("Person")
        index = person.get("Index") if isinstance(person, dict) else None
        for match in element.get("FaceMatches") or ():
            face = match.get("Face") if isinstance(match, dict) else None
            face_id = face.get("FaceId") if isinstance(face, dict) else None
            if not isinstance(face_id, str):
                continue
            if erased_face(face):  # type: ignore[arg-type]
                face_ids.add(face_id)
            if type(index) is int:
                matched.setdefault(index, set()).add(face_id)


def _match_face_id(match: Any) -> str | None:
    face = match.get("Face") if isinstance(match, dict) else None
    return face.get("FaceId") if isinstance(face, dict) else None


def _rewrite_page(body: dict[str, Any], member: str, value: str, face_ids: set[str], persons: set[int]) -> bool:
    """Drop the erased persons' elements and every FaceMatch naming an erased face; True when it changed."""
    return _rewrite_page_by(body, _selector(member, value), face_ids, persons)


def _rewrite_page_by(body: dict[str, Any], erased_face: FacePredicate, face_ids: set[str], persons: set[int]) -> bool:
    elements = body.get("Persons") if isinstance(body, dict) else None
    if not isinstance(elements, list):
        return False
    kept: list[Any] = []
    changed = False
    for element in elements:
        person = element.get("Person") if isinstance(element, dict) else None
        index = person.get("Index") if isinstance(person, dict) else None
        if type(index) is int and index in persons:
            changed = True
            continue
        matches = element.get("FaceMatches") if isinstance(element, dict) else None
        if isinstance(matches, list):
            remaining = [m for m in matches if _match_face_id(m) not in face_ids
                         and not (isinstance(m, dict) and isinstance(m.get("Face"), dict) and erased_face(m["Face"]))]
            if len(remaining) != len(matches):
                element["FaceMatches"] = remaining
                changed = True
        kept.append(element)
    body["Persons"] = kept
    return changed


async def _page(conn: asyncpg.Connection, key: int, page_no: int) -> Any:
    row = await conn.fetchrow("SELECT encoding, body, body_bytes FROM raw_pages WHERE ingest_id = $1 AND page_no = $2",
                              key, page_no)
    return orjson.loads(ArchivedPage(bytes(row["body"]), row["body_bytes"], row["encoding"]).decompress())


async def _erase_in_job(conn: asyncpg.Connection, job_id: str, kind: SelectorKind, value: str,
                        global_face_ids: set[str], counts: dict[str, int], found: set[str] | None = None) -> bool:
    """Erase from one job, in the caller's transaction (which holds the job's lock). True when it changed.
    ``found`` collects the FaceIds erased (the erased identifiers keep them)."""
    # Rows the job no longer names (a replaced ingest, an attempt that stopped) go whole: nobody reads them.
    stale = await drop_stale_ingests(conn, job_id)
    key = await conn.fetchval("SELECT ingest_id FROM jobs WHERE job_id = $1", job_id)
    if key is None:
        return stale > 0
    face_ids = set(global_face_ids)
    face_ids.update(r["face_id"] for r in await conn.fetch(_FACES_IN_JOB, kind, value, key))
    if kind == "face_id":
        face_ids.add(value)
    removed = await erase_in_key(conn, key, face_ids, _selector(_PAGE_MEMBER[kind], value))
    if found is not None:
        found.update(face_ids)
    # The counters are the reporting views' job summary: they must keep equalling the rows.
    await conn.execute(
        "UPDATE jobs SET faces = greatest(0, faces - $2), persons = greatest(0, persons - $3), "
        "face_matches = greatest(0, face_matches - $4), collection_faces = greatest(0, collection_faces - $5), "
        "landmarks = greatest(0, landmarks - $6), emotions = greatest(0, emotions - $7) WHERE job_id = $1",
        job_id, removed["faces"], removed["persons"], removed["face_matches"], removed["collection_faces"],
        removed["landmarks"], removed["emotions"])
    for name, n in removed.items():
        counts[name] += n
    return stale > 0 or any(removed.values())


async def erase_in_key(conn: asyncpg.Connection, key: int, face_ids: set[str], erased_face: FacePredicate, *,
                       pages_key: int | None = None) -> dict[str, int]:
    """Remove from ingest key ``key`` the faces ``face_ids`` (and those ``erased_face`` picks on its pages),
    every match to them and the persons that matched them with all their faces, and rewrite the raw pages
    of ``pages_key`` (default ``key``) without them; in the caller's transaction, under the job's lock.
    ``face_ids`` grows by the FaceIds found on the pages. Returns what went (``pages_rewritten`` included);
    the jobs row is the caller's."""
    pages_of = key if pages_key is None else pages_key
    # Two passes over the archive, one decoded page at a time: which faces and persons go, then the rewrite.
    page_numbers = [r["page_no"] for r in await conn.fetch(
        "SELECT page_no FROM raw_pages WHERE ingest_id = $1 ORDER BY page_no", pages_of)]
    matched: dict[int, set[str]] = {}
    for page_no in page_numbers:
        _scan_page(await _page(conn, pages_of, page_no), erased_face, face_ids, matched)
    persons = {r["person_index"] for r in await conn.fetch(
        "SELECT DISTINCT f.person_index FROM face_matches m JOIN faces f ON f.ingest_id = m.ingest_id "
        "AND f.face_seq = m.face_seq WHERE m.ingest_id = $1 AND m.face_id = ANY($2::text[]) "
        "AND f.person_index IS NOT NULL", key, list(face_ids))}
    persons |= {index for index, ids in matched.items() if ids & face_ids}
    seqs = [r["face_seq"] for r in await conn.fetch(
        "SELECT face_seq FROM faces WHERE ingest_id = $1 AND person_index = ANY($2::bigint[])", key, list(persons))]
    removed = dict.fromkeys(("landmarks", "emotions", "face_matches", "faces", "persons", "collection_faces"), 0)
    for table in _FACE_DETAIL_TABLES:
        # One row per face, its landmarks (emotions) as arrays: the counters and the audit count the elements.
        removed[table] = int(await conn.fetchval(
            f"WITH gone AS (DELETE FROM {table} WHERE ingest_id = $1 AND face_seq = ANY($2::int[]) "
            f"RETURNING cardinality(types) AS n) SELECT coalesce(sum(n), 0) FROM gone", key, seqs))
    removed["face_matches"] = _affected(await conn.execute(
        "DELETE FROM face_matches WHERE ingest_id = $1 AND (face_seq = ANY($2::int[]) OR face_id = ANY($3::text[]))",
        key, seqs, list(face_ids)))
    removed["faces"] = _affected(await conn.execute(
        "DELETE FROM faces WHERE ingest_id = $1 AND face_seq = ANY($2::int[])", key, seqs))
    removed["persons"] = _affected(await conn.execute(
        "DELETE FROM persons WHERE ingest_id = $1 AND person_index = ANY($2::bigint[])", key, list(persons)))
    # The erased faces, and any collection face that only the erased persons matched: collection_faces holds
    # the faces a job's matches name, and a reprocess would not derive those rows again.
    removed["collection_faces"] = _affected(await conn.execute(
        "DELETE FROM collection_faces c WHERE c.ingest_id = $1 AND (c.face_id = ANY($2::text[]) OR NOT EXISTS "
        "(SELECT 1 FROM face_matches m WHERE m.face_id = c.face_id AND m.ingest_id = c.ingest_id))",
        key, list(face_ids)))
    pages_rewritten = 0
    for page_no in page_numbers:
        body = await _page(conn, pages_of, page_no)
        if _rewrite_page_by(body, erased_face, face_ids, persons):
            new = ArchivedPage.compress(orjson.dumps(body))
            await conn.execute("UPDATE raw_pages SET encoding = $3, body = $4, body_bytes = $5 "
                               "WHERE ingest_id = $1 AND page_no = $2", pages_of, page_no, new.encoding, new.body,
                               new.raw_bytes)
            pages_rewritten += 1
    removed["pages_rewritten"] = pages_rewritten
    return removed


# Every text column that can quote a value of a page, or an error about one: failure reasons (copied from
# jobs to submissions by the trigger of revision 0011 and by the scheduler's reconcile), Rekognition's
# StatusMessage, and the retry bookkeeping (whose fingerprint is the error with its numbers blanked, $2).
_SCRUB_JOBS = (
    "UPDATE jobs SET failure_reason = replace(failure_reason, $1, '[erased]'), "
    "status_message = replace(status_message, $1, '[erased]') "
    "WHERE strpos(failure_reason, $1) > 0 OR strpos(status_message, $1) > 0")
_SCRUB_SUBMISSIONS = (
    "UPDATE submissions SET failure_reason = replace(failure_reason, $1, '[erased]') "
    "WHERE strpos(failure_reason, $1) > 0")
_SCRUB_RETRIES = (
    "UPDATE job_retries SET last_error = replace(last_error, $1, '[erased]'), "
    "last_outage = replace(last_outage, $1, '[erased]'), "
    "fingerprint = replace(replace(fingerprint, $1, '[erased]'), $2, '[erased]') "
    "WHERE strpos(last_error, $1) > 0 OR strpos(last_outage, $1) > 0 OR strpos(fingerprint, $1) > 0 "
    "OR strpos(fingerprint, $2) > 0")


async def scrub_free_text(conn: asyncpg.Connection, value: str) -> None:
    """Replace ``value`` by ``[erased]`` wherever free text quotes it, in the caller's transaction (the
    trigger that copies failure reasons to submissions does not fire on these updates)."""
    blanked = failure_fingerprint(Exception(value)).removeprefix("Exception: ")
    if blanked == value or not blanked.strip("#"):
        blanked = value  # nothing blanked, or nothing but blanks: replacing it would hit unrelated numbers
    await conn.execute(_SCRUB_JOBS, value)
    await conn.execute(_SCRUB_SUBMISSIONS, value)
    await conn.execute(_SCRUB_RETRIES, value, blanked)


async def _erase_candidates(conn: asyncpg.Connection, kind: SelectorKind, value: str) -> tuple[set[str], list[str]]:
    """The erased FaceIds known from the rows, and the jobs to look at: those whose rows name the faces, and
    every face search job with raw pages but no ingested rows (quarantined pages are read, not trusted)."""
    face_ids = {r["face_id"] for r in await conn.fetch(_FACES, kind, value)}
    if kind == "face_id":
        face_ids.add(value)
    jobs = await conn.fetch(_JOBS_OF, kind, value, list(face_ids))
    return face_ids, [r["job_id"] for r in jobs]


async def erase(conn: asyncpg.Connection, kind: SelectorKind, value: str, *, key: str,
                dry_run: bool = False) -> Erasure:
    """Erase an identifier from every job: see README "Erasure". A dry run computes the same counts inside
    transactions it rolls back."""
    if kind not in SELECTOR_KINDS:
        raise InvalidInput(f"unknown selector {kind!r}")
    if not value:
        raise InvalidInput("the identifier to erase is empty")
    started = time.monotonic()
    result = Erasure(kind)
    if not dry_run:
        # Kept before any job is looked at: an ingest that switches from now on removes the identifier itself
        # (worker/erased.py), and one still being written is among the jobs listed next (its key is unnamed).
        await erased.remember(conn, key, [(kind, value)])
    face_ids, job_ids = await _erase_candidates(conn, kind, value)
    found = set(face_ids)
    if not dry_run:
        await erased.remember(conn, key, [("face_id", face_id) for face_id in face_ids])
    for job_id in job_ids:
        found_before = sum(result.counts[name] for name in IDENTITY_COUNTS)
        # The job's lock is waited for with no transaction open (an ingest may hold it for minutes).
        async with job_lock(conn, job_id):
            tx = conn.transaction()
            await tx.start()
            try:
                changed = await _erase_in_job(conn, job_id, kind, value, face_ids, result.counts, found)
            except BaseException:
                await tx.rollback()
                raise
            if dry_run:
                await tx.rollback()
            else:
                await tx.commit()
        # A job counts when the identity was in it, not when only stale rows of another ingest were dropped.
        if changed and sum(result.counts[name] for name in IDENTITY_COUNTS) > found_before:
            result.counts["jobs"] += 1
            result.job_ids.append(job_id)
    if not dry_run:
        # Free text that may quote a value of a page (an error message naming a malformed member).
        async with conn.transaction():
            await scrub_free_text(conn, value)
            await erased.remember(conn, key, [("face_id", face_id) for face_id in found - face_ids])
            c = result.counts
            result.audit_id = await conn.fetchval(
                "INSERT INTO erasures (selector_kind, selector_hash, jobs, collection_faces, face_matches, persons, "
                "faces, landmarks, emotions, pages_rewritten) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
                "RETURNING id", kind, selector_hash(key, kind, value), c["jobs"], c["collection_faces"],
                c["face_matches"], c["persons"], c["faces"], c["landmarks"], c["emotions"], c["pages_rewritten"])
    result.seconds = round(time.monotonic() - started, 3)
    return result


async def run_erase(settings: Settings, kind: SelectorKind, value: str, *, dry_run: bool = False) -> Erasure:
    """The `erase` command. Refuses to run without ERASURE_HASH_KEY: the audit must not name the person."""
    from worker.db.engine import create_engine

    if not settings.erasure_hash_key:
        raise ConfigError("ERASURE_HASH_KEY is not set: erase records a keyed hash of the identifier in the "
                          "erasures audit and refuses to run without the key")
    engine = create_engine(settings, pool_size=1)
    try:
        async with engine.connect() as sa_conn:
            result = await erase(await _driver(sa_conn), kind, value, key=settings.erasure_hash_key,
                                 dry_run=dry_run)
        log.info("erase finished" if not dry_run else "erase dry run", selector_kind=kind, audit_id=result.audit_id,
                 seconds=result.seconds, **result.counts)
        return result
    finally:
        await engine.dispose()
