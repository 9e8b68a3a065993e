"""Data that stays gone (issue 20 items 4, 5 and 8): an erased identity and a deleted job never come back
through any later write, retention counts from the first ingest, and stopped ingests are purged.

Real components throughout: PostgreSQL, the Rekognition emulator over HTTP, moto's SQS server, the CLI as a
user runs it.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY
from test_service_support import Queues, enveloped, plain, queue_counts, raw, send

from tests.conftest import unique_job_id
from tests.helpers import dump_job, runtime
from tests.test_cli import run_cli
from tests.test_lifecycle import _check_counters, _stored_anywhere, _without_seq
from worker.config import Settings
from worker.db.engine import create_engine
from worker.erased import selector_hash
from worker.lifecycle import erase, purge_expired, run_delete
from worker.local import synth
from worker.messages import JobRef
from worker.reprocess import run_reprocess
from worker.service import RetryPolicy, SqsWorker, describe_queue

KEY = "stays-gone-test-key-of-at-least-32-bytes"
FAST = RetryPolicy(busy_base_s=1, busy_cap_s=2, transient_base_s=1, transient_cap_s=2)


def _later_ms() -> int:
    """A notification's Timestamp after every ingest so far: not recognised as a duplicate of one of them."""
    return int(time.time() * 1000) + 60_000


async def _ingest(settings: Settings, *fixtures: synth.JobFixture) -> list[str]:
    async with runtime(settings) as rt:
        return [(await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))).outcome for fx in fixtures]


async def _drain(settings: Settings, sqs: Any, timeout_s: float = 60) -> SqsWorker:
    assert settings.queue_url is not None
    async with runtime(settings) as rt:
        worker = SqsWorker(settings, rt, sqs, await describe_queue(sqs, settings.queue_url), retry_policy=FAST)
        async with asyncio.timeout(timeout_s):
            assert await worker.run(exit_when_idle=True) == 0
    return worker


def _wsettings(settings: Settings, queues: Queues) -> Settings:
    return settings.with_(queue_url=queues.url, poll_wait_s=1, visibility_timeout_s=2, heartbeat_interval_s=0.5,
                          shutdown_grace_s=5.0, health_port=0)


def _env(db_url: str, emu: Any, moto_url: str, queues: Queues | None = None, **more: str) -> dict[str, str]:
    env = {"DATABASE_URL": db_url, "AWS_ENDPOINT_URL_REKOGNITION": emu.url, "AWS_ENDPOINT_URL_SQS": moto_url,
           "REKOGNITION_TPS": "200", "DECODE_PROCESSES": "0", **more}
    if queues is not None:
        env["QUEUE_URL"] = queues.url
    return env


async def _visible(db: asyncpg.Connection, *job_ids: str) -> dict[str, Any]:
    return {job_id: await dump_job(db, job_id) for job_id in job_ids}


def _no_traceback(result: Any) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


# --- item 8: erasure that stays erased ---------------------------------------------------------------


