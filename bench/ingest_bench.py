"""Ingestion throughput and memory: the product's `backfill` path against a bare reference pipeline.

Both run on the same pre-rendered pages served by the Rekognition emulator in its own process (so the
server's serialization is not measured), each in a fresh child process (so peak RSS is its own):

- worker:    `worker.backfill.run_backfill`, i.e. HTTP -> aiobotocore -> normalization -> PostgreSQL,
             with every guarantee (atomic per job, idempotent, raw page archive, rate limiter);
- reference: raw aiohttp POSTs + orjson + a minimal flatten + asyncpg COPY into plain tables with no
             keys, the next page fetched while the last is written.

Each workload is measured `--repeat` times (default 3) into fresh databases, the two pipelines taking
turns to go first, each starting from a CHECKPOINT; the table shows medians, the median of the
per-run ratios and their range. Prints faces/s and rows/s for both, their ratio, peak RSS, and CPU per
page: the client's (the pipeline's processes, user + system, the decoding process included; not wall time)
and the local PostgreSQL server's, for both pipelines, with the per-run range of the client CPU ratio (the
machine may be shared: CPU time and same-run ratios are what to compare). Usage:

    .venv/bin/python bench/ingest_bench.py                 # the full table (a few minutes)
    .venv/bin/python bench/ingest_bench.py --smoke         # tiny, for CI: proves it runs, asserts nothing
    .venv/bin/python bench/ingest_bench.py --json out.json # also write the figures
    .venv/bin/python bench/ingest_bench.py --citus         # on a coordinator and two workers (docs/citus.md)

With ``--citus`` (``make bench BENCH_CITUS=1``) every database is created on a throwaway Citus cluster started
from the installed Citus (worker/local/citus.py, durable settings), so `migrate` distributes the bulk tables;
the reference pipeline's tables stay on the coordinator. Bytes stored are summed over the shards, WAL over
every node; PostgreSQL's CPU is the coordinator's only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Workload:
    name: str
    api: str  # GetFaceDetection | GetFaceSearch
    jobs: int
    pages: int
    attributes: str = "ALL"
    page_size: int = 1000

    @property
    def job_ids(self) -> list[str]:
        # Real JobIds are 64 characters: the key's width is part of what a face costs.
        return [f"bench-{self.name}-{i:03d}-".ljust(64, "x") for i in range(self.jobs)]


FULL = (
    Workload("det-all-1p", "GetFaceDetection", jobs=20, pages=1),
    Workload("det-all-10p", "GetFaceDetection", jobs=3, pages=10),
    Workload("det-all-50p", "GetFaceDetection", jobs=1, pages=50),
    Workload("search-10p", "GetFaceSearch", jobs=3, pages=10, attributes="DEFAULT"),
)
SMOKE = (
    Workload("smoke-det", "GetFaceDetection", jobs=2, pages=2, page_size=100),
    Workload("smoke-search", "GetFaceSearch", jobs=1, pages=2, attributes="DEFAULT", page_size=100),
)


@dataclass
class Result:
    workload: str
    pipeline: str
    faces: int
    rows: int
    seconds: float
    peak_rss_mb: float
    cpu_s: float = 0.0  # user + system CPU of the pipeline's processes (not PostgreSQL's)
    postgres_cpu_s: float | None = None  # the local PostgreSQL server's CPU during the run
    pages: int = 0
    wal_bytes: int = 0  # WAL PostgreSQL wrote during the run (the cluster's insert position moved by this much)
    # Bytes the run left in its database, by kind: heap, index, toast, archive (raw_pages: heap, TOAST, index).
    stored: dict[str, int] = field(default_factory=dict)

    @property
    def faces_per_s(self) -> float:
        return self.faces / self.seconds if self.seconds else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


# --- the emulator, in its own process --------------------------------------------------------------


def _serve(workloads: list[dict[str, Any]], ready: Any, stop: Any) -> None:
    from worker.local import synth
    from worker.local.emulator import EmulatorConfig, EmulatorThread

    fixtures = []
    for w in (Workload(**d) for d in workloads):
        for n, job_id in enumerate(w.job_ids):
            count = w.pages * w.page_size
            if w.api == "GetFaceDetection":
                fixtures.append(synth.detection_job(job_id, faces=count, attributes=w.attributes, seed=n))  # type: ignore[arg-type]
            else:
                fixtures.append(synth.search_job(job_id, persons_elements=count, seed=n))
    with EmulatorThread(EmulatorConfig(), jobs=fixtures) as emu:
        for page_size in sorted({Workload(**d).page_size for d in workloads}):
            emu.prerender(max_results=page_size)
        ready.send(emu.url)
        stop.recv()


# --- the two pipelines, each in a fresh process ------------------------------------------------------


def _cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 onwards), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _postmaster_pid(base_url: str) -> int | None:
    """The pid of the PostgreSQL server behind ``base_url`` when it runs on this machine (a backend's parent)."""
    import asyncpg

    async def run() -> list[str] | None:
        conn = await asyncpg.connect(base_url)
        try:  # read while the backend lives: it exits with the connection
            return _stat(int(await conn.fetchval("SELECT pg_backend_pid()")))
        finally:
            await conn.close()

    fields = asyncio.run(run())
    return int(fields[1]) if fields is not None else None


def _postgres_cpu_s(postmaster: int | None) -> float | None:
    """CPU of the benchmark's PostgreSQL server so far: the postmaster, its live processes, and the backends
    it has reaped (counted in its children's times). Other servers on the machine are not counted.

    None when the server is not on this machine (a remote DATABASE_URL) or /proc is unavailable.
    """
    if postmaster is None:
        return None
    hz, total = os.sysconf("SC_CLK_TCK"), 0
    own = _stat(postmaster)
    if own is None:
        return None
    # utime + stime, and cutime + cstime: exited backends are counted in the postmaster's children.
    total += int(own[11]) + int(own[12]) + int(own[13]) + int(own[14])
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        fields = _stat(pid)
        if fields is not None and int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / hz


def _peak_rss_mb() -> float:
    """This process's peak RSS plus the largest of its children's (the page-decoding process)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def _run_worker(workload: dict[str, Any], db_url: str, endpoint: str, conn: Any) -> None:
    os.environ["AWS_ENDPOINT_URL_REKOGNITION"] = endpoint
    from rich.console import Console

    from worker.backfill import run_backfill
    from worker.config import Settings
    from worker.logs import configure_logging
    from worker.messages import JobRef
    from worker.pagecodec import tune_gc

    configure_logging("warning", "json")
    tune_gc()  # as `python -m worker` does
    w = Workload(**workload)
    settings = Settings.from_env().with_(database_url=db_url, rekognition_tps=1000.0, max_concurrent_jobs=4,
                                         page_size=w.page_size)
    refs = [JobRef.create(j, w.api) for j in w.job_ids]
    cpu_before = _cpu_s()
    started = time.perf_counter()
    outcomes = asyncio.run(run_backfill(settings, refs, console=Console(file=open(os.devnull, "w"))))  # noqa: SIM115
    seconds = time.perf_counter() - started
    bad = [o for o in outcomes if o.outcome != "ingested"]
    if bad:
        raise SystemExit(f"worker failed: {bad[0].job_id}: {bad[0].outcome}: {bad[0].reason}")
    conn.send(Result(w.name, "worker", sum(o.faces for o in outcomes), sum(o.rows for o in outcomes), seconds,
                     _peak_rss_mb(), _cpu_s() - cpu_before, pages=sum(o.pages for o in outcomes)))


# Plain tables, as the reference is defined: no keys, no indexes, but logged like any real table.
# `--unlogged-reference` drops the WAL as well, for a stricter (faster) reference.
REFERENCE_DDL = """
DROP TABLE IF EXISTS ref_faces, ref_landmarks, ref_emotions, ref_matches;
CREATE {kind} TABLE ref_faces (job_id text, seq int, ts bigint, person bigint, w float8, h float8, l float8,
    t float8, conf float8, age_low int, age_high int, smile bool, smile_c float8, gender text, gender_c float8,
    roll float8, yaw float8, pitch float8, brightness float8, sharpness float8);
CREATE {kind} TABLE ref_landmarks (job_id text, seq int, type text, x float8, y float8);
CREATE {kind} TABLE ref_emotions (job_id text, seq int, type text, conf float8);
CREATE {kind} TABLE ref_matches (job_id text, seq int, face_id text, similarity float8);
"""


def _flatten(job_id: str, page: dict[str, Any], seq: int, search: bool) -> tuple[list[Any], ...]:
    faces, lms, ems, matches = [], [], [], []
    for n, el in enumerate(page.get("Persons" if search else "Faces", [])):
        s = seq + n
        if search:
            person = el.get("Person", {})
            face, index = person.get("Face", {}), person.get("Index")
            for m in el.get("FaceMatches", []):
                matches.append((job_id, s, m["Face"]["FaceId"], m["Similarity"]))
        else:
            face, index = el["Face"], None
        bb, pose, q = face.get("BoundingBox", {}), face.get("Pose", {}), face.get("Quality", {})
        age, smile, gender = face.get("AgeRange", {}), face.get("Smile", {}), face.get("Gender", {})
        faces.append((job_id, s, el["Timestamp"], index, bb.get("Width"), bb.get("Height"), bb.get("Left"),
                      bb.get("Top"), face.get("Confidence"), age.get("Low"), age.get("High"), smile.get("Value"),
                      smile.get("Confidence"), gender.get("Value"), gender.get("Confidence"), pose.get("Roll"),
                      pose.get("Yaw"), pose.get("Pitch"), q.get("Brightness"), q.get("Sharpness")))
        for lm in face.get("Landmarks", []):
            lms.append((job_id, s, lm["Type"], lm["X"], lm["Y"]))
        for em in face.get("Emotions", []):
            ems.append((job_id, s, em["Type"], em["Confidence"]))
    return faces, lms, ems, matches


async def _reference(w: Workload, db_url: str, endpoint: str, unlogged: bool) -> tuple[int, int]:
    import aiohttp
    import asyncpg
    import orjson

    search = w.api == "GetFaceSearch"
    headers = {"X-Amz-Target": f"RekognitionService.{w.api}", "Content-Type": "application/x-amz-json-1.1",
               "Authorization": "AWS4-HMAC-SHA256 Credential=bench/20260101/us-east-1/rekognition/aws4_request"}
    conn = await asyncpg.connect(db_url)
    faces = rows = 0
    sem = asyncio.Semaphore(4)
    try:
        await conn.execute(REFERENCE_DDL.format(kind="UNLOGGED" if unlogged else ""))
        pool = await asyncpg.create_pool(db_url, min_size=4, max_size=4)
        async with aiohttp.ClientSession() as http:

            async def fetch(job_id: str, token: str | None) -> dict[str, Any]:
                body: dict[str, Any] = {"JobId": job_id, "MaxResults": w.page_size}
                if token:
                    body["NextToken"] = token
                async with http.post(endpoint, data=orjson.dumps(body), headers=headers) as resp:
                    return orjson.loads(await resp.read())  # type: ignore[no-any-return]

            async def one(job_id: str) -> tuple[int, int]:
                n_faces = n_rows = seq = 0
                async with sem, pool.acquire() as db:
                    page = await fetch(job_id, None)
                    while page is not None:
                        token = page.get("NextToken")
                        nxt = asyncio.create_task(fetch(job_id, token)) if token else None
                        f, lm, em, mt = _flatten(job_id, page, seq, search)
                        seq += len(f)
                        for table, recs in (("ref_faces", f), ("ref_landmarks", lm), ("ref_emotions", em),
                                            ("ref_matches", mt)):
                            if recs:
                                await db.copy_records_to_table(table, records=recs)
                        n_faces += len(f)
                        n_rows += len(f) + len(lm) + len(em) + len(mt)
                        page = await nxt if nxt else None
                return n_faces, n_rows

            for f, r in await asyncio.gather(*(one(j) for j in w.job_ids)):
                faces += f
                rows += r
        await pool.close()
    finally:
        await conn.close()
    return faces, rows


def _run_reference(workload: dict[str, Any], db_url: str, endpoint: str, unlogged: bool, conn: Any) -> None:
    w = Workload(**workload)
    cpu_before = _cpu_s()
    started = time.perf_counter()
    faces, rows = asyncio.run(_reference(w, db_url, endpoint, unlogged))
    conn.send(Result(w.name, "reference", faces, rows, time.perf_counter() - started, _peak_rss_mb(),
                     _cpu_s() - cpu_before, pages=w.jobs * w.pages))


def _in_child(target: Any, *args: Any) -> Result:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not parent.poll():
        raise RuntimeError(f"{target.__name__} failed with exit code {proc.exitcode}")
    return parent.recv()  # type: ignore[no-any-return]


# --- orchestration -----------------------------------------------------------------------------------


# The cluster of a --citus run.
_CLUSTER: list[Any] = []


def _database(base_url: str, name: str) -> str:
    from worker.config import Settings
    from worker.db.migrate import upgrade_to_head

    if _CLUSTER:
        from worker.local.citus import create_citus_database

        for node in _CLUSTER[0].nodes:
            _admin(node.url(), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        asyncio.run(create_citus_database(_CLUSTER[0], name))
    else:
        _admin(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    head, _, query = base_url.partition("?")
    url = head.rsplit("/", 1)[0] + "/" + name + (("?" + query) if query else "")
    upgrade_to_head(Settings(database_url=url))
    return url


def _machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.machine()}"


def _admin(base_url: str, *statements: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(base_url)
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


# Bytes on disk per table of a database's own schemas: heap (main fork + free space map + visibility map),
# TOAST (its table and its index) and the table's own indexes. The archive (raw_pages) is counted apart.
_STORED_SQL = """
SELECT c.relname = 'raw_pages' AS archive,
       pg_table_size(c.oid) - coalesce(pg_total_relation_size(c.reltoastrelid), 0) AS heap,
       coalesce(pg_total_relation_size(c.reltoastrelid), 0) AS toast,
       pg_indexes_size(c.oid) AS index
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  AND c.relname <> 'alembic_version'
"""
# On Citus the coordinator's distributed tables are empty shells: their bytes are summed over the shards.
_STORED_CITUS_SQL = """
SELECT c.relname = 'raw_pages' AS archive, citus_table_size(c.oid) AS heap, 0::bigint AS toast,
       citus_total_relation_size(c.oid) - citus_table_size(c.oid) AS index
FROM pg_class c JOIN pg_dist_partition p ON p.logicalrelid = c.oid
"""
_NOT_DISTRIBUTED = " AND NOT EXISTS (SELECT 1 FROM pg_dist_partition p WHERE p.logicalrelid = c.oid)"


def _stored(db_url: str) -> dict[str, int]:
    """Bytes stored by kind (heap, index, toast, archive) in ``db_url``, after a checkpoint and a vacuum so
    the free space map and visibility map exist as they would on a live database."""
    import asyncpg

    async def run() -> dict[str, int]:
        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute("VACUUM")
            out = {"heap": 0, "index": 0, "toast": 0, "archive": 0}
            rows = await conn.fetch(_STORED_SQL + _NOT_DISTRIBUTED) + await conn.fetch(_STORED_CITUS_SQL) \
                if _CLUSTER else await conn.fetch(_STORED_SQL)
            for r in rows:
                if r["archive"]:
                    out["archive"] += r["heap"] + r["toast"] + r["index"]
                else:
                    out["heap"] += r["heap"]
                    out["index"] += r["index"]
                    out["toast"] += r["toast"]
            return out
        finally:
            await conn.close()

    return asyncio.run(run())


def _wal_lsn(base_url: str) -> int:
    """The WAL insert position, summed over every node of a --citus run."""
    import asyncpg

    async def run(url: str) -> int:
        conn = await asyncpg.connect(url)
        try:
            return int(await conn.fetchval("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn"))
        finally:
            await conn.close()

    return sum(asyncio.run(run(url)) for url in ([n.url() for n in _CLUSTER[0].nodes] if _CLUSTER else [base_url]))


def _cpu_note(r: Result) -> str:
    """CPU ms per 1000 faces: the pipeline's own processes, and PostgreSQL's when it runs here."""
    note = f"CPU ms per 1000 faces: {r.cpu_s * 1e6 / r.faces:,.0f} own"
    if r.postgres_cpu_s is not None:
        note += f" + {r.postgres_cpu_s * 1e6 / r.faces:,.0f} PostgreSQL"
    return note


def _cost(results: list[Result], prefix: str) -> dict[str, float]:
    """Cost figures, medians over the runs: bytes stored and WAL bytes per face, CPU ms per page."""
    out: dict[str, float] = {
        f"{prefix}_wal_bytes_per_face": median(r.wal_bytes / r.faces for r in results if r.faces),
        f"{prefix}_cpu_ms_per_page": median(r.cpu_s * 1e3 / r.pages for r in results if r.pages),
    }
    pg = [r.postgres_cpu_s * 1e3 / r.pages for r in results if r.pages and r.postgres_cpu_s is not None]
    if pg:
        out[f"{prefix}_postgres_cpu_ms_per_page"] = median(pg)
    if all(r.stored for r in results):
        for kind in ("heap", "index", "toast", "archive"):
            out[f"{prefix}_{kind}_bytes_per_face"] = median(r.stored[kind] / r.faces for r in results if r.faces)
        out[f"{prefix}_stored_bytes_per_face"] = median(sum(r.stored.values()) / r.faces for r in results if r.faces)
    return out


def _summarize(w: Workload, runs: list[tuple[Result, Result]]) -> dict[str, Any]:
    """Medians over the repetitions; the ratio is the median of each repetition's own ratio."""
    ratios = [wr.faces_per_s / rr.faces_per_s if rr.faces_per_s else 0.0 for wr, rr in runs]
    # Client CPU per page, worker over reference, per run: below 1.0 the worker spends less.
    cpu_ratios = [(wr.cpu_s / wr.pages) / (rr.cpu_s / rr.pages) for wr, rr in runs
                  if wr.pages and rr.pages and rr.cpu_s]
    workers, refs = [wr for wr, _ in runs], [rr for _, rr in runs]
    return {
        "workload": w.name, "jobs": w.jobs, "pages": w.pages, "faces": workers[0].faces, "repeats": len(runs),
        "worker_faces_per_s": median(r.faces_per_s for r in workers),
        "worker_rows_per_s": median(r.rows_per_s for r in workers),
        "reference_faces_per_s": median(r.faces_per_s for r in refs),
        "reference_rows_per_s": median(r.rows_per_s for r in refs),
        "ratio": median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "cpu_ratio": median(cpu_ratios) if cpu_ratios else None,
        "cpu_ratio_min": min(cpu_ratios, default=None), "cpu_ratio_max": max(cpu_ratios, default=None),
        "worker_peak_rss_mb": max(r.peak_rss_mb for r in workers),
        "reference_peak_rss_mb": max(r.peak_rss_mb for r in refs),
        "worker_cpu_ms_per_1000_faces": median(r.cpu_s * 1e6 / r.faces for r in workers if r.faces),
        "reference_cpu_ms_per_1000_faces": median(r.cpu_s * 1e6 / r.faces for r in refs if r.faces),
        **_cost(workers, "worker"), **_cost(refs, "reference"),
        "runs": [{"worker": asdict(wr), "reference": asdict(rr)} for wr, rr in runs],
    }


def _measure(pipeline: str, w: Workload, db_url: str, base_url: str, endpoint: str, unlogged: bool,
             postmaster: int | None) -> Result:
    """One run of one pipeline from a checkpoint, with the server's CPU and WAL and what it stored."""
    _admin(base_url, "CHECKPOINT")
    empty = _stored(db_url) if pipeline == "worker" else {}
    wal_before = _wal_lsn(base_url)
    pg_before = _postgres_cpu_s(postmaster)
    if pipeline == "worker":
        result = _in_child(_run_worker, asdict(w), db_url, endpoint)
    else:
        result = _in_child(_run_reference, asdict(w), db_url, endpoint,
                           unlogged)
    time.sleep(0.2)  # let the postmaster reap the pipeline's backends
    pg_after = _postgres_cpu_s(postmaster)
    if pg_before is not None and pg_after is not None:
        result.postgres_cpu_s = pg_after - pg_before
    result.wal_bytes = _wal_lsn(base_url) - wal_before
    if pipeline == "worker":  # what the run added to the freshly migrated database
        result.stored = {k: v - empty[k] for k, v in _stored(db_url).items()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny workloads, for CI")
    parser.add_argument("--only", help="comma-separated workload names")
    parser.add_argument("--repeat", type=int, default=None,
                        help="measure each pipeline this many times per workload and report medians "
                             "(default 3, 1 with --smoke)")
    parser.add_argument("--unlogged-reference", action="store_true",
                        help="give the reference UNLOGGED tables (no WAL): a stricter reference")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--plot", help="write a PNG of faces/s by workload (worker vs reference)")
    parser.add_argument("--citus", action="store_true",
                        help="run on a coordinator and two workers started from the installed Citus")
    parser.add_argument("--citus-pg-bin", default="/usr/lib/postgresql/15/bin",
                        help="PostgreSQL's bin directory, with Citus installed (--citus)")
    args = parser.parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (1 if args.smoke else 3)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    workloads = list(SMOKE if args.smoke else FULL)
    if args.only:
        workloads = [w for w in workloads if w.name in set(args.only.split(","))]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    server = None
    base_url = os.environ.get("DATABASE_URL")
    if args.citus:
        from worker.local.citus import start_cluster

        _CLUSTER.append(start_cluster(bin_dir=Path(args.citus_pg_bin), durable=True))
        base_url = _CLUSTER[0].url()
    elif not base_url:
        from worker.local.pg import start_embedded_postgres

        server, base_url = start_embedded_postgres(Path(tempfile.mkdtemp(prefix="bench-pg-")) / "pgdata")
    ctx = mp.get_context("spawn")
    ready_parent, ready_child = ctx.Pipe()
    stop_parent, stop_child = ctx.Pipe()
    emu = ctx.Process(target=_serve, args=([asdict(w) for w in workloads], ready_child, stop_child), daemon=True)
    emu.start()
    table: list[dict[str, Any]] = []
    postmaster = _postmaster_pid(base_url)
    try:
        print(f"rendering {sum(w.jobs * w.pages for w in workloads)} pages in the emulator ...", flush=True)
        endpoint = ready_parent.recv()
        for w in workloads:
            runs: list[tuple[Result, Result]] = []
            for rep in range(repeat):
                tag = f"{w.name.replace('-', '_')}_{rep}"
                names = {"worker": f"bench_worker_{tag}", "reference": f"bench_ref_{tag}"}
                dbs = {pipeline: _database(base_url, name) for pipeline, name in names.items()}
                measured: dict[str, Result] = {}
                # Alternate which pipeline goes first, and start each from a checkpoint, so neither
                # pays for the other's dirty pages or for drift on a shared machine.
                for pipeline in ("worker", "reference")[::(-1 if rep % 2 else 1)]:
                    measured[pipeline] = _measure(pipeline, w, dbs[pipeline], base_url, endpoint,
                                                  args.unlogged_reference, postmaster)
                _admin(base_url, *(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names.values()))
                wr, rr = measured["worker"], measured["reference"]
                runs.append((wr, rr))
                print(f"{w.name} #{rep + 1}: worker {wr.faces_per_s:,.0f} faces/s ({_cpu_note(wr)}), reference "
                      f"{rr.faces_per_s:,.0f} faces/s ({_cpu_note(rr)}), ratio {wr.faces_per_s / rr.faces_per_s:.2f}, "
                      f"client CPU ms/page {wr.cpu_s * 1e3 / wr.pages:,.0f} vs {rr.cpu_s * 1e3 / rr.pages:,.0f}",
                      flush=True)
            table.append(_summarize(w, runs))
    finally:
        stop_parent.send("stop")
        emu.join(timeout=10)
        if server is not None:
            server.cleanup_mode = "delete"
            server.cleanup()
        for cluster in _CLUSTER:
            cluster.stop()

    reference = "UNLOGGED" if args.unlogged_reference else "plain (logged)"
    print(f"\nmachine: {_machine()}; medians of {repeat} run(s); reference tables: {reference}")
    header = (f"{'workload':<14} {'jobs x pages':>12} {'faces':>7} {'worker faces/s':>15} {'worker rows/s':>14} "
              f"{'ref faces/s':>12} {'ref rows/s':>11} {'ratio':>6} {'ratio range':>12} {'worker RSS MB':>14} "
              f"{'ref RSS MB':>11}")
    print(header)
    print("-" * len(header))
    for r in table:
        size = f"{r['jobs']} x {r['pages']}"
        spread = f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}"
        print(f"{r['workload']:<14} {size:>12} {r['faces']:>7} {r['worker_faces_per_s']:>15,.0f} "
              f"{r['worker_rows_per_s']:>14,.0f} {r['reference_faces_per_s']:>12,.0f} "
              f"{r['reference_rows_per_s']:>11,.0f} {r['ratio']:>6.2f} {spread:>12} "
              f"{r['worker_peak_rss_mb']:>14.0f} {r['reference_peak_rss_mb']:>11.0f}")
    _print_cpu(table)
    _print_cost(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": _machine(), "repeats": repeat,
                                               "reference_tables": reference, "results": table}, indent=2))
    if args.plot:
        _plot(table, args.plot)
    return 0


