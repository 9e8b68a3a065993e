"""The store: atomic, idempotent writes of a job's rows, in short transactions.

Each ingest writes its rows under a fresh key (``ingest_id``, registered in ``ingests``), page by page,
one short transaction per page: nobody reads a key that no ``jobs`` row names. When the last page is in,
one short transaction derives nothing more, clears the retries and points ``jobs.ingest_id`` at the new
key (with the counters and state ``ingested``): readers, which join the bulk tables on ``jobs.ingest_id``,
see either the previous ingest or the new one, never a mix, and re-ingesting converges to exactly the rows
of one ingest. The previous key's rows (and those of any attempt that crashed) are deleted afterwards in
short transactions. A session-level advisory lock on the JobId, held for the whole ingest without a
transaction, serializes writers of the same job across processes; the loser backs off (JobBusy) instead
of writing twice. A crash leaves its key's rows unnamed by ``jobs``: invisible, and removed by the next
writer, failure, delete or retention pass of the job.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker import erased, metrics, normalize, pagecopy, pgcopy, tombstones
from worker.archive import ArchivedPage
from worker.db import schema
from worker.db.joblock import job_lock
from worker.errors import TransientError, WorkerError
from worker.messages import JobRef
from worker.normalize import JobMeta, PageRows
from worker.pagecopy import PageCopy

RESULT_TABLES = tuple(t.name for t in schema.KEYED_TABLES)
# COPY column lists: the normalizer's tuple order, by name (COPY takes the columns in any order; the tables
# lay theirs out against alignment padding). tests/test_schema.py holds them to schema.py's columns.
FACE_COLUMNS = normalize.FACE_COLUMNS
LANDMARK_COLUMNS = normalize.LANDMARK_COLUMNS
EMOTION_COLUMNS = normalize.EMOTION_COLUMNS
MATCH_COLUMNS = normalize.MATCH_COLUMNS
COLLECTION_FACE_COLUMNS = normalize.COLLECTION_FACE_COLUMNS
# Faces (with their ~40 landmarks, emotions and matches each) per transaction when a key's rows are deleted:
# 5000 full-attribute faces are ~200,000 rows, well under a second of work.
DROP_CHUNK_FACES = 5000
# Children first, then the faces they hang off; then what is keyed by the ingest alone.
_FACE_CHUNK_TABLES = ("landmarks", "emotions", "face_matches", "faces")
_KEY_TABLES = ("persons", "collection_faces", "raw_pages", "ingests")
_DROP_TABLES = (*_FACE_CHUNK_TABLES, *_KEY_TABLES)
# Everything a key holds, for the one-transaction drop of a failure record.
_KEYED_AND_INGESTS = (*RESULT_TABLES, "ingests")
# Held by a writer for a whole ingest without a transaction (released by _unlock, or with the session).
_SESSION_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"
_SESSION_UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtextextended($1, 0))"
# Keys of the job other than the one its jobs row names: a replaced ingest, or attempts that stopped.
_STALE_KEYS_SQL = ("SELECT i.ingest_id FROM ingests i WHERE i.job_id = $1 AND i.ingest_id IS DISTINCT FROM "
                   "(SELECT j.ingest_id FROM jobs j WHERE j.job_id = $1) ORDER BY i.ingest_id")
# Read-only: is the job's lock (above) held by some session? A 64-bit advisory key shows in pg_locks
# as classid (high 32 bits), objid (low 32 bits) and objsubid 1. Looking, not trying, so the check
# never makes a real writer elsewhere find the job busy.
_LOCKED_SQL = """
SELECT EXISTS (
    SELECT 1 FROM pg_locks l, (SELECT hashtextextended($1, 0) AS k) key
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = ((key.k >> 32) & 4294967295)::oid AND l.objid = (key.k & 4294967295)::oid)
"""
_INGESTED_SINCE_SQL = ("SELECT EXISTS (SELECT 1 FROM jobs WHERE job_id = $1 AND ingest_state = 'ingested' "
                       "AND ingested_at >= $2)")


class JobBusy(TransientError):
    """Another process is writing this job right now."""


class AlreadyIngested(WorkerError):
    """Under the job's lock, the job turned out to be ingested after the notification: a duplicate."""


@dataclass(slots=True)
class WriteCounts:
    pages: int = 0
    faces: int = 0
    landmarks: int = 0
    emotions: int = 0
    face_matches: int = 0
    collection_faces: int = 0
    persons: int = 0
    rows: int = 0