async def test_an_erased_identity_never_comes_back(
    emu: Any, settings: Settings, db: asyncpg.Connection, db_url: str, sqs: Any, queues: Queues, moto_url: str,
) -> None:
    async with asyncio.timeout(240):
        s = settings.with_(erasure_hash_key=KEY, page_size=100)
        a, b = (synth.search_job(unique_job_id(f"keep-{n}"), persons_elements=300, persons=6, seed=0,
                                 all_optional=True) for n in "ab")
        emu.add_jobs([a, b])
        assert await _ingest(s, a, b) == ["ingested", "ingested"]
        target = await db.fetchval("SELECT external_image_id FROM collection_faces GROUP BY 1 "
                                   "ORDER BY count(*) DESC, 1 LIMIT 1")
        face_ids = {r["face_id"] for r in await db.fetch(
            "SELECT DISTINCT face_id FROM collection_faces WHERE external_image_id = $1", target)}
        needles = {target, *face_ids}
        result = await erase(db, "external_image_id", target, key=KEY)
        assert result.counts["persons"] > 0 and result.counts["pages_rewritten"] > 0
        assert await _stored_anywhere(db, needles) == []
        erased = await _visible(db, a.job_id, b.job_id)

        async def nothing_came_back(what: str) -> None:
            assert await _stored_anywhere(db, needles) == [], what
            now = await _visible(db, a.job_id, b.job_id)
            if what.startswith("reprocess"):  # the rewritten archive numbers the faces left from 0
                for job_id, dump in now.items():
                    for table, rows in dump.items():
                        assert _without_seq(rows) == _without_seq(erased[job_id][table]), (what, table)
            else:  # from Rekognition: every face at its place in the stream, the erased ones removed again
                assert now == erased, what
            await _check_counters(db)

        # A re-ingest from Rekognition (backfill), which still has the results for 7 days.
        assert await _ingest(s, a) == ["ingested"]
        await nothing_came_back("re-ingest")
        # jobs retry of a failed job.
        await db.execute("UPDATE jobs SET ingest_state = 'failed', failure_code = 'Test' WHERE job_id = $1", b.job_id)
        env = _env(db_url, emu, moto_url, queues, ERASURE_HASH_KEY=KEY, PAGE_SIZE="100")
        retried = run_cli("jobs", "retry", "--job", b.job_id, env=env)
        assert retried.returncode == 0, retried.stderr[-2000:]
        await nothing_came_back("jobs retry")
        # Re-notifications through `run` (a re-sent notification, a plain JobId message) ...
        ws = _wsettings(s, queues)
        await send(sqs, queues.url, raw(a, timestamp_ms=_later_ms()), plain(b))
        worker = await _drain(ws, sqs)
        assert worker.counters.by_outcome == {"ingested": 2}
        await nothing_came_back("re-notification")
        # ... and one redriven from the dead-letter queue (redrive skips ingested jobs: this one failed).
        await db.execute("UPDATE jobs SET ingest_state = 'failed', failure_code = 'Test' WHERE job_id = $1", b.job_id)
        await send(sqs, queues.dlq_url, enveloped(b, timestamp_ms=_later_ms()))
        moved = run_cli("dlq", "redrive", "--job", b.job_id, env=env)
        assert moved.returncode == 0 and "moved: 1" in moved.stdout, moved.stdout + moved.stderr[-2000:]
        worker = await _drain(ws, sqs)
        assert worker.counters.by_outcome == {"ingested": 1}
        await nothing_came_back("redrive")
        # reprocess --all, with the key and without it (the archive it reads was rewritten).
        for settings_used in (s, s.with_(erasure_hash_key=None)):
            assert {o.outcome for o in await run_reprocess(settings_used, None)} == {"ingested"}
            await nothing_came_back("reprocess --all")
        # The identifier and the FaceIds found for it are kept as keyed hashes only.
        kept = {r["selector_hash"]: r["selector_kind"] for r in await db.fetch("SELECT * FROM erased_identifiers")}
        assert kept == {selector_hash(KEY, "external_image_id", target): "external_image_id",
                        **{selector_hash(KEY, "face_id", f): "face_id" for f in face_ids}}


