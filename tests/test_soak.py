"""A bounded soak: SOAK_JOBS notifications (default 200) through moto's SQS into one `run` process, with
Rekognition faults (5% of calls), a quota below the worker's ceiling (throttling), jobs still running
at first, jobs that are refused, duplicate notifications and poison messages.

Checked at the end: every job stored exactly once with exactly its rows; the queue empty and the
dead-letter queue holding exactly the poison messages; the worker's RSS flat after warm-up (< 10%
growth); no leaked asyncio tasks, pooled connections, file descriptors or sockets. The figures are
printed (run with ``-s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psutil
import pytest

from tests.reliability import WorkerProcess, kill_all, queue_counts, take_all, worker_env
from worker.local import synth
from worker.local.sqs import create_queue_with_dlq, notification, sns_envelope

pytestmark = pytest.mark.soak

JOBS = int(os.environ.get("SOAK_JOBS", "200"))
PAGE_SIZE = 20
FAULT_RATE = 0.05
QUOTA_TPS = 25.0  # the account quota the emulator enforces ...
WORKER_TPS = 60.0  # ... below the ceiling the worker starts at: it must find the quota by throttling
POISON = ["not json", "[]", '{"JobId": "bad id!", "API": "StartFaceSearch"}',
          '{"JobId": "label-1", "API": "StartLabelDetection"}', '{"Type": "Notification", "Message": 7}']

# `python -m worker run`, plus a task that reports what only the process itself can see: its asyncio
# tasks and its connection pool. run_service's `ready` hook hands over the worker once it is set up.
SAMPLED_RUN = """
import asyncio, json, sys
from worker.cli import tune_gc
from worker.config import Settings
from worker.logs import configure_logging
from worker.service import run_service

async def main():
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    tasks = []

    # Long-lived tasks the service starts once (after `ready`): not per-job tasks, so not counted.
    service_tasks = {"queue-depth", "pending-jobs", "retention", "stale-sweep", "watchdog", "events", "events-wait"}

    def ready(worker):
        async def sample():
            while True:
                pool = worker.rt.engine.pool
                per_job = [t for t in asyncio.all_tasks() if t.get_name() not in service_tasks]
                print(json.dumps({"event": "soak sample", "tasks": len(per_job),
                                  "task_names": sorted(f"{t.get_name()}:{getattr(t.get_coro(), '__qualname__', '?')}"
                                                       for t in per_job),
                                  "checked_out": pool.checkedout(), "pooled": pool.checkedin()}),
                      file=sys.stderr, flush=True)
                await asyncio.sleep(0.25)
        tasks.append(asyncio.get_running_loop().create_task(sample()))

    try:
        return await run_service(settings, ready=ready)
    finally:
        for task in tasks:
            task.cancel()