def _print_cpu(table: list[dict[str, Any]]) -> None:
    print("\nCPU ms per page (medians; client = the pipeline's own processes, decoding process included)")
    header = (f"{'workload':<14} {'worker client':>14} {'ref client':>11} {'client ratio':>13} {'ratio range':>12} "
              f"{'worker PostgreSQL':>18} {'ref PostgreSQL':>15}")
    print(header)
    print("-" * len(header))
    def ms(r: dict[str, Any], key: str) -> str:
        value = r.get(key)
        return "-" if value is None else f"{value:,.0f}"

    for r in table:
        spread = "-" if r.get("cpu_ratio_min") is None else f"{r['cpu_ratio_min']:.2f}-{r['cpu_ratio_max']:.2f}"
        ratio = "-" if r.get("cpu_ratio") is None else f"{r['cpu_ratio']:.2f}"
        print(f"{r['workload']:<14} {ms(r, 'worker_cpu_ms_per_page'):>14} {ms(r, 'reference_cpu_ms_per_page'):>11} "
              f"{ratio:>13} {spread:>12} {ms(r, 'worker_postgres_cpu_ms_per_page'):>18} "
              f"{ms(r, 'reference_postgres_cpu_ms_per_page'):>15}")


def _print_cost(table: list[dict[str, Any]]) -> None:
    print("\nwhat a face costs (medians): the worker's bytes stored per face by kind, WAL bytes per face and CPU ms "
          "per page; the reference's WAL per face")
    header = (f"{'workload':<14} {'heap':>6} {'index':>6} {'toast':>6} {'archive':>8} {'stored':>7} {'WAL':>7} "
              f"{'worker CPU ms/page':>19} {'PostgreSQL CPU ms/page':>23} {'ref WAL':>8}")
    print(header)
    print("-" * len(header))
    for r in table:
        pg_ms = r.get("worker_postgres_cpu_ms_per_page")
        print(f"{r['workload']:<14} {r['worker_heap_bytes_per_face']:>6,.0f} "
              f"{r['worker_index_bytes_per_face']:>6,.0f} {r['worker_toast_bytes_per_face']:>6,.0f} "
              f"{r['worker_archive_bytes_per_face']:>8,.0f} "
              f"{r['worker_stored_bytes_per_face']:>7,.0f} {r['worker_wal_bytes_per_face']:>7,.0f} "
              f"{r['worker_cpu_ms_per_page']:>19,.0f} {'-' if pg_ms is None else f'{pg_ms:,.0f}':>23} "
              f"{r['reference_wal_bytes_per_face']:>8,.0f}")


def _plot(table: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['workload']}\n{r['jobs']} job(s) x {r['pages']} page(s)" for r in table]
    xs = range(len(table))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ax.bar([x - 0.2 for x in xs], [r["worker_faces_per_s"] for r in table], width=0.4, label="worker (backfill)")
    ax.bar([x + 0.2 for x in xs], [r["reference_faces_per_s"] for r in table], width=0.4,
           label="bare reference pipeline")
    for x, r in zip(xs, table, strict=True):
        ax.annotate(f"{r['ratio']:.2f}x", (x - 0.2, r["worker_faces_per_s"]), ha="center", va="bottom")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("faces / s")
    ax.set_title(f"Ingest throughput by job size ({_machine().split(',')[0]})")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