async def test_without_the_key_no_write_stores_anything_once_identities_are_erased(
    emu: Any, settings: Settings, db: asyncpg.Connection, db_url: str, moto_url: str,
) -> None:
    async with asyncio.timeout(120):
        fx = synth.search_job(unique_job_id("nokey"), persons_elements=200, persons=4, seed=0, all_optional=True)
        emu.add_job(fx)
        # No erasure yet: no key needed.
        assert await _ingest(settings, fx) == ["ingested"]
        target = await db.fetchval("SELECT external_image_id FROM collection_faces ORDER BY 1 LIMIT 1")
        await erase(db, "external_image_id", target, key=KEY)
        erased = await _visible(db, fx.job_id)
        current = await db.fetchval("SELECT ingest_id FROM jobs WHERE job_id = $1", fx.job_id)

        async with runtime(settings) as rt:  # ERASURE_HASH_KEY unset
            outcome = await rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api))
        assert outcome.outcome == "transient" and "ERASURE_HASH_KEY is not set" in (outcome.reason or "")
        # Not made visible, not failed; the refusal is shown where retries are.
        assert await db.fetchval("SELECT ingest_id FROM jobs WHERE job_id = $1", fx.job_id) == current
        assert await _visible(db, fx.job_id) == erased
        assert await db.fetchval("SELECT ingest_state::text FROM jobs WHERE job_id = $1", fx.job_id) == "ingested"
        assert "ERASURE_HASH_KEY" in await db.fetchval("SELECT last_outage FROM job_retries WHERE job_id = $1",
                                                       fx.job_id)
        refused = run_cli("backfill", "--api", "GetFaceSearch", fx.job_id, env=_env(db_url, emu, moto_url))
        assert refused.returncode == 1 and "ERASURE_HASH_KEY is not set" in refused.stderr
        _no_traceback(refused)
        assert await _visible(db, fx.job_id) == erased
        assert await _stored_anywhere(db, {target}) == []  # not even under a key nobody reads
        ok = run_cli("backfill", "--api", "GetFaceSearch", fx.job_id,
                     env=_env(db_url, emu, moto_url, ERASURE_HASH_KEY=KEY))
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert await _stored_anywhere(db, {target}) == []
        assert await _visible(db, fx.job_id) == erased


async def test_a_quarantine_archives_no_erased_identity(
    emu: Any, settings: Settings, db: asyncpg.Connection,
) -> None:
    async with asyncio.timeout(90):
        s = settings.with_(erasure_hash_key=KEY, page_size=25)
        seen = synth.search_job(unique_job_id("quar-seen"), persons_elements=60, seed=0)
        # A job this version cannot store (an ExternalImageId longer than the normalizer allows on page 2): its
        # ingest fails and its raw pages are archived for a later reprocess, not normalized.
        refused = synth.search_job(unique_job_id("quar-refused"), persons_elements=60, seed=0)
        element = next(e for e in refused.results[30:50] if e.get("FaceMatches"))
        match = element["FaceMatches"][0]
        match["Face"] = {**match["Face"], "ExternalImageId": "x" * 600}
        emu.add_jobs([seen, refused])
        assert await _ingest(s, seen) == ["ingested"]
        in_refused = {m["Face"]["ExternalImageId"] for e in refused.results for m in e.get("FaceMatches") or ()
                      if len(m["Face"].get("ExternalImageId", "")) < 600}
        target = await db.fetchval("SELECT external_image_id FROM collection_faces WHERE external_image_id = ANY($1) "
                                   "GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1", sorted(in_refused))
        face_ids = {r["face_id"] for r in await db.fetch(
            "SELECT face_id FROM collection_faces WHERE external_image_id = $1", target)}
        await erase(db, "external_image_id", target, key=KEY)
        async with runtime(s) as rt:
            outcome = await rt.ingestor.ingest(JobRef.create(refused.job_id, refused.api))
        assert outcome.outcome == "failed" and "raw pages kept" in (outcome.reason or ""), outcome
        assert await db.fetchval("SELECT count(*) FROM raw_pages r JOIN jobs j USING (ingest_id) "
                                 "WHERE j.job_id = $1", refused.job_id) == 3
        assert await _stored_anywhere(db, {target, *face_ids}) == []


# --- build 3: deletion that stays deleted -------------------------------------------------------------


def _tombstoned_total() -> float:
    return REGISTRY.get_sample_value("rekognition_worker_tombstoned_notifications_total") or 0.0


