"""Crash safety with real processes: SIGKILL mid-job, PostgreSQL restarted under a running worker, two
processes on one job, and SQS redelivering a message whose job is still running elsewhere.

Every scenario ends with the same check: the job's rows equal, table by table, those of one clean
ingest of the same job into a fresh database. The jobs are synthesized from a random seed each run
(printed on failure), so the check runs on data nobody looked at beforehand.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import psutil
import pytest

from tests.helpers import dump_job
from tests.reliability import (
    WorkerProcess,
    alive,
    clean_dump,
    create_database,
    drop_database,
    kill_all,
    queue_counts,
    take_all,
    worker_env,
)
from worker.config import Settings
from worker.local import synth
from worker.local.sqs import create_queue_with_dlq, notification, sns_envelope
from worker.messages import JobRef

pytestmark = pytest.mark.slow

PAGE_SIZE = 20
# Many small pages with some latency: a job takes a few seconds, long enough to interrupt mid-way.
LATENCY_S = 0.06
REFERENCE_SETTINGS = Settings(page_size=PAGE_SIZE, rekognition_tps=1000.0, retry_base_s=0.01, retry_cap_s=0.05,
                              max_call_attempts=4, log_format="json")


def unseen_job(kind: str) -> tuple[synth.JobFixture, str]:
    """A job from a fresh random seed; returns it and a description to print on failure."""
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    job_id = f"crash-{kind}-{seed:x}-{rng.randrange(16**6):06x}"
    if kind == "search":
        fx = synth.search_job(job_id, persons_elements=rng.randint(350, 550), persons=rng.randint(3, 7), seed=seed,
                              all_optional=rng.random() < 0.5)
    else:
        fx = synth.detection_job(job_id, faces=rng.randint(400, 600), attributes="ALL", seed=seed,
                                 all_optional=rng.random() < 0.5)
    return fx, f"{job_id} (seed {seed}, {len(fx.results)} elements)"



@pytest.fixture
async def reference(pg_server_url: str, template_db: str) -> AsyncIterator[Callable[[JobRef], Awaitable[Any]]]:
    """reference(ref): the dump of one clean ingest of ``ref`` into a fresh database."""
    urls: list[str] = []

    async def clean(ref: JobRef) -> Any:
        urls.append(await create_database(pg_server_url, template_db))
        return await clean_dump(REFERENCE_SETTINGS, urls[-1], ref)

    yield clean
    for url in urls:
        await drop_database(pg_server_url, url)


class Reader:
    """Polls a job's visible state in one statement (one snapshot) for as long as it runs."""

    def __init__(self, db_url: str, job_id: str) -> None:
        self.db_url, self.job_id = db_url, job_id
        self.seen: set[tuple[Any, ...]] = set()
        self.polls = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        conn: asyncpg.Connection | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.db_url)
                row = await conn.fetchrow(
                    "SELECT (SELECT count(*) FROM faces WHERE "
                    "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1)) AS faces, "
                    "(SELECT count(*) FROM landmarks WHERE "
                    "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1)) AS landmarks, "
                    "(SELECT count(*) FROM raw_pages WHERE "
                    "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1)) AS pages, "
                    "(SELECT ingest_state::text FROM jobs WHERE job_id = $1) AS state", self.job_id)
                assert row is not None
                self.seen.add(tuple(row))
                self.polls += 1
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError):
                # The server is restarting: readers reconnect too.
                if conn is not None:
                    conn.terminate()
                conn = None
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.005)
        if conn is not None:
            await conn.close()

    def __enter__(self) -> Reader:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    async def finish(self) -> set[tuple[Any, ...]]:
        self._stop.set()
        assert self._task is not None
        await self._task
        return self.seen


