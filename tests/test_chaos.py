"""Chaos: three `run` replicas (real processes) against the local stack under mixed faults at once.

PostgreSQL is an embedded server of the test's own (restarted at will, its sessions terminated), SQS is
moto's server with a dead-letter queue behind a redrive policy, Rekognition the emulator over HTTP behind a
proxy that drops connections. While notifications keep arriving (duplicates, FAILED notifications forged
for successful jobs, poison bodies, a few jobs that really failed), for CHAOS_DURATION_S seconds:

- replicas are SIGKILLed and started again;
- PostgreSQL is restarted, and the workers' sessions are terminated (pg_terminate_backend);
- Rekognition answers 500s (a steady rate, and bursts), drops connections (before and after answering),
  and throttles below the worker's REKOGNITION_TPS.

Then the faults stop, and within DRAIN_LIMIT_S the queue must drain. At the end the database equals one
clean ingest of every job (compared table by table and view by view with a plain `backfill` of the same
jobs into a fresh database, whole tables included, so nothing invisible is left either), the poison bodies
are in the dead-letter queue and nothing else is, and every replica exits 0 on SIGTERM.

CHAOS_DURATION_S (default 45) bounds the faults: `make test` runs this short one, `make soak` runs 30 minutes.
CHAOS_SEED replays a run (the seed is printed on failure and with ``-s``).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from rich.console import Console

from tests.faulty_proxy import FaultyProxy, _Fault
from tests.helpers import dump_job
from tests.reliability import WorkerProcess, create_database, queue_counts, take_all, worker_env
from tests.test_crash import OwnPostgres
from worker.backfill import run_backfill
from worker.config import Settings
from worker.local import synth
from worker.local.sqs import create_queue_with_dlq, notification, sns_envelope
from worker.messages import JobRef

pytestmark = pytest.mark.soak

DURATION_S = float(os.environ.get("CHAOS_DURATION_S", "45"))
SEED = int(os.environ.get("CHAOS_SEED", str(random.randrange(2**31))))
DRAIN_LIMIT_S = 300.0  # the queue drains within 5 minutes after the faults stop
REPLICAS = 3
PAGE_SIZE = 20
WORKER_TPS = 12.0  # per replica
QUOTA_TPS = 4.0  # the account quota, below the replicas' ceiling: they must find it by throttling
FAULT_RATE = 0.05  # steady Rekognition 500s; bursts go higher
DROP_RATE = 0.03  # connections to Rekognition dropped by the proxy
MAX_RECEIVE_COUNT = 10
POISON = ["not json", "[]", '{"JobId": "bad id!", "API": "StartFaceSearch"}',
          '{"JobId": "label-1", "API": "StartLabelDetection"}', '{"Type": "Notification", "Message": 7}']
# Jobs sent before the faults start, and how often another arrives while they last.
FIRST_JOBS = 12
NEW_JOB_EVERY_S = 1.5
REFERENCE = Settings(page_size=PAGE_SIZE, rekognition_tps=1000.0, retry_base_s=0.01, retry_cap_s=0.05,
                     max_call_attempts=4, log_format="json", decode_processes=0)


class DroppingProxy(FaultyProxy):
    """Forwards every Rekognition call, dropping ``drop_rate`` of the connections: before the call reaches
    the emulator, or after it answered (the worker cannot tell the call happened)."""

    def __init__(self, upstream: str, rng: random.Random) -> None:
        super().__init__(upstream)
        self.rng = rng
        self.drop_rate = 0.0

    def _take_fault(self, operation: str) -> _Fault | None:
        if self.drop_rate <= 0 or self.rng.random() >= self.drop_rate:
            return None
        self.failed[operation] += 1
        return _Fault(self.rng.choice(["drop", "drop_after"]), 1)


@dataclass
class Plan:
    """The jobs, what each must end as, and the messages still to send (due time, body)."""

    rng: random.Random
    emu: Any
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    jobs: dict[str, synth.JobFixture] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    due: list[tuple[float, str]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def new_job(self, now: float) -> synth.JobFixture:
        n = len(self.jobs)
        job_id = f"chaos-{self.run}-{n:04d}"
        seed = self.rng.randrange(2**31)
        if self.rng.random() < 0.05:  # Rekognition's own FAILED: recorded failed, never retried
            fx = synth.failed_job(job_id, self.rng.choice(["GetFaceDetection", "GetFaceSearch"]),
                                  "Unsupported codec")
            self.failed.add(job_id)
        elif n % 2:
            fx = synth.search_job(job_id, persons_elements=self.rng.randint(5, 70), persons=self.rng.randint(1, 5),
                                  seed=seed)
        else:
            fx = synth.detection_job(job_id, faces=self.rng.randint(5, 70), attributes="DEFAULT", seed=seed)
        self.jobs[job_id] = fx
        self.emu.add_job(fx)  # served from now on, before its notification is sent
        completed_ms = int(time.time() * 1000)
        self._send(now, sns_envelope(notification(fx, timestamp_ms=completed_ms)), "notification")
        if self.rng.random() < 0.25:  # SNS delivers at least once
            self._send(now + self.rng.uniform(0, 6), sns_envelope(notification(fx, timestamp_ms=completed_ms)),
                       "duplicate")
        if job_id not in self.failed and self.rng.random() < 0.3:
            # Forged: newer than any ingest (a completion to Rekognition's word), or as old as the real one.
            later = self.rng.random() < 0.5
            stamp = completed_ms + 3_600_000 if later else completed_ms
            body = json.dumps(notification(fx, status=self.rng.choice(["FAILED", "ERROR"]), timestamp_ms=stamp))
            self._send(now + self.rng.uniform(0, 8), body, "forged_failed")
        if self.rng.random() < 0.15:
            self._send(now + self.rng.uniform(0, 4), POISON[self.counts["poison"] % len(POISON)], "poison")
        return fx

    def _send(self, at: float, body: str, kind: str) -> None:
        self.due.append((at, body))
        self.counts[kind] += 1

    def take_due(self, now: float) -> list[str]:
        ready = [body for at, body in self.due if at <= now]
        self.due = [(at, body) for at, body in self.due if at > now]
        return ready


class Replicas:
    """REPLICAS `run` processes; a dead one (killed, or exited while PostgreSQL was down) is started again."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: list[WorkerProcess] = [WorkerProcess(["run"], env) for _ in range(REPLICAS)]
        self.every: list[WorkerProcess] = list(self.procs)
        self.kills = 0
        self.exits: list[int] = []

    def kill(self, i: int) -> None:
        self.procs[i].proc.send_signal(signal.SIGKILL)  # by pid: a process this test started
        self.procs[i].proc.wait(10)
        self.kills += 1

    def revive(self) -> None:
        for i, proc in enumerate(self.procs):
            rc = proc.proc.poll()
            if rc is not None:
                if rc != -signal.SIGKILL:
                    self.exits.append(rc)
                self.procs[i] = WorkerProcess(["run"], self.env)
                self.every.append(self.procs[i])

    def kill_all(self) -> None:
        for proc in self.every:
            proc.kill()