async def test_a_deleted_job_stays_deleted_until_an_operator_restores_it(
    emu: Any, settings: Settings, db: asyncpg.Connection, db_url: str, sqs: Any, queues: Queues, moto_url: str,
) -> None:
    async with asyncio.timeout(180):
        deleted, expired, other = (synth.detection_job(unique_job_id(f"tomb-{n}"), faces=30) for n in "dek")
        emu.add_jobs([deleted, expired, other])
        assert await _ingest(settings, deleted, expired, other) == ["ingested"] * 3
        env = _env(db_url, emu, moto_url, queues)
        gone = run_cli("delete", deleted.job_id, env=env)
        assert gone.returncode == 0, gone.stderr[-2000:]
        await db.execute("UPDATE jobs SET ingested_at = now() - interval '40 days' WHERE job_id = $1", expired.job_id)
        engine = create_engine(settings, pool_size=2)
        try:
            purged = await purge_expired(engine, 30, now=await db.fetchval("SELECT now()"))
        finally:
            await engine.dispose()
        assert purged is not None and purged.jobs == 1

        # Copies of their notifications still around: re-sent, duplicated, without a Timestamp.
        counted = _tombstoned_total()
        await send(sqs, queues.url, raw(deleted, timestamp_ms=_later_ms()), enveloped(deleted), plain(deleted),
                   raw(expired, timestamp_ms=_later_ms()))
        worker = await _drain(_wsettings(settings, queues), sqs)
        assert worker.counters.by_outcome == {"tombstoned": 4}
        # ... and one in the dead-letter queue, which `dlq list` explains and `dlq redrive` moves back.
        await send(sqs, queues.dlq_url, raw(deleted, timestamp_ms=_later_ms()))
        listed = run_cli("dlq", "list", "--format", "json", env=env)
        assert listed.returncode == 0, listed.stderr[-2000:]
        [row] = [json.loads(line) for line in listed.stdout.splitlines()]
        assert row["reason"].startswith("job deleted at") and row["ingested"] is False, row
        moved = run_cli("dlq", "redrive", "--job", deleted.job_id, env=env)
        assert moved.returncode == 0 and "moved: 1" in moved.stdout, moved.stdout + moved.stderr[-2000:]
        worker = await _drain(_wsettings(settings, queues), sqs)
        assert worker.counters.by_outcome == {"tombstoned": 1}
        assert await queue_counts(sqs, queues.url) == (0, 0, 0)
        assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)
        assert await db.fetchval("SELECT count(*) FROM jobs WHERE job_id = ANY($1)",
                                 [deleted.job_id, expired.job_id]) == 0
        assert await db.fetchval("SELECT count(*) FROM ingests WHERE job_id = ANY($1)",
                                 [deleted.job_id, expired.job_id]) == 0
        stones = {r["job_id"]: dict(r) for r in await db.fetch("SELECT * FROM tombstones")}
        assert {j: (r["reason"], r["api"]) for j, r in stones.items()} == {
            deleted.job_id: ("deleted", "FACE_DETECTION"), expired.job_id: ("expired", "FACE_DETECTION")}
        assert set(stones[deleted.job_id]) == {"job_id", "api", "reason", "deleted_at"}  # no face data
        assert _tombstoned_total() - counted == 5

        # backfill and jobs retry refuse it too, unless asked.
        refused = run_cli("backfill", "--api", "GetFaceDetection", deleted.job_id, env=env)
        assert refused.returncode == 1 and "was deleted" in refused.stderr and "--restore-deleted" in refused.stderr
        _no_traceback(refused)
        assert await db.fetchval("SELECT count(*) FROM jobs WHERE job_id = $1", deleted.job_id) == 0
        restored = run_cli("backfill", "--api", "GetFaceDetection", "--restore-deleted", deleted.job_id, env=env)
        assert restored.returncode == 0, restored.stderr[-2000:]
        needs_job = run_cli("jobs", "retry", "--restore-deleted", env=env)
        assert needs_job.returncode == 2 and "--job" in needs_job.stderr
        retried = run_cli("jobs", "retry", "--job", expired.job_id, "--restore-deleted", env=env)
        assert retried.returncode == 0, retried.stdout + retried.stderr[-2000:]
        for fx in (deleted, expired):
            assert await db.fetchval("SELECT faces FROM jobs WHERE job_id = $1 AND ingest_state = 'ingested'",
                                     fx.job_id) == 30
        assert await db.fetchval("SELECT count(*) FROM tombstones") == 0