def only_nothing_or_everything(seen: set[tuple[Any, ...]], full: dict[str, list[Any]]) -> None:
    # Nothing: no row yet, or only the notification's clock (pending) and no rows.
    nothing = {(0, 0, 0, None), (0, 0, 0, "pending")}
    everything = (len(full["faces"]), len(full["landmarks"]), len(full["raw_pages"]), "ingested")
    assert seen <= {*nothing, everything}, f"a reader saw a partial job: {seen - {*nothing, everything}}"


async def wait_until(predicate: Callable[[], Awaitable[bool] | bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def calls(emulator: Any) -> int:
    return int(emulator.stats()["requests"])


async def lock_held(db_url: str) -> bool:
    """Some process holds a job's advisory lock in this database: a job transaction is open."""
    conn = await asyncpg.connect(db_url)
    try:
        return bool(await conn.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()"))
    finally:
        await conn.close()


async def worker_connections(db_url: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'rekognition-worker' "
            "AND datname = current_database()"))
    finally:
        await conn.close()


async def mid_job(emulator: Any, db_url: str, proc: WorkerProcess, pages: int) -> None:
    """Wait until ``proc`` has fetched ``pages`` pages of its job inside an open job transaction."""
    await wait_until(lambda: calls(emulator) >= pages or proc.proc.poll() is not None, f"{pages} pages fetched")
    assert proc.proc.poll() is None, f"the job ended before it could be interrupted: {proc.output()[-2000:]}"
    assert await lock_held(db_url), "no job transaction open"


def backfill(fx: synth.JobFixture, db_url: str, emulator: Any, **env: str) -> WorkerProcess:
    return WorkerProcess(["backfill", "--api", fx.api, fx.job_id], worker_env(
        DATABASE_URL=db_url, AWS_ENDPOINT_URL_REKOGNITION=emulator.url, PAGE_SIZE=str(PAGE_SIZE), **env))


async def finished(proc: WorkerProcess, timeout_s: float = 90) -> int:
    return await asyncio.to_thread(proc.wait, timeout_s)


# --- SIGKILL -------------------------------------------------------------------------------------


async def test_sigkill_mid_job_then_rerun_ends_with_one_clean_ingest(
    emu: Any, db_url: str, db: asyncpg.Connection, reference: Callable[[JobRef], Awaitable[Any]],
) -> None:
    fx, what = unseen_job("search")
    emu.add_job(fx)
    ref = JobRef.create(fx.job_id, fx.api)
    expected = await reference(ref)
    emu.configure(latency_s=LATENCY_S)
    emu.reset_stats()
    with Reader(db_url, fx.job_id) as reader, leftovers() as left:
        victim = backfill(fx, db_url, emu)
        await mid_job(emu, db_url, victim, pages=8)
        left.extend(victim.children())
        victim.proc.send_signal(signal.SIGKILL)
        assert await finished(victim) == -signal.SIGKILL
        # The killed transaction is rolled back by the server: nothing of it, no lock, no session left.
        await wait_until(lambda: _no_worker(db_url), "the killed process's sessions to end")
        assert not await lock_held(db_url)
        assert await dump_job(db, fx.job_id) == {table: [] for table in expected}, what
        emu.configure(latency_s=0.0)
        rerun = backfill(fx, db_url, emu)
        assert await finished(rerun) == 0, rerun.output()[-3000:]
        seen = await reader.finish()
    assert await dump_job(db, fx.job_id) == expected, what
    assert await db.fetchval("SELECT attempts FROM jobs WHERE job_id = $1", fx.job_id) == 1
    only_nothing_or_everything(seen, expected)
    assert reader.polls > 20


async def _no_worker(db_url: str) -> bool:
    return await worker_connections(db_url) == 0


@contextlib.contextmanager
def leftovers() -> Iterator[list[psutil.Process]]:
    """Processes a killed worker left behind; killed (by pid) when the test ends, whatever happened."""
    found: list[psutil.Process] = []
    try:
        yield found
    finally:
        kill_all(found)


async def test_sigkill_leaves_no_orphan_processes(emu: Any, db_url: str) -> None:
    """A worker killed outright (OOM killer, SIGKILL from a supervisor) must not leave helper
    processes running: nothing would ever stop them, and they hold the worker's stdout open."""
    fx, _ = unseen_job("detection")
    emu.add_job(fx)
    emu.configure(latency_s=LATENCY_S)
    emu.reset_stats()
    with leftovers() as left:
        victim = backfill(fx, db_url, emu)
        await mid_job(emu, db_url, victim, pages=8)
        left.extend(victim.children())
        victim.proc.send_signal(signal.SIGKILL)
        await finished(victim)
        await wait_until(lambda: not alive(left), "the killed worker's child processes to exit", timeout_s=10)


def run_worker(db_url: str, queue_url: str, moto_url: str, emulator: Any, *args: str, **env: str) -> WorkerProcess:
    return WorkerProcess(["run", *args], worker_env(
        DATABASE_URL=db_url, QUEUE_URL=queue_url, AWS_ENDPOINT_URL_SQS=moto_url,
        AWS_ENDPOINT_URL_REKOGNITION=emulator.url, PAGE_SIZE=str(PAGE_SIZE), **env))


def outcomes(*procs: WorkerProcess) -> list[str]:
    return sorted(str(e.get("outcome")) for p in procs for e in p.events("job finished"))


async def test_sigkill_of_the_sqs_worker_mid_job_redelivers_to_the_next_one(
    emu: Any, db_url: str, db: asyncpg.Connection, sqs: Any, moto_url: str,
    reference: Callable[[JobRef], Awaitable[Any]],
) -> None:
    fx, what = unseen_job("detection")
    emu.add_job(fx)
    expected = await reference(JobRef.create(fx.job_id, fx.api))
    queue_url, dlq_url = await create_queue_with_dlq(sqs, f"crash-{random.randrange(10**9)}", visibility_timeout_s=3,
                                                     max_receive_count=5)
    await sqs.send_message(QueueUrl=queue_url, MessageBody=sns_envelope(notification(fx)))
    emu.configure(latency_s=LATENCY_S)
    emu.reset_stats()
    with Reader(db_url, fx.job_id) as reader, leftovers() as left:
        victim = run_worker(db_url, queue_url, moto_url, emu)
        await mid_job(emu, db_url, victim, pages=8)
        left.extend(victim.children())
        victim.proc.send_signal(signal.SIGKILL)
        await finished(victim)
        emu.configure(latency_s=0.0)
        # Nobody extends the message's visibility any more: it returns after VISIBILITY_TIMEOUT_S.
        successor = run_worker(db_url, queue_url, moto_url, emu, "--exit-when-idle")
        assert await finished(successor) == 0, successor.output()[-3000:]
        seen = await reader.finish()
    assert await dump_job(db, fx.job_id) == expected, what
    assert await db.fetchval("SELECT attempts FROM jobs WHERE job_id = $1", fx.job_id) == 1
    only_nothing_or_everything(seen, expected)
    assert outcomes(successor) == ["ingested"]
    assert [e.get("receive_count") for e in successor.events("job finished")] == [2]
    assert await queue_counts(sqs, queue_url) == (0, 0, 0)
    assert await take_all(sqs, dlq_url) == []


# --- PostgreSQL restarted under a running worker -------------------------------------------------


class OwnPostgres:
    """An embedded PostgreSQL of this test's own, which it may stop and start at will."""

    def __init__(self) -> None:
        from worker.local.pg import start_embedded_postgres

        self.tmp = Path(tempfile.mkdtemp(prefix="crash-pg-"))
        self.pgdata = self.tmp / "pgdata"
        self.server, self.url = start_embedded_postgres(self.pgdata)
        self.socket_dir = parse_qs(urlsplit(self.url).query)["host"][0]

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(list(args), pgdata=self.pgdata, user=self.server.system_user, timeout=30)

    def stop(self) -> None:
        # Fast shutdown: every session is terminated at once, open transactions are rolled back.
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        # The same socket directory as before, so the worker's DATABASE_URL still points at it.
        self._pg_ctl("-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.pgdata / "log"), "start")

    def close(self) -> None:
        self.server.cleanup_mode = "delete"
        with contextlib.suppress(Exception):
            self.server.cleanup()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
async def own_pg() -> AsyncIterator[tuple[OwnPostgres, str]]:
    from worker.db.migrate import upgrade_to_head

    pg = await asyncio.to_thread(OwnPostgres)
    try:
        url = await create_database(pg.url)
        await asyncio.to_thread(upgrade_to_head, Settings(database_url=url))
        yield pg, url
    finally:
        await asyncio.to_thread(pg.close)


async def restart_mid_job(pg: OwnPostgres, emulator: Any, db_url: str, proc: WorkerProcess,
                          outage_s: float) -> None:
    await mid_job(emulator, db_url, proc, pages=8)
    await asyncio.to_thread(pg.stop)
    await asyncio.sleep(outage_s)
    await asyncio.to_thread(pg.start)


async def test_postgres_restart_under_backfill_completes_the_job(
    emu: Any, own_pg: tuple[OwnPostgres, str], reference: Callable[[JobRef], Awaitable[Any]],
) -> None:
    pg, url = own_pg
    fx, what = unseen_job("search")
    emu.add_job(fx)
    expected = await reference(JobRef.create(fx.job_id, fx.api))
    emu.configure(latency_s=LATENCY_S)
    emu.reset_stats()
    with Reader(url, fx.job_id) as reader:
        proc = backfill(fx, url, emu)
        await restart_mid_job(pg, emu, url, proc, outage_s=1.0)
        assert await finished(proc) == 0, proc.output()[-3000:]
        seen = await reader.finish()
    # The outage hit the job: its first try was handed back as transient, a later round stored it.
    tries = [e.get("outcome") for e in proc.events("job finished")]
    assert tries[0] == "transient" and tries[-1] == "ingested", tries
    conn = await asyncpg.connect(url)
    try:
        assert await dump_job(conn, fx.job_id) == expected, what
    finally:
        await conn.close()
    only_nothing_or_everything(seen, expected)


async def test_postgres_restart_under_the_sqs_worker_completes_the_job(
    emu: Any, own_pg: tuple[OwnPostgres, str], sqs: Any, moto_url: str,
    reference: Callable[[JobRef], Awaitable[Any]],
) -> None:
    pg, url = own_pg
    fx, what = unseen_job("detection")
    emu.add_job(fx)
    expected = await reference(JobRef.create(fx.job_id, fx.api))
    queue_url, dlq_url = await create_queue_with_dlq(sqs, f"restart-{random.randrange(10**9)}",
                                                     visibility_timeout_s=3, max_receive_count=5)
    await sqs.send_message(QueueUrl=queue_url, MessageBody=sns_envelope(notification(fx)))
    emu.configure(latency_s=LATENCY_S)
    emu.reset_stats()
    # One process throughout: it must reconnect (pool pre-ping) rather than be restarted itself.
    proc = run_worker(url, queue_url, moto_url, emu, "--exit-when-idle")
    await restart_mid_job(pg, emu, url, proc, outage_s=1.0)
    emu.configure(latency_s=0.0)
    assert await finished(proc, timeout_s=120) == 0, proc.output()[-3000:]
    tries = outcomes(proc)
    assert "ingested" in tries and ("transient" in tries or "error" in tries), tries
    conn = await asyncpg.connect(url)
    try:
        assert await dump_job(conn, fx.job_id) == expected, what
        assert await conn.fetchval("SELECT attempts FROM jobs WHERE job_id = $1", fx.job_id) == 1
    finally:
        await conn.close()
    assert await queue_counts(sqs, queue_url) == (0, 0, 0)
    assert await take_all(sqs, dlq_url) == []


# --- two processes, one job ----------------------------------------------------------------------


async def test_two_backfills_of_one_job_at_once_end_with_the_rows_of_one(
    emu: Any, db_url: str, db: asyncpg.Connection, reference: Callable[[JobRef], Awaitable[Any]],
) -> None:
    fx, what = unseen_job("search")
    emu.add_job(fx)
    expected = await reference(JobRef.create(fx.job_id, fx.api))
    emu.configure(latency_s=LATENCY_S)
    with Reader(db_url, fx.job_id) as reader:
        first, second = backfill(fx, db_url, emu), backfill(fx, db_url, emu)
        assert await finished(first) == 0, first.output()[-3000:]
        assert await finished(second) == 0, second.output()[-3000:]
        seen = await reader.finish()
    # They overlapped: one found the job locked and backed off, then wrote it again after the other.
    assert "busy" in outcomes(first, second), outcomes(first, second)
    assert await dump_job(db, fx.job_id) == expected, what
    only_nothing_or_everything(seen, expected)


async def test_redelivery_while_the_job_runs_elsewhere_does_no_double_work(
    emu: Any, db_url: str, db: asyncpg.Connection, sqs: Any, moto_url: str,
    reference: Callable[[JobRef], Awaitable[Any]],
) -> None:
    """Worker A stalls mid-job (SIGSTOP: a long GC pause, a frozen VM) holding the job's transaction. Its
    heartbeat stops, SQS redelivers the message to worker B, and a duplicate notification arrives too.
    B must find the job busy, then recognise it as done once A resumes and commits."""
    fx, what = unseen_job("detection")
    emu.add_job(fx)
    expected = await reference(JobRef.create(fx.job_id, fx.api))
    pages = -(-len(fx.results) // PAGE_SIZE)
    queue_url, dlq_url = await create_queue_with_dlq(sqs, f"redeliver-{random.randrange(10**9)}",
                                                     visibility_timeout_s=2, max_receive_count=5)
    await sqs.send_message(QueueUrl=queue_url, MessageBody=sns_envelope(notification(fx)))
    emu.configure(latency_s=LATENCY_S)
    emu.reset_stats()
    with Reader(db_url, fx.job_id) as reader:
        a = run_worker(db_url, queue_url, moto_url, emu, "--exit-when-idle", VISIBILITY_TIMEOUT_S="2")
        await mid_job(emu, db_url, a, pages=5)
        a.proc.send_signal(signal.SIGSTOP)
        try:
            await sqs.send_message(QueueUrl=queue_url, MessageBody=sns_envelope(notification(fx, api_style="upper")))
            b = run_worker(db_url, queue_url, moto_url, emu, "--exit-when-idle", VISIBILITY_TIMEOUT_S="2")
            # B receives the redelivered message (receive count 2) while A still holds the job.
            await wait_until(lambda: len(b.events("job finished")) >= 2, "B to try both copies", timeout_s=30)
        finally:
            a.proc.send_signal(signal.SIGCONT)
        assert await finished(a) == 0, a.output()[-3000:]
        assert await finished(b) == 0, b.output()[-3000:]
        seen = await reader.finish()
    b_tries = [(e.get("receive_count"), e.get("outcome")) for e in b.events("job finished")]
    assert (2, "busy") in b_tries, b_tries
    assert outcomes(a, b).count("ingested") == 1, outcomes(a, b)
    assert set(outcomes(a, b)) <= {"ingested", "busy", "duplicate"}, outcomes(a, b)
    assert await dump_job(db, fx.job_id) == expected, what
    assert await db.fetchval("SELECT attempts FROM jobs WHERE job_id = $1", fx.job_id) == 1
    only_nothing_or_everything(seen, expected)
    # No double work: the job's pages were fetched once, plus one first page per busy try.
    busy_tries = outcomes(a, b).count("busy")
    assert calls(emu) <= pages + busy_tries, (calls(emu), pages, busy_tries)
    assert await queue_counts(sqs, queue_url) == (0, 0, 0)
    assert await take_all(sqs, dlq_url) == []