tune_gc()
sys.exit(asyncio.run(main()))
"""


@dataclass
class Plan:
    """The jobs of the soak and what each must end as."""

    fixtures: list[synth.JobFixture] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)
    ingested: dict[str, synth.JobFixture] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    duplicated: set[str] = field(default_factory=set)


def make_plan(rng: random.Random) -> Plan:
    plan = Plan()
    run = uuid.uuid4().hex[:6]
    for n in range(JOBS):
        seed = rng.randrange(2**31)
        job_id = f"soak-{run}-{n:04d}"
        if n % 40 == 7:  # refused by Rekognition: recorded failed, message deleted (AccessDenied would be
            # the deployment's fault, never the job's: tests/test_credentials.py)
            fx = synth.JobFixture(job_id, rng.choice(["GetFaceDetection", "GetFaceSearch"]),
                                  error=rng.choice(["InvalidParameterException", "ResourceNotFoundException"]))
            plan.failed.add(job_id)
        elif n % 2:
            fx = synth.search_job(job_id, persons_elements=rng.randint(5, 70), persons=rng.randint(1, 5), seed=seed)
        else:
            fx = synth.detection_job(job_id, faces=rng.randint(5, 70), attributes="DEFAULT", seed=seed)
        if fx.error is None:
            plan.ingested[job_id] = fx
        plan.fixtures.append(fx)
        plan.bodies.append(sns_envelope(notification(fx)))
        if n % 40 == 13:  # the same notification twice (SNS delivers at least once)
            plan.bodies.append(sns_envelope(notification(fx)))
            plan.duplicated.add(job_id)
    plan.bodies.extend(POISON)
    rng.shuffle(plan.bodies)
    return plan


class Sampler:
    """RSS (the worker, and with its decoding processes), file descriptors and sockets, every 0.2 s."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, int, int, int, int]] = []  # (t, rss, fds, sockets, rss with children)
        self._task: asyncio.Task[None] | None = None

    def take(self) -> tuple[float, int, int, int, int]:
        rss = self.proc.memory_info().rss
        tree = rss
        for child in self.proc.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                tree += child.memory_info().rss
        sample = (time.monotonic(), rss, self.proc.num_fds(), len(self.proc.net_connections(kind="inet")), tree)
        self.samples.append(sample)
        return sample

    async def _run(self) -> None:
        while True:
            try:
                self.take()
            except psutil.NoSuchProcess:
                return
            await asyncio.sleep(0.2)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def stored_jobs(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM jobs WHERE ingest_state IN ('ingested', 'failed')"))


async def test_soak(sqs: Any, moto_url: str, db_url: str, db: asyncpg.Connection, rekognition_endpoint: Any) -> None:
    emu = rekognition_endpoint
    rng = random.Random(JOBS)
    plan = make_plan(rng)
    emu.add_jobs(plan.fixtures)
    # Two jobs answer IN_PROGRESS to their first call, then SUCCEEDED: retried after NOT_READY_DELAY_S.
    late = [job_id for job_id in list(plan.ingested)[3::90]][:2]
    for job_id in late:
        emu.complete_after(job_id, 1)
    queue_url, dlq_url = await create_queue_with_dlq(sqs, f"soak-{uuid.uuid4().hex[:8]}", visibility_timeout_s=10,
                                                     max_receive_count=3)
    for i in range(0, len(plan.bodies), 10):
        batch = plan.bodies[i:i + 10]
        await sqs.send_message_batch(QueueUrl=queue_url, Entries=[
            {"Id": str(n), "MessageBody": body} for n, body in enumerate(batch)])
    emu.reset_stats()
    emu.configure(fault_rate=FAULT_RATE, quota_tps=QUOTA_TPS, seed=rng.randrange(2**31))
    env = worker_env(DATABASE_URL=db_url, QUEUE_URL=queue_url, AWS_ENDPOINT_URL_SQS=moto_url,
                     AWS_ENDPOINT_URL_REKOGNITION=emu.url, PAGE_SIZE=str(PAGE_SIZE), REKOGNITION_TPS=str(WORKER_TPS),
                     MAX_CONCURRENT_JOBS="8", DB_POOL_SIZE="10", VISIBILITY_TIMEOUT_S="10", HEARTBEAT_INTERVAL_S="3",
                     LOG_LEVEL="info")
    started = time.monotonic()
    proc = WorkerProcess([], env, python=[sys.executable, "-c", SAMPLED_RUN])
    sampler = Sampler(proc.pid)
    try:
        sampler.start()
        warm_at = None
        deadline = started + 150
        while True:
            done = await stored_jobs(db)
            if warm_at is None and done >= JOBS // 4:
                warm_at = sampler.take()
            counts = await queue_counts(sqs, queue_url)
            if done >= len(plan.ingested) + len(plan.failed) and counts == (0, 0, 0):
                break
            assert proc.proc.poll() is None, proc.output()[-3000:]
            if time.monotonic() >= deadline:
                unfinished = [e for e in proc.events("job finished") if e.get("outcome") not in ("ingested", "failed")]
                raise AssertionError(f"soak not done: {done} jobs stored, queue {counts}; last outcomes other than "
                                     f"ingested/failed: {unfinished[-12:]}")
            await asyncio.sleep(0.25)
        elapsed = time.monotonic() - started
        await asyncio.sleep(1.0)  # idle: the last job's tasks and connections are released
        end = sampler.take()
        idle = [e for e in proc.events("soak sample")][-1]
        first = proc.events("soak sample")[0]
        connections = int(await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'rekognition-worker%'"))
        children = proc.children()
        proc.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0, proc.output()[-3000:]
    finally:
        await sampler.stop()
        proc.kill()
        kill_all(proc.children())
        emu.configure(fault_rate=0.0, quota_tps=None)
    stats = emu.stats()

    # Every job exactly once, with exactly its rows.
    rows = {r["job_id"]: r for r in await db.fetch(
        "SELECT j.job_id, j.ingest_state::text AS state, j.attempts, j.faces, j.face_matches, j.pages, "
        "(SELECT count(*) FROM faces f WHERE f.ingest_id = j.ingest_id) AS stored_faces, "
        "(SELECT count(*) FROM raw_pages p WHERE p.ingest_id = j.ingest_id) AS stored_pages FROM jobs j")}
    assert set(rows) == set(plan.ingested) | plan.failed
    for job_id, fx in plan.ingested.items():
        row = rows[job_id]
        matches = sum(len(e.get("FaceMatches", [])) for e in fx.results)
        assert row["state"] == "ingested", (job_id, dict(row))
        assert row["faces"] == row["stored_faces"] == len(fx.results), (job_id, dict(row))
        assert row["face_matches"] == matches, (job_id, dict(row))
        assert row["pages"] == row["stored_pages"] == max(1, math.ceil(len(fx.results) / PAGE_SIZE)), job_id
        # Written once, duplicates included: a second copy finds the job busy or already ingested.
        assert row["attempts"] == 1, (job_id, dict(row))
    assert all(rows[j]["state"] == "failed" for j in plan.failed)
    # The queue drained; the dead-letter queue holds exactly the poison messages.
    assert await queue_counts(sqs, queue_url) == (0, 0, 0)
    assert sorted(m["Body"] for m in await take_all(sqs, dlq_url)) == sorted(POISON)

    # Memory flat after warm-up; nothing leaked.
    assert warm_at is not None
    rss_growth = (end[1] - warm_at[1]) / warm_at[1]
    tree_growth = (end[4] - warm_at[4]) / warm_at[4]
    figures = {
        "jobs": JOBS, "messages": len(plan.bodies), "seconds": round(elapsed, 1),
        "jobs_per_s": round(JOBS / elapsed, 2),
        "rekognition_calls": stats["requests"], "throttled": stats["throttled"], "faults": stats["faults"],
        "throttled_share": round(stats["throttled"] / max(1, stats["requests"]), 3),
        "fault_share": round(stats["faults"] / max(1, stats["requests"]), 3),
        "rss_warm_mb": round(warm_at[1] / 2**20, 1), "rss_end_mb": round(end[1] / 2**20, 1),
        "rss_peak_mb": round(max(s[1] for s in sampler.samples) / 2**20, 1), "rss_growth": round(rss_growth, 3),
        "child_processes": len(children), "rss_with_children_warm_mb": round(warm_at[4] / 2**20, 1),
        "rss_with_children_end_mb": round(end[4] / 2**20, 1), "rss_with_children_growth": round(tree_growth, 3),
        "fds_warm": warm_at[2], "fds_end": end[2], "sockets_warm": warm_at[3], "sockets_end": end[3],
        "tasks_start": first["tasks"], "tasks_end": idle["tasks"], "pool_checked_out_end": idle["checked_out"],
        "db_connections_end": connections, "duplicated_jobs": len(plan.duplicated),
        "outcomes": _outcomes(proc),
    }
    print("\nSOAK " + json.dumps(figures))
    assert rss_growth < 0.10 and tree_growth < 0.10, figures
    assert idle["checked_out"] == 0, figures
    assert idle["tasks"] <= first["tasks"] + 1, (figures, first.get("task_names"), idle.get("task_names"))
    assert connections <= 10 + 1, figures  # the pool, and fleet mode's one limiter connection
    assert end[2] <= warm_at[2] + 5 and end[3] <= warm_at[3] + 5, figures
    assert stats["throttled"] > 0 and stats["faults"] > 0, figures


def _outcomes(proc: WorkerProcess) -> dict[str, int]:
    stopped = proc.events("worker stopped")
    if stopped and isinstance(stopped[-1].get("outcomes"), dict):
        return dict(stopped[-1]["outcomes"])
    return {}