async def test_a_copy_that_started_before_the_delete_does_not_bring_the_job_back(
    emu: Any, settings: Settings, db: asyncpg.Connection,
) -> None:
    async with asyncio.timeout(60):
        fx = synth.detection_job(unique_job_id("tomb-race"), faces=100)
        emu.add_job(fx)
        s = settings.with_(page_size=25)
        assert await _ingest(s, fx) == ["ingested"]
        emu.configure(latency_s=0.6)
        async with runtime(s) as rt:
            copy = asyncio.create_task(rt.ingestor.ingest(JobRef.create(fx.job_id, fx.api)))
            await asyncio.sleep(0.3)  # its first Get* is on the wire; it holds no lock yet
            [removal] = await run_delete(s, [fx.job_id])
            assert removal.outcome == "deleted"
            outcome = await copy
        assert outcome.outcome == "tombstoned", outcome
        for table in ("jobs", "ingests"):
            assert await db.fetchval(f"SELECT count(*) FROM {table} WHERE job_id = $1", fx.job_id) == 0
        assert await db.fetchval("SELECT count(*) FROM faces") == 0


# --- item 5: one retention clock ---------------------------------------------------------------------


async def test_delete_ingested_before_and_retention_take_exactly_the_jobs_first_ingested_before_the_cut(
    emu: Any, settings: Settings, db: asyncpg.Connection, db_url: str,
) -> None:
    async with asyncio.timeout(120):
        early = [synth.detection_job(unique_job_id(f"clock-e{n}"), faces=20) for n in range(2)]
        late = [synth.detection_job(unique_job_id(f"clock-l{n}"), faces=20) for n in range(2)]
        backdated = synth.detection_job(unique_job_id("clock-old"), faces=20)
        emu.add_jobs([*early, *late, backdated])
        assert await _ingest(settings, *early, backdated) == ["ingested"] * 3
        # As a database from before the first_ingested_at column holds an old job: only ingested_at says when.
        await db.execute("UPDATE jobs SET ingested_at = now() - interval '10 days', first_ingested_at = NULL "
                         "WHERE job_id = $1", backdated.job_id)
        await asyncio.sleep(0.05)
        cut = await db.fetchval("SELECT clock_timestamp()")
        await asyncio.sleep(0.05)
        assert await _ingest(settings, *late) == ["ingested"] * 2
        first = dict(await db.fetch("SELECT job_id, first_ingested_at FROM jobs"))

        # Everything is stored again after the cut: reprocess --all, a re-ingest, a retry.
        assert [o.outcome for o in await run_reprocess(settings, None)] == ["ingested"] * 5
        assert await _ingest(settings, early[0], late[0]) == ["ingested"] * 2
        await db.execute("UPDATE jobs SET ingest_state = 'failed', ingested_at = NULL WHERE job_id = $1",
                         early[1].job_id)
        assert await _ingest(settings, early[1]) == ["ingested"]
        assert await db.fetchval("SELECT count(*) FROM jobs WHERE ingested_at < $1", cut) == 0

        taken = {early[0].job_id, early[1].job_id, backdated.job_id}
        dry = await run_delete(settings, [], ingested_before=cut, dry_run=True)
        assert {r.job_id for r in dry} == taken
        # ingested_at keeps its meaning (the last complete ingest); the clock stays where it was.
        now = dict(await db.fetch("SELECT job_id, first_ingested_at FROM jobs"))
        assert {j: now[j] for j in now if j != backdated.job_id} == \
            {j: first[j] for j in first if j != backdated.job_id}
        assert now[backdated.job_id] < cut - timedelta(days=9)
        engine = create_engine(settings, pool_size=2)
        try:
            purged = await purge_expired(engine, 1.0, now=cut + timedelta(days=1))
        finally:
            await engine.dispose()
        assert purged is not None and purged.jobs == 3
        assert {r["job_id"] for r in await db.fetch("SELECT job_id FROM jobs")} == {fx.job_id for fx in late}
        assert dict(await db.fetch("SELECT job_id, reason FROM tombstones")) == dict.fromkeys(taken, "expired")


# --- item 4: retention of stopped ingests ------------------------------------------------------------