async def _fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """One statement on a connection of its own, retried while PostgreSQL restarts."""
    for attempt in range(60):
        try:
            conn = await asyncpg.connect(url, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            await asyncio.sleep(0.5)
            continue
        try:
            return list(await conn.fetch(sql, *args))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if attempt == 59:
                raise
            await asyncio.sleep(0.5)
        finally:
            await conn.close()
    raise AssertionError(f"PostgreSQL unreachable: {sql}")


async def _faults(pg: OwnPostgres, chaos_url: str, replicas: Replicas, emu: Any, rng: random.Random,
                  until: float, log: Counter[str]) -> None:
    """One fault at a time, every few seconds, until ``until``; steady faults run meanwhile."""
    deck: list[str] = []
    while time.monotonic() < until:
        await asyncio.sleep(rng.uniform(1.5, 4.0))
        replicas.revive()
        if not deck:  # every kind of fault in each round, in a random order
            deck = ["kill", "kill", "pg_restart", "terminate", "burst"]
            rng.shuffle(deck)
        fault = deck.pop()
        log[fault] += 1
        if fault == "kill":
            replicas.kill(rng.randrange(REPLICAS))
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            replicas.revive()
        elif fault == "pg_restart":
            await asyncio.to_thread(pg.stop)
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            await asyncio.to_thread(pg.start)
        elif fault == "terminate":
            await _fetch(pg.url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 "
                         "AND application_name LIKE 'rekognition-worker%'", chaos_url.rsplit("/", 1)[-1])
        else:
            emu.configure(fault_rate=0.4)
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            emu.configure(fault_rate=FAULT_RATE)


async def _sender(sqs: Any, queue_url: str, plan: Plan, until: float) -> None:
    started = time.monotonic()
    for _ in range(FIRST_JOBS):
        plan.new_job(started)
    next_job = started
    while True:
        now = time.monotonic()
        if now < until and now >= next_job:
            plan.new_job(now)
            next_job = now + NEW_JOB_EVERY_S
        for body in plan.take_due(now if now < until else float("inf")):
            await sqs.send_message(QueueUrl=queue_url, MessageBody=body)
        if now >= until and not plan.due:
            return
        await asyncio.sleep(0.1)


# The visible and whole content of the database, to compare with the reference (job_retries is bookkeeping:
# an outage met by a duplicate copy of an ingested job is noted there).
_TABLES = ("jobs", "ingests", "faces", "landmarks", "emotions", "face_matches", "collection_faces", "persons",
           "raw_pages")
_VIEWS = {
    "reporting.job_summary": "SELECT job_id, api, job_status, video_bucket, video_name, duration_ms, faces, persons, "
                             "collection_matches FROM reporting.job_summary ORDER BY job_id",
    "reporting.person_appearances": "SELECT * FROM reporting.person_appearances ORDER BY 1, 2",
    "reporting.collection_face_sightings": "SELECT * FROM reporting.collection_face_sightings ORDER BY 1, 2",
}


async def _content(url: str, job_ids: list[str]) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        out: dict[str, Any] = {"tables": {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in _TABLES}}
        out["views"] = {v: [tuple(r.values()) for r in await conn.fetch(sql)] for v, sql in _VIEWS.items()}
        out["jobs"] = {job_id: await dump_job(conn, job_id) for job_id in job_ids}
        return out
    finally:
        await conn.close()


async def _settled(url: str, plan: Plan) -> int:
    """Jobs in the state they must end in."""
    rows = await _fetch(url, "SELECT job_id, ingest_state::text AS state FROM jobs")
    state = {r["job_id"]: r["state"] for r in rows}
    return sum(1 for job_id in plan.jobs
               if state.get(job_id) == ("failed" if job_id in plan.failed else "ingested"))


async def test_chaos(sqs: Any, moto_url: str, db_url: str, rekognition_endpoint: Any) -> None:
    emu = rekognition_endpoint
    rng = random.Random(SEED)
    print(f"\nCHAOS seed={SEED} duration_s={DURATION_S}")
    pg = await asyncio.to_thread(OwnPostgres)
    replicas: Replicas | None = None
    try:
        from worker.db.migrate import upgrade_to_head

        chaos_url = await create_database(pg.url)
        await asyncio.to_thread(upgrade_to_head, Settings(database_url=chaos_url))
        queue_url, dlq_url = await create_queue_with_dlq(sqs, f"chaos-{uuid.uuid4().hex[:8]}", visibility_timeout_s=6,
                                                         max_receive_count=MAX_RECEIVE_COUNT)
        plan = Plan(rng, emu)
        async with DroppingProxy(emu.url, random.Random(rng.randrange(2**31))) as proxy:
            env = worker_env(DATABASE_URL=chaos_url, QUEUE_URL=queue_url, AWS_ENDPOINT_URL_SQS=moto_url,
                             AWS_ENDPOINT_URL_REKOGNITION=proxy.url, PAGE_SIZE=str(PAGE_SIZE),
                             REKOGNITION_TPS=str(WORKER_TPS), MAX_CONCURRENT_JOBS="4", DB_POOL_SIZE="4",
                             VISIBILITY_TIMEOUT_S="6", HEARTBEAT_INTERVAL_S="1", DECODE_PROCESSES="0",
                             JOB_STALL_TIMEOUT_S="60", STALE_SWEEP_INTERVAL_S="5", LOG_LEVEL="info")
            emu.reset_stats()
            emu.configure(latency_s=0.03, fault_rate=FAULT_RATE, quota_tps=QUOTA_TPS, seed=rng.randrange(2**31))
            proxy.drop_rate = DROP_RATE
            replicas = Replicas(env)
            faults: Counter[str] = Counter()
            started = time.monotonic()
            until = started + DURATION_S
            async with asyncio.timeout(DURATION_S + 120):  # a fault that hangs (a restart that never ends) fails
                await asyncio.gather(_sender(sqs, queue_url, plan, until),
                                     _faults(pg, chaos_url, replicas, emu, rng, until, faults))

            # The faults stop: every replica up again, and the queue drains.
            emu.configure(latency_s=0.0, fault_rate=0.0, quota_tps=None)
            proxy.drop_rate = 0.0
            replicas.revive()
            stopped = time.monotonic()
            while True:
                settled = await _settled(chaos_url, plan)
                counts = await queue_counts(sqs, queue_url)
                stale = (await _fetch(chaos_url, "SELECT count(*) AS n FROM ingests i WHERE NOT EXISTS "
                                      "(SELECT 1 FROM jobs j WHERE j.ingest_id = i.ingest_id)"))[0]["n"]
                if settled == len(plan.jobs) and counts == (0, 0, 0) and stale == 0:
                    break
                replicas.revive()
                assert time.monotonic() - stopped < DRAIN_LIMIT_S, (
                    f"not drained {DRAIN_LIMIT_S:g} s after the faults stopped: {settled}/{len(plan.jobs)} jobs "
                    f"settled, queue {counts}, {stale} stale ingest keys; seed {SEED}")
                await asyncio.sleep(0.5)
            drained_s = time.monotonic() - stopped
            # Poison goes to the dead-letter queue after MAX_RECEIVE_COUNT receives; nothing else does.
            dead: list[str] = []
            while len(dead) < plan.counts["poison"] and time.monotonic() - stopped < DRAIN_LIMIT_S:
                dead += [m["Body"] for m in await take_all(sqs, dlq_url)]
                await asyncio.sleep(0.5)
            assert sorted(dead) == sorted(POISON[i % len(POISON)] for i in range(plan.counts["poison"])), (
                f"dead-letter queue: {dead}; seed {SEED}")

            # Every replica exits 0 on SIGTERM.
            for proc in replicas.procs:
                proc.proc.send_signal(signal.SIGTERM)
            for proc in replicas.procs:
                rc = await asyncio.to_thread(proc.wait, 60)
                assert rc == 0, f"exit {rc}; seed {SEED}; {proc.output()[-3000:]}"
        # A replica that ended by itself did so at start-up, with PostgreSQL down (and was started again).
        assert all(rc != 0 for rc in replicas.exits), replicas.exits
        stats = emu.stats()

        # One clean ingest of the same jobs, into a fresh database: the database must equal it.
        job_ids = sorted(plan.jobs)
        refs = [JobRef.create(job_id, fx.api) for job_id, fx in plan.jobs.items()]
        outcomes = await run_backfill(REFERENCE.with_(database_url=db_url), refs, console=Console(file=io.StringIO()))
        expected = Counter(ingested=len(plan.jobs) - len(plan.failed), failed=len(plan.failed))
        assert Counter(o.outcome for o in outcomes) == +expected, outcomes
        mine, clean = await _content(chaos_url, job_ids), await _content(db_url, job_ids)
        assert mine["tables"] == clean["tables"], f"seed {SEED}"
        for view in _VIEWS:
            assert mine["views"][view] == clean["views"][view], (view, SEED)
        for job_id in job_ids:
            assert mine["jobs"][job_id] == clean["jobs"][job_id], (job_id, SEED)

        figures = {"seed": SEED, "duration_s": DURATION_S, "jobs": len(plan.jobs), "failed_jobs": len(plan.failed),
                   "messages": dict(plan.counts), "faults": dict(faults), "replica_kills": replicas.kills,
                   "replica_processes": len(replicas.every), "failed_starts": len(replicas.exits),
                   "drained_s": round(drained_s, 1), "rekognition_calls": stats["requests"],
                   "throttled": stats["throttled"], "faults_500": stats["faults"],
                   "dropped_connections": sum(proxy.failed.values()), "rows": mine["tables"]}
        print("CHAOS " + json.dumps(figures))
        assert set(faults) == {"kill", "pg_restart", "terminate", "burst"}, figures
        assert stats["throttled"] > 0 and stats["faults"] > 0 and sum(proxy.failed.values()) > 0, figures
    finally:
        if replicas is not None:
            replicas.kill_all()
        emu.configure(latency_s=0.0, fault_rate=0.0, quota_tps=None)
        await asyncio.to_thread(pg.close)