def _meta_values(meta: JobMeta | None) -> tuple[Any, ...]:
    if meta is None:
        return (None,) * 13
    return (
        meta.job_status, meta.status_message, meta.job_tag, meta.video_bucket, meta.video_name,
        meta.video_version, meta.codec, meta.duration_ms, meta.video_format, meta.frame_rate,
        meta.frame_height, meta.frame_width, meta.color_range,
    )


def _ms_to_dt(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


_META_COLS = ("job_status, status_message, job_tag, video_bucket, video_name, video_version, video_codec, "
              "duration_ms, video_format, frame_rate, frame_height, frame_width, color_range")
_META_UPDATE = ", ".join(f"{c.strip()} = EXCLUDED.{c.strip()}" for c in _META_COLS.split(","))

_UPSERT_INGESTED = f"""
INSERT INTO jobs (job_id, api, {_META_COLS}, ingest_state, failure_code, failure_reason,
                  pages, faces, persons, face_matches, collection_faces, landmarks, emotions,
                  attempts, notified_at, completed_at, ingest_started_at, ingested_at, updated_at, ingest_id,
                  first_ingested_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 'ingested', NULL, NULL,
        $16, $17, $25, $18, $19, $20, $21,
        1, $22, $22, $23, statement_timestamp(), statement_timestamp(), $24, statement_timestamp())
ON CONFLICT (job_id) DO UPDATE SET
    api = EXCLUDED.api, {_META_UPDATE},
    ingest_state = 'ingested', failure_code = NULL, failure_reason = NULL,
    pages = EXCLUDED.pages, faces = EXCLUDED.faces, persons = EXCLUDED.persons,
    face_matches = EXCLUDED.face_matches, collection_faces = EXCLUDED.collection_faces,
    landmarks = EXCLUDED.landmarks, emotions = EXCLUDED.emotions,
    attempts = jobs.attempts + 1, notified_at = COALESCE(EXCLUDED.notified_at, jobs.notified_at),
    completed_at = COALESCE(jobs.completed_at, EXCLUDED.completed_at),
    ingest_started_at = EXCLUDED.ingest_started_at,
    ingested_at = statement_timestamp(), updated_at = statement_timestamp(),
    ingest_id = EXCLUDED.ingest_id,
    -- The retention clock: when the results were first stored. A re-ingest, reprocess or retry keeps it
    -- (the previous ingested_at counts too, for rows that predate the column).
    first_ingested_at = least(jobs.first_ingested_at, jobs.ingested_at, EXCLUDED.first_ingested_at)
RETURNING persons
"""

# A failure never erases a complete ingest unless Rekognition itself says the job FAILED:
# a job whose results expired (ResourceNotFound on a re-run) keeps the rows it has.
_UPSERT_FAILED = f"""
INSERT INTO jobs (job_id, api, {_META_COLS}, ingest_state, failure_code, failure_reason,
                  attempts, notified_at, completed_at, ingest_started_at, updated_at, ingest_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 'failed', $16, $17,
        1, $18, $18, $19, now(), $20)
ON CONFLICT (job_id) DO UPDATE SET
    api = EXCLUDED.api,
    job_status = COALESCE(EXCLUDED.job_status, jobs.job_status),
    status_message = COALESCE(EXCLUDED.status_message, jobs.status_message),
    job_tag = COALESCE(EXCLUDED.job_tag, jobs.job_tag),
    video_bucket = COALESCE(EXCLUDED.video_bucket, jobs.video_bucket),
    video_name = COALESCE(EXCLUDED.video_name, jobs.video_name),
    video_version = COALESCE(EXCLUDED.video_version, jobs.video_version),
    video_codec = COALESCE(EXCLUDED.video_codec, jobs.video_codec),
    duration_ms = COALESCE(EXCLUDED.duration_ms, jobs.duration_ms),
    video_format = COALESCE(EXCLUDED.video_format, jobs.video_format),
    frame_rate = COALESCE(EXCLUDED.frame_rate, jobs.frame_rate),
    frame_height = COALESCE(EXCLUDED.frame_height, jobs.frame_height),
    frame_width = COALESCE(EXCLUDED.frame_width, jobs.frame_width),
    color_range = COALESCE(EXCLUDED.color_range, jobs.color_range),
    ingest_state = 'failed', failure_code = EXCLUDED.failure_code, failure_reason = EXCLUDED.failure_reason,
    pages = 0, faces = 0, persons = 0, face_matches = 0, collection_faces = 0, landmarks = 0, emotions = 0,
    attempts = jobs.attempts + 1, notified_at = COALESCE(EXCLUDED.notified_at, jobs.notified_at),
    completed_at = COALESCE(jobs.completed_at, EXCLUDED.completed_at),
    ingest_started_at = EXCLUDED.ingest_started_at, ingested_at = NULL, updated_at = now(),
    ingest_id = EXCLUDED.ingest_id, first_ingested_at = least(jobs.first_ingested_at, jobs.ingested_at)
"""

# A completion notification arrived: the job is pending from Rekognition's completion time (the 7-day
# clock) until an ingest or a failure. Re-sent copies keep the first time; a job already ingested or
# failed keeps its state. No lock: the row's own upsert is atomic, and the writers above keep completed_at.
_NOTE_PENDING = """
INSERT INTO jobs (job_id, api, ingest_state, job_tag, video_bucket, video_name, notified_at, completed_at)
VALUES ($1, $2, 'pending', $3, $4, $5, $6, $6)
ON CONFLICT (job_id) DO UPDATE SET completed_at = EXCLUDED.completed_at
WHERE jobs.completed_at IS NULL AND EXCLUDED.completed_at IS NOT NULL
"""

# Age of the oldest pending job by the database's clock (one clock for every replica); 0 when none.
_OLDEST_PENDING_AGE = """
SELECT COALESCE(extract(epoch FROM now() - min(completed_at)), 0)::double precision
FROM jobs WHERE ingest_state = 'pending'
"""

# Reprocess carries the archive over to the new key at the switch.
_MOVE_ARCHIVE = """
INSERT INTO raw_pages (ingest_id, page_no, body_bytes, fetched_at, encoding, body)
SELECT $2, page_no, body_bytes, fetched_at, encoding, body FROM raw_pages WHERE ingest_id = $1
"""

_DERIVE_PERSONS = """
INSERT INTO persons (ingest_id, person_index, first_seen_ms, last_seen_ms, detections)
SELECT ingest_id, person_index, min(timestamp_ms), max(timestamp_ms), count(*)
FROM faces WHERE ingest_id = $1 AND person_index IS NOT NULL
GROUP BY ingest_id, person_index
"""


# The job is finished (ingested or recorded failed): it is no longer being retried.
_CLEAR_RETRIES = "DELETE FROM job_retries WHERE job_id = $1"

# One more attempt ended with the job's own error: the streak grows if it is the same error as last time.
_COUNT_FAILURE = """
INSERT INTO job_retries (job_id, api, fingerprint, last_error, streak, streak_started_at, failures)
VALUES ($1, $2, $3, $4, 1, now(), 1)
ON CONFLICT (job_id) DO UPDATE SET
    api = EXCLUDED.api,
    streak = CASE WHEN job_retries.fingerprint = EXCLUDED.fingerprint THEN job_retries.streak + 1 ELSE 1 END,
    streak_started_at = CASE WHEN job_retries.fingerprint = EXCLUDED.fingerprint
                             THEN job_retries.streak_started_at ELSE now() END,
    fingerprint = EXCLUDED.fingerprint, last_error = EXCLUDED.last_error,
    failures = job_retries.failures + 1, last_failed_at = now()
RETURNING streak
"""

# An outage met by one attempt: shown, never held against the job (the streak is left as it is).
_NOTE_OUTAGE = """
INSERT INTO job_retries (job_id, api, outages, last_outage) VALUES ($1, $2, 1, $3)
ON CONFLICT (job_id) DO UPDATE SET
    outages = job_retries.outages + 1, last_outage = EXCLUDED.last_outage, last_failed_at = now()
"""


async def _driver(conn: AsyncConnection) -> asyncpg.Connection:
    raw = await conn.get_raw_connection()
    return raw.driver_connection


async def _unlock(sa_conn: AsyncConnection, conn: asyncpg.Connection, job_id: str) -> None:
    """Release the job's session lock; runs on cancel paths too, so it is bounded, and a connection that
    cannot unlock (mid-statement, broken) is discarded instead, which releases the lock with the session."""
    try:
        async with asyncio.timeout(5.0):
            if conn.is_in_transaction():
                raise RuntimeError("a transaction was left open")
            await conn.execute(_SESSION_UNLOCK_SQL, job_id)
    except asyncio.CancelledError:
        await sa_conn.invalidate()
        raise
    except Exception:  # the lock goes with the discarded session; the block's own outcome stands
        await sa_conn.invalidate()


async def drop_ingest(conn: asyncpg.Connection, ingest_id: int, *, chunk_faces: int = DROP_CHUNK_FACES,
                      rows: dict[str, int] | None = None) -> None:
    """Delete every row of key ``ingest_id`` and its ``ingests`` row, ``chunk_faces`` faces per transaction.

    The caller holds the job's lock and no ``jobs`` row names the key (nobody reads it).
    """
    top = await conn.fetchval("SELECT max(face_seq) FROM faces WHERE ingest_id = $1", ingest_id)
    for low in range(0, (top if top is not None else -1) + 1, chunk_faces):
        async with conn.transaction():
            for table in _FACE_CHUNK_TABLES:
                n = _affected(await conn.execute(
                    f"DELETE FROM {table} WHERE ingest_id = $1 AND face_seq >= $2 AND face_seq < $3",
                    ingest_id, low, low + chunk_faces))
                if rows is not None:
                    rows[table] = rows.get(table, 0) + n
    async with conn.transaction():
        for table in _DROP_TABLES:
            n = _affected(await conn.execute(f"DELETE FROM {table} WHERE ingest_id = $1", ingest_id))
            if rows is not None and table != "ingests":
                rows[table] = rows.get(table, 0) + n


async def drop_stale_ingests(conn: asyncpg.Connection, job_id: str) -> int:
    """Delete the rows of every key of ``job_id`` but the one its jobs row names (a replaced ingest, attempts
    that stopped). The caller holds the job's lock. Returns how many keys went."""
    keys = [r["ingest_id"] for r in await conn.fetch(_STALE_KEYS_SQL, job_id)]
    for key in keys:
        await drop_ingest(conn, key)
    return len(keys)


def _affected(status: str) -> int:
    """Rows affected, from a command tag such as ``DELETE 12``."""
    return int(status.rsplit(" ", 1)[-1])


async def _register(conn: asyncpg.Connection, ingest_id: int, job_id: str) -> None:
    """Claim ``ingest_id`` for ``job_id`` before any row uses it (a cycled key still in use is refused)."""
    try:
        await conn.execute("INSERT INTO ingests (ingest_id, job_id) VALUES ($1, $2)", ingest_id, job_id)
    except asyncpg.UniqueViolationError as exc:
        raise TransientError(f"ingest key {ingest_id} is still in use; the next attempt takes another") from exc


async def _copy_stream(table: str, conn: asyncpg.Connection, columns: Sequence[str], data: bytes) -> None:
    """COPY one binary stream the decoding process encoded into ``table``, as it is (nothing when empty)."""
    if data:
        await conn.copy_to_table(table, source=memoryview(data), columns=columns, format="binary")


class JobWriter:
    """Writes one job's pages under a new key, a short transaction per page, on the connection that holds the
    job's lock (see :meth:`Store.job_writer`)."""

    def __init__(self, conn: asyncpg.Connection, ref: JobRef, ingest_id: int, started_at: datetime,
                 archive: bool, archive_of: int | None, erasure_key: str | None = None) -> None:
        self._conn = conn
        self._erasure_key = erasure_key
        self._ref = ref
        self.ingest_id = ingest_id
        self._started_at = started_at
        self._archive = archive
        # Reprocess: the key whose raw pages are read (and carried over to the new key at the switch).
        self._archive_of = archive_of
        self._seen_faces: set[str] = set()
        self.counts = WriteCounts()
        self.meta: JobMeta | None = None

    async def write_page(self, rows: PageCopy | PageRows, archived: ArchivedPage | None = None) -> None:
        """One page's rows (COPY streams; a normalizer's rows are encoded first) and its archive, in one
        short transaction."""
        if isinstance(rows, PageRows):
            rows = pagecopy.from_rows(rows, self._ref.api)
        with metrics.DB_WRITE_SECONDS.labels("page").time():
            async with self._conn.transaction():
                await self._write_page(rows, archived)

    async def _write_page(self, rows: PageCopy, archived: ArchivedPage | None) -> None:
        conn, c = self._conn, self.counts
        # Streams encoded by the decoding process, sent as they are: a memoryview, because asyncpg takes
        # bytes for a file name (os.fspath accepts bytes).
        await _copy_stream("faces", conn, rows.face_columns, rows.faces)
        await _copy_stream("landmarks", conn, pagecopy.LANDMARK_COPY_COLUMNS, rows.landmarks)
        await _copy_stream("emotions", conn, pagecopy.EMOTION_COPY_COLUMNS, rows.emotions)
        await _copy_stream("face_matches", conn, pagecopy.MATCH_COPY_COLUMNS, rows.matches)
        new_faces = [fid for fid in rows.collection_faces if fid not in self._seen_faces]
        if new_faces:
            await conn.copy_to_table(
                "collection_faces", columns=pagecopy.COLLECTION_FACE_COPY_COLUMNS, format="binary",
                source=memoryview(pgcopy.stream(rows.collection_faces[fid] for fid in new_faces)))
        if self._archive and archived is not None:
            await conn.execute(
                "INSERT INTO raw_pages (ingest_id, page_no, encoding, body, body_bytes) VALUES ($1, $2, $3, $4, $5)",
                self.ingest_id, c.pages, archived.encoding, archived.body, archived.raw_bytes,
            )
        # Counted once the statements succeeded (the transaction commits when this returns).
        self._seen_faces.update(new_faces)
        c.pages += 1
        c.faces += rows.elements
        c.landmarks += rows.landmark_elements
        c.emotions += rows.emotion_elements
        c.face_matches += rows.match_rows
        c.collection_faces += len(new_faces)
        c.rows += rows.elements + rows.landmark_rows + rows.emotion_rows + rows.match_rows + len(new_faces)

    async def archived_page_numbers(self) -> list[int]:
        return [r["page_no"] for r in await self._conn.fetch(
            "SELECT page_no FROM raw_pages WHERE ingest_id = $1 ORDER BY page_no", self._archive_of)]

    async def archived_page(self, page_no: int) -> ArchivedPage:
        row = await self._conn.fetchrow(
            "SELECT encoding, body, body_bytes FROM raw_pages WHERE ingest_id = $1 AND page_no = $2",
            self._archive_of, page_no)
        if row is None:
            raise LookupError(f"job {self._ref.job_id} has no archived page {page_no}")
        return ArchivedPage(bytes(row["body"]), row["body_bytes"], row["encoding"])

    async def finish(self, meta: JobMeta) -> None:
        """Derive persons under the new key; the job switches to it when the writer's block exits cleanly."""
        with metrics.DB_WRITE_SECONDS.labels("finish").time():
            await self._conn.execute(_DERIVE_PERSONS, self.ingest_id)
        self.meta = meta

    async def _remove_erased(self) -> None:
        """Before the switch, under the job's lock: nothing `erase` removed may become visible again
        (worker/erased.py); the counters follow what was removed."""
        with metrics.DB_WRITE_SECONDS.labels("erasures").time():
            async with self._conn.transaction():
                removed = await erased.apply_to_key(
                    self._conn, self.ingest_id, self._erasure_key, pages_key=self._archive_of,
                    from_archive=self._archive_of is not None)
        if removed:  # the counters are the job's rows; ``rows`` stays what was written
            c = self.counts
            for name in ("faces", "landmarks", "emotions", "face_matches", "collection_faces"):
                setattr(c, name, max(0, getattr(c, name) - removed[name]))

    async def _switch(self) -> None:
        """One short transaction: the jobs row names the new key, with its counters; readers see it at commit."""
        conn, c, ref = self._conn, self.counts, self._ref
        assert self.meta is not None
        with metrics.DB_WRITE_SECONDS.labels("switch").time():
            async with conn.transaction():
                if self._archive_of is not None:
                    # Copied and deleted, not UPDATEd: Citus refuses to change a row's distribution column.
                    await conn.execute(_MOVE_ARCHIVE, self._archive_of, self.ingest_id)
                    await conn.execute("DELETE FROM raw_pages WHERE ingest_id = $1", self._archive_of)
                await conn.execute(_CLEAR_RETRIES, ref.job_id)
                # Counted by its own statement: Citus refuses a subquery over a distributed table inside an INSERT.
                persons = await conn.fetchval("SELECT count(*) FROM persons WHERE ingest_id = $1", self.ingest_id)
                c.persons = await conn.fetchval(
                    _UPSERT_INGESTED, ref.job_id, ref.api.value, *_meta_values(self.meta),
                    c.pages, c.faces, c.face_matches, c.collection_faces, c.landmarks, c.emotions,
                    _ms_to_dt(ref.notified_at_ms), self._started_at, self.ingest_id, persons,
                )


class Quarantine:
    """Archives the raw pages of a job that cannot be ingested under a new key, a short transaction per page,
    and records the job failed with them (see :meth:`Store.quarantine`): the rows are lost, what Rekognition
    returned is not, and ``reprocess`` rebuilds the job once the cause is fixed."""

    def __init__(self, conn: asyncpg.Connection, ref: JobRef, ingest_id: int | None,
                 erasure_key: str | None = None) -> None:
        self._conn = conn
        self._erasure_key = erasure_key
        self._ref = ref
        self.ingest_id = ingest_id
        # A complete earlier ingest (rows and archive) is kept as it is: no pages are taken.
        self.keeps_earlier_ingest = ingest_id is None
        self.pages = 0

    async def add_page(self, archived: ArchivedPage) -> None:
        if self.ingest_id is None:
            return
        await self._conn.execute(
            "INSERT INTO raw_pages (ingest_id, page_no, encoding, body, body_bytes) VALUES ($1, $2, $3, $4, $5)",
            self.ingest_id, self.pages, archived.encoding, archived.body, archived.raw_bytes,
        )
        self.pages += 1

    async def finish(self, *, code: str, reason: str, meta: JobMeta | None = None) -> bool:
        """Record the job failed with the archived pages; False when an earlier ingest was kept."""
        async with self._conn.transaction():
            if self.ingest_id is not None:
                # The archived pages are what an erase rewrites: no erased identity is kept in them either.
                await erased.apply_to_key(self._conn, self.ingest_id, self._erasure_key, scan_pages=True)
            return await _record_failed(self._conn, self._ref, code=code, reason=reason, meta=meta,
                                        rekognition_failed=False, keep_archive=True, new_key=self.ingest_id)


async def _record_failed(conn: asyncpg.Connection, ref: JobRef, *, code: str, reason: str, meta: JobMeta | None,
                         rekognition_failed: bool, keep_archive: bool, new_key: int | None = None) -> bool:
    """The body of :meth:`Store.record_failure`, in a transaction of a connection that holds the job's lock.

    The job's rows go; its raw pages stay with ``keep_archive`` (under its current key), or ``new_key``'s
    (a quarantine) replace them. The keys the job no longer names are left for drop_stale_ingests.
    """
    if await tombstones.find(conn, ref.job_id) is not None:
        return False  # deleted or expired meanwhile: no row of it is written again
    await conn.execute(_CLEAR_RETRIES, ref.job_id)
    job = await conn.fetchrow("SELECT ingest_state, ingest_id FROM jobs WHERE job_id = $1", ref.job_id)
    if job is not None and job["ingest_state"] == "ingested" and not rekognition_failed:
        await conn.execute(
            "UPDATE jobs SET failure_code = $2, failure_reason = $3, updated_at = now() "
            "WHERE job_id = $1", ref.job_id, code, reason,
        )
        return False
    current = job["ingest_id"] if job is not None else None
    kept = new_key
    if new_key is None and current is not None:
        # The rows of the current key go at once: the job is failed, none of them may stay in the views.
        for table in RESULT_TABLES:
            if not (keep_archive and table == "raw_pages"):
                await conn.execute(f"DELETE FROM {table} WHERE ingest_id = $1", current)
        if keep_archive and await conn.fetchval("SELECT EXISTS (SELECT 1 FROM raw_pages WHERE ingest_id = $1)",
                                                current):
            kept = current
    if meta is None:
        # Only the notification is known: keep what it says about the job and its video.
        meta = JobMeta(job_status="FAILED" if rekognition_failed else None, status_message=None,
                       job_tag=ref.job_tag, video_bucket=ref.video_bucket, video_name=ref.video_name,
                       video_version=None, codec=None, duration_ms=None, video_format=None,
                       frame_rate=None, frame_height=None, frame_width=None, color_range=None,
                       next_token=None, response_job_id=None)
    await conn.execute(
        _UPSERT_FAILED, ref.job_id, ref.api.value, *_meta_values(meta), code, reason,
        _ms_to_dt(ref.notified_at_ms), datetime.now(tz=UTC), kept,
    )
    return True


class Store:
    """All reads and writes of the worker's tables."""

    def __init__(self, engine: AsyncEngine, *, archive_raw_pages: bool = True, erasure_key: str | None = None) -> None:
        self.engine = engine
        self.archive_raw_pages = archive_raw_pages
        # ERASURE_HASH_KEY: every write checks the new rows against the erased identifiers with it.
        self.erasure_key = erasure_key

    async def new_ingest_id(self) -> int:
        """A fresh key for the rows of one ingest (the decoder puts it in every row it builds)."""
        async with self.engine.connect() as sa_conn:
            conn = await _driver(sa_conn)
            return int(await conn.fetchval("SELECT nextval('ingest_ids')"))

    @asynccontextmanager
    async def _locked(self, job_id: str) -> AsyncIterator[asyncpg.Connection]:
        """A connection holding the job's lock for the block, outside any transaction; JobBusy when another
        session holds it. The lock goes with the block (or with the connection, which is then discarded)."""
        async with self.engine.connect() as sa_conn:
            conn = await _driver(sa_conn)
            if not await conn.fetchval(_SESSION_LOCK_SQL, job_id):
                raise JobBusy(f"job {job_id} is being written by another process")
            try:
                yield conn
            finally:
                await _unlock(sa_conn, conn, job_id)

    @asynccontextmanager
    async def job_writer(self, ref: JobRef, *, from_archive: bool = False, skip_if_ingested_since_ms: int | None = None,
                         ingest_id: int | None = None) -> AsyncIterator[JobWriter]:
        """A writer of all rows of ``ref`` under a new key (``ingest_id``, or a fresh one); the job switches to
        them when the block exits cleanly after :meth:`JobWriter.finish`, and the previous ones are deleted.

        ``from_archive`` rebuilds the rows from the job's own raw pages, which are kept as they are.
        ``skip_if_ingested_since_ms`` raises AlreadyIngested when, once the lock is held, the job
        proves to be ingested after that time (a duplicate that raced the first copy's commit).
        """
        started_at = datetime.now(tz=UTC)
        async with self._locked(ref.job_id) as conn:
            if skip_if_ingested_since_ms is not None and await conn.fetchval(
                    _INGESTED_SINCE_SQL, ref.job_id, _ms_to_dt(skip_if_ingested_since_ms)):
                raise AlreadyIngested(ref.job_id)
            # Read again under the lock: a copy that started before a delete must not bring the job back.
            await tombstones.check(conn, ref.job_id)
            if not from_archive and not self.erasure_key and await erased.any_erased(conn):
                raise erased.missing_key_error()  # before any row is written (the switch would refuse anyway)
            await drop_stale_ingests(conn, ref.job_id)
            archive_of = None
            if from_archive:
                archive_of = await conn.fetchval("SELECT ingest_id FROM jobs WHERE job_id = $1", ref.job_id)
            if ingest_id is None:
                ingest_id = int(await conn.fetchval("SELECT nextval('ingest_ids')"))
            await _register(conn, ingest_id, ref.job_id)
            writer = JobWriter(conn, ref, ingest_id, started_at, self.archive_raw_pages and not from_archive,
                               archive_of, self.erasure_key)
            yield writer
            if writer.meta is not None:
                await writer._remove_erased()
                await writer._switch()
                await drop_stale_ingests(conn, ref.job_id)

    async def archived_jobs(self) -> list[tuple[str, str]]:
        """(job_id, api) of every job that has raw pages archived: ingested ones, and failed ones whose
        pages were quarantined (a fix to the normalizer or the schema lets ``reprocess`` recover them)."""
        async with self.engine.connect() as sa_conn:
            conn = await _driver(sa_conn)
            # An uncorrelated subquery: Citus runs it on the shards (one row per key) and cannot correlate a
            # distributed table with a coordinator table; PostgreSQL plans the same semi-join as EXISTS.
            rows = await conn.fetch(
                "SELECT j.job_id, j.api::text AS api FROM jobs j WHERE "
                "j.ingest_id IN (SELECT DISTINCT r.ingest_id FROM raw_pages r) ORDER BY j.job_id"
            )
            return [(r["job_id"], r["api"]) for r in rows]

    async def record_failure(self, ref: JobRef, *, code: str, reason: str, meta: JobMeta | None = None,
                             rekognition_failed: bool = False, keep_archive: bool = False) -> bool:
        """Record that ``ref`` failed. Returns False when a complete earlier ingest was kept instead.

        ``keep_archive`` leaves the job's raw pages as they are (a failed reprocess must not destroy
        the only copy of what Rekognition returned).
        """
        async with self.engine.connect() as sa_conn:
            conn = await _driver(sa_conn)
            # Waited for outside any transaction (joblock.py): an ingest may hold the job for minutes.
            async with job_lock(conn, ref.job_id):
                async with conn.transaction():
                    recorded = await _record_failed(conn, ref, code=code, reason=reason, meta=meta,
                                                    rekognition_failed=rekognition_failed, keep_archive=keep_archive)
                # The keys the job no longer names (an attempt that stopped, a dropped ingest).
                async with conn.transaction():
                    for key in [r["ingest_id"] for r in await conn.fetch(_STALE_KEYS_SQL, ref.job_id)]:
                        for table in _KEYED_AND_INGESTS:
                            await conn.execute(f"DELETE FROM {table} WHERE ingest_id = $1", key)
            return recorded

    @asynccontextmanager
    async def quarantine(self, ref: JobRef) -> AsyncIterator[Quarantine]:
        """Archive the job's raw pages under a new key, a page at a time, and record the job failed with them
        (:meth:`Quarantine.finish`); the previous key's rows and pages go after.

        Raises JobBusy when another process holds the job. A job with a complete earlier ingest keeps
        it (``keeps_earlier_ingest``): its archive already holds what Rekognition returns.
        """
        async with self._locked(ref.job_id) as conn:
            await tombstones.check(conn, ref.job_id)
            if not self.erasure_key and await erased.any_erased(conn):
                raise erased.missing_key_error()  # its pages could not be checked: none is archived
            await drop_stale_ingests(conn, ref.job_id)
            state = await conn.fetchval("SELECT ingest_state FROM jobs WHERE job_id = $1", ref.job_id)
            key = None
            if state != "ingested":
                key = int(await conn.fetchval("SELECT nextval('ingest_ids')"))
                await _register(conn, key, ref.job_id)
            yield Quarantine(conn, ref, key, self.erasure_key)
            await drop_stale_ingests(conn, ref.job_id)

    async def tombstone(self, job_id: str) -> tombstones.Tombstoned | None:
        """The job's tombstone as the error to report (None: it was never deleted); see worker/tombstones.py."""
        async with self.engine.connect() as sa_conn:
            return await tombstones.settle(await _driver(sa_conn), job_id)

    async def note_pending(self, ref: JobRef) -> None:
        """A notification for ``ref`` arrived: record the job pending with its completion time, unless it
        is known already (then only a missing completion time is filled in)."""
        async with self.engine.connect() as sa_conn:
            conn = await _driver(sa_conn)
            await conn.execute(_NOTE_PENDING, ref.job_id, ref.api.value, ref.job_tag, ref.video_bucket,
                               ref.video_name, _ms_to_dt(ref.notified_at_ms))

    async def oldest_pending_age_s(self) -> float:
        """Seconds since Rekognition completed the oldest job still pending (0.0 when none is)."""
        async with self.engine.connect() as sa_conn:
            conn = await _driver(sa_conn)
            return float(await conn.fetchval(_OLDEST_PENDING_AGE))

    async def count_failure(self, ref: JobRef, *, fingerprint: str, reason: str) -> int:
        """Note that an attempt of ``ref`` ended with the job's own error ``fingerprint``; returns how many
        attempts in a row (outages aside) ended with that same error."""
        async with self.engine.connect() as sa_conn:
            conn = await _driver(sa_conn)
            return int(await conn.fetchval(_COUNT_FAILURE, ref.job_id, ref.api.value, fingerprint, reason))

    async def note_outage(self, ref: JobRef, reason: str) -> None:
        """Note that an attempt of ``ref`` met an outage (shown in job_retries, not counted against the job)."""
        async with self.engine.connect() as sa_conn:
            conn = await _driver(sa_conn)
            await conn.execute(_NOTE_OUTAGE, ref.job_id, ref.api.value, reason)

    async def retries(self, job_id: str) -> Mapping[str, Any] | None:
        """The job's row in job_retries: why it is being retried (None: it is not)."""
        async with self.engine.connect() as sa_conn:
            conn = await _driver(sa_conn)
            row = await conn.fetchrow("SELECT * FROM job_retries WHERE job_id = $1", job_id)
            return dict(row) if row is not None else None

    async def locked_elsewhere(self, job_id: str) -> bool:
        """True when another session holds the job's lock: it is being written right now."""
        async with self.engine.connect() as sa_conn:
            conn = await _driver(sa_conn)
            return bool(await conn.fetchval(_LOCKED_SQL, job_id))

    async def ingested_since(self, job_id: str, at_ms: int) -> bool:
        """True when the job was completely ingested at or after ``at_ms`` (a duplicate notification)."""
        async with self.engine.connect() as sa_conn:
            conn = await _driver(sa_conn)
            return bool(await conn.fetchval(_INGESTED_SINCE_SQL, job_id, _ms_to_dt(at_ms)))

    async def job(self, job_id: str) -> Mapping[str, Any] | None:
        async with self.engine.connect() as sa_conn:
            conn = await _driver(sa_conn)
            row = await conn.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)
            return dict(row) if row is not None else None