async def _stop_mid_job(settings: Settings, fx: synth.JobFixture, db: asyncpg.Connection, *,
                        pending: bool = False) -> None:
    """Start ingesting ``fx`` and kill it once some of its pages are written (as an OOM kill or a lost node
    would): its rows stay under a key that no jobs row names."""
    async with runtime(settings) as rt:
        ref = JobRef.create(fx.job_id, fx.api, notified_at_ms=_later_ms() if pending else None)
        if pending:
            await rt.store.note_pending(ref)
        task = asyncio.create_task(rt.ingestor.ingest(ref))
        while not await db.fetchval("SELECT count(*) FROM faces f JOIN ingests i USING (ingest_id) "
                                    "WHERE i.job_id = $1", fx.job_id):
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def _rows_of(db: asyncpg.Connection, job_id: str) -> int:
    total = 0
    for table in ("faces", "landmarks", "emotions", "raw_pages", "ingests"):
        total += await db.fetchval(f"SELECT count(*) FROM {table} t JOIN ingests i USING (ingest_id) "
                                   f"WHERE i.job_id = $1" if table != "ingests" else
                                   "SELECT count(*) FROM ingests WHERE job_id = $1", job_id)
    return total


async def test_retention_purges_the_rows_of_stopped_ingests_and_spares_running_ones(
    emu: Any, settings: Settings, db: asyncpg.Connection,
) -> None:
    async with asyncio.timeout(180):
        s = settings.with_(page_size=25)
        pending, rowless, running, named, last = (synth.detection_job(unique_job_id(f"stop-{n}"), faces=100,
                                                                      attributes="ALL") for n in "prsde")
        emu.add_jobs([pending, rowless, running, named, last])
        emu.configure(latency_s=0.2)
        await _stop_mid_job(s, pending, db, pending=True)
        for fx in (rowless, running, named):
            await _stop_mid_job(s, fx, db)
        emu.configure(latency_s=0.0)
        assert await db.fetchval("SELECT ingest_state::text FROM jobs WHERE job_id = $1", pending.job_id) == "pending"
        assert await db.fetchval("SELECT count(*) FROM jobs WHERE job_id <> $1", pending.job_id) == 0
        for fx in (pending, rowless, running, named):
            assert await _rows_of(db, fx.job_id) > 0

        # `delete` reaches a job that has only a stopped ingest's rows.
        [removal] = await run_delete(s, [named.job_id])
        assert removal.outcome == "deleted" and removal.total > 0 and await _rows_of(db, named.job_id) == 0

        # An ingest still running holds its job's lock: its key is not touched.
        holder = await asyncpg.connect(s.asyncpg_dsn)
        engine = create_engine(s, pool_size=2)
        try:
            assert await holder.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", running.job_id)
            later = await db.fetchval("SELECT now() + interval '400 days'")
            result = await purge_expired(engine, 1, now=later)
            assert await _rows_of(db, pending.job_id) == 0 and await _rows_of(db, rowless.job_id) == 0
            assert await _rows_of(db, running.job_id) > 0
            assert result is not None and result.stopped_ingests == 2 and result.rows.get("faces", 0) > 0
            await holder.execute("SELECT pg_advisory_unlock_all()")
            result = await purge_expired(engine, 1, now=later)
            assert result is not None and result.stopped_ingests == 1 and await _rows_of(db, running.job_id) == 0
        finally:
            await holder.close()
            await engine.dispose()
        # The pending job is still waiting for its ingest: its row stays, and it is not tombstoned.
        assert await db.fetchval("SELECT ingest_state::text FROM jobs WHERE job_id = $1", pending.job_id) == "pending"
        assert await db.fetchval("SELECT count(*) FROM tombstones WHERE job_id <> $1", named.job_id) == 0
        for table in ("faces", "landmarks", "emotions", "face_matches", "collection_faces", "persons", "raw_pages",
                      "ingests"):
            assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0, table

        # `erase` reaches them as well: it looks at every job with a key that no jobs row names.
        emu.configure(latency_s=0.2)
        await _stop_mid_job(s, last, db)
        assert await _rows_of(db, last.job_id) > 0
        await erase(db, "face_id", "no-such-face", key=KEY)
        assert await _rows_of(db, last.job_id) == 0
