"""Quota use of a fleet: N `backfill` processes sharing one Get* budget (RATE_LIMIT_SCOPE=fleet).

    .venv/bin/python bench/fleet_bench.py                      # this tree's worker
    .venv/bin/python bench/fleet_bench.py --compare 4259ac0    # the limiter before issue 17, then this tree's
    ... --load 4                        # 4 busy loops meanwhile (a shared machine)
    ... --pause-s 1 --pause-every-s 5   # every worker process stopped 1 s in 5 (a starved machine)
    ... --other-calls 10 --other-every-s 20   # another caller in the account, 10 calls at once every 20 s

Starts one Rekognition emulator enforcing the account quota (a token bucket holding ``quota`` tokens, as
the service's; it answers ProvisionedThroughputExceededException above it) and one PostgreSQL (embedded
unless DATABASE_URL is set), then runs ``--processes`` real ``python -m worker backfill`` processes at
once with RATE_LIMIT_SCOPE=fleet and REKOGNITION_TPS=--ceiling, each ingesting its own jobs. With
``--compare REV`` the same workload runs first with ``git archive REV worker`` (the fleet limiter as it
was), then with the working tree, against the same emulator and database.

Figures, from the emulator's own record of every call:

- ``quota_used``: admitted calls per second over the busy window (first call to last), divided by the quota.
  The emulator's bucket starts full, so a short run can show a little over 100 %.
- ``throttled_share``: the fleet's throttled calls / the fleet's calls.
- ``unspent_calls`` by phase: quota that overflowed the emulator's bucket (calls the quota would have
  admitted that nobody made) in ``startup`` (before every process's first call), ``all_running``, and
  ``tail`` (after the first process finished its last job). This is where the quota was left unused.

and from a thread polling the shared bucket row every 10 ms (``bucket``): the fleet's mean rate, its
cuts, and the tokens its refill threw away at the bucket's capacity. docs/rate-limiting.md has figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from io import BytesIO
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402  (after the path: run as a script from anywhere)
import botocore.config  # noqa: E402
import botocore.exceptions  # noqa: E402
import botocore.session  # noqa: E402

from worker.config import Settings  # noqa: E402
from worker.db.migrate import upgrade_to_head  # noqa: E402
from worker.local import synth  # noqa: E402
from worker.local.emulator import EmulatorConfig, EmulatorThread  # noqa: E402
from worker.local.pg import start_embedded_postgres  # noqa: E402

PAGE_SIZE = 50


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--jobs", type=int, default=4, help="jobs per process, all in flight at once (default 4)")
    p.add_argument("--pages", type=int, default=14, help="result pages per job (default 14: 168 calls for 3x4)")
    p.add_argument("--page-size", type=int, default=PAGE_SIZE, help=f"faces per page (default {PAGE_SIZE})")
    p.add_argument("--ceiling", type=float, default=5.0, help="REKOGNITION_TPS of the fleet (default 5)")
    p.add_argument("--quota", type=float, default=5.0, help="the emulator's account quota, calls/s (default 5)")
    p.add_argument("--latency-s", type=float, default=0.4, help="the emulator's latency per call (default 0.4)")
    p.add_argument("--stagger-s", type=float, default=0.0, help="delay between process starts (default 0)")
    p.add_argument("--load", type=int, default=0,
                   help="busy-loop processes to run meanwhile, as on a machine shared with other work (default 0)")
    p.add_argument("--pause-s", type=float, default=0.0,
                   help="stop every worker process (SIGSTOP) this long, as a machine-wide stall (default 0: never)")
    p.add_argument("--pause-every-s", type=float, default=4.0, help="one stall this often (default 4)")
    p.add_argument("--other-calls", type=int, default=0,
                   help="another caller in the account sends this many Get* calls at once, mid-run (default 0)")
    p.add_argument("--other-every-s", type=float, default=15.0, help="... this often (default 15)")
    p.add_argument("--compare", metavar="REV", help="first run the worker/ package of this git revision")
    p.add_argument("--repeat", type=int, default=1, help="runs of each variant, alternating (default 1)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


@dataclass
class Proc:
    """One backfill process as its log saw it, on the emulator's clock."""

    joined_s: float | None = None
    last_job_s: float | None = None
    jobs: Counter[str] = field(default_factory=Counter)
    rate_changes: list[tuple[float, float, str]] = field(default_factory=list)


def _parse_log(stderr: str, wall_to_mono_s: float) -> Proc:
    proc = Proc()
    for line in stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict) or "timestamp" not in event:
            continue
        at_s = datetime.fromisoformat(event["timestamp"]).timestamp() - wall_to_mono_s
        if event.get("event") == "fleet rate limit joined":
            proc.joined_s = at_s
        elif event.get("event") == "job finished":
            proc.jobs[event.get("outcome", "?")] += 1
            proc.last_job_s = at_s if proc.last_job_s is None else max(proc.last_job_s, at_s)
        elif event.get("event") == "rekognition rate changed":
            proc.rate_changes.append((at_s, event.get("rate_per_s", 0.0), event.get("why", "")))
    return proc


def unspent_by_phase(calls: list[tuple[float, str]], quota: float,
                     phases: list[tuple[str, float]]) -> dict[str, float]:
    """Quota that overflowed a replica of the emulator's bucket, split by phase (name, start time).

    Between two arrivals the bucket refills; whatever passes its capacity is quota nobody used. The
    overflow is laid on the end of the gap (the bucket fills first, then spills) and split by phase.
    """
    capacity = max(1.0, quota)
    tokens = capacity
    out = {name: 0.0 for name, _ in phases}
    last_s = calls[0][0]

    def phase_at(t: float) -> int:
        n = 0
        for i, (_, start_s) in enumerate(phases):
            if t >= start_s:
                n = i
        return n

    for arrival_s, outcome in calls:
        gap_s = max(0.0, arrival_s - last_s)
        spill = max(0.0, tokens + gap_s * quota - capacity)
        if spill > 0:
            spill_from_s = arrival_s - spill / quota
            # Split [spill_from_s, arrival_s] across phase boundaries.
            t = spill_from_s
            while t < arrival_s - 1e-12:
                n = phase_at(t)
                end_s = phases[n + 1][1] if n + 1 < len(phases) else arrival_s
                end_s = min(max(end_s, t), arrival_s)
                if end_s <= t:
                    end_s = arrival_s
                out[phases[n][0]] += (end_s - t) * quota
                t = end_s
        tokens = min(capacity, tokens + gap_s * quota)
        last_s = arrival_s
        if outcome != "throttled" and tokens >= 1.0:
            tokens -= 1.0
    return {k: round(v, 1) for k, v in out.items()}


def figures(calls: list[tuple[float, str]], procs: list[Proc], quota: float,
            other: dict[str, int] | None = None) -> dict[str, Any]:
    """``quota_used`` counts every admitted call, another caller's too (it is the account's quota);
    ``calls`` and ``throttled`` are the fleet's own."""
    other = other or {}
    first_s, last_s = calls[0][0], calls[-1][0]
    window_s = last_s - first_s
    by = Counter(outcome for _, outcome in calls)
    admitted = len(calls) - by["throttled"]
    by["throttled"] -= other.get("throttled", 0)
    fleet_calls = len(calls) - other.get("throttled", 0) - other.get("admitted", 0)
    joined = [p.joined_s for p in procs if p.joined_s is not None]
    finished = [p.last_job_s for p in procs if p.last_job_s is not None]
    # Every process's first call follows its join line within one take statement.
    all_joined_s = min(max(joined), last_s) if joined else first_s
    first_done_s = min(finished) if finished else last_s
    phases = [("startup", first_s), ("all_running", max(first_s, all_joined_s)),
              ("tail", max(first_s, all_joined_s, first_done_s))]
    per_s = Counter(int(t - first_s) for t, outcome in calls if outcome != "throttled")
    return {
        "calls": fleet_calls, "throttled": by["throttled"], "window_s": round(window_s, 2),
        "admitted_per_s": round(admitted / window_s, 3), "quota_used": round(admitted / window_s / quota, 3),
        "throttled_share": round(by["throttled"] / fleet_calls, 3), "other_caller": other,
        "startup_s": round(phases[1][1] - first_s, 2), "tail_s": round(last_s - phases[2][1], 2),
        "unspent_calls": unspent_by_phase(calls, quota, phases),
        "admitted_each_second": [per_s.get(s, 0) for s in range(int(window_s) + 1)],
        "rate_changes": sum(len(p.rate_changes) for p in procs),
        "jobs": dict(sum((p.jobs for p in procs), Counter())),
    }


def _extract(rev: str, into: Path) -> Path:
    """The worker/ package (and pyproject, for the version) of ``rev``, as a directory to run from."""
    data = subprocess.run(["git", "archive", "--format=tar", rev, "worker", "pyproject.toml"], cwd=ROOT,
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


class BucketSampler:
    """Polls the shared bucket row every few milliseconds from its own thread: the fleet's rate over time,
    and the tokens its refill threw away at the bucket's capacity (slots nobody asked for in time)."""

    def __init__(self, database_url: str, interval_s: float = 0.01) -> None:
        self._url = database_url
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.rows: list[tuple[float, float, float, float, int, int, float]] = []
        self._thread = threading.Thread(target=lambda: asyncio.run(self._poll()), daemon=True)

    def __enter__(self) -> BucketSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    async def _poll(self) -> None:
        conn = await asyncpg.connect(self._url)
        try:
            while not self._stop.is_set():
                row = await conn.fetchrow(
                    "SELECT rate_per_s, tokens, extract(epoch FROM refilled_at)::float8 AS refilled_s, grants, cuts, "
                    "extract(epoch FROM updated_at)::float8 AS updated_s "
                    "FROM rekognition.rate_limit_buckets ORDER BY updated_at DESC LIMIT 1")
                if row is not None:
                    self.rows.append((time.monotonic(), row["rate_per_s"], row["tokens"], row["refilled_s"],
                                      row["grants"], row["cuts"], row["updated_s"]))
                await asyncio.sleep(self._interval_s)
        finally:
            await conn.close()

    def figures(self, first_s: float, last_s: float) -> dict[str, Any]:
        """Mean rate over [first_s, last_s], and tokens lost to the capacity between row versions seen.

        The row's balance is a line: ``tokens`` at ``refilled_at``, growing at ``rate_per_s``. A take at
        ``updated_at`` that left less than (balance before) - 1 threw the difference away.
        """
        rows = [r for r in self.rows if first_s <= r[0] <= last_s]
        if len(rows) < 2:
            return {}
        area = sum((b[0] - a[0]) * a[1] for a, b in pairwise(rows))
        lost = 0.0
        missed = 0
        sizes = Counter[str]()
        for a, b in pairwise(rows):
            if b[4] == a[4]:
                continue
            missed += b[4] - a[4] - 1  # versions between two samples: their refills are not seen
            if b[4] - a[4] != 1 or b[5] != a[5]:
                continue  # a take not seen, or a cut in between: no exact balance to compare
            before = a[2] + (b[6] - a[3]) * a[1]
            after = b[2] + (b[6] - b[3]) * b[1]
            spill = max(0.0, before - 1.0 - after)
            lost += spill
            if spill > 1e-3:
                sizes["<=1" if spill <= 1 else "<=2" if spill <= 2 else "<=5" if spill <= 5 else ">5"] += 1
        return {"mean_rate_per_s": round(area / (rows[-1][0] - rows[0][0]), 3),
                "bucket_overflow_tokens": round(lost, 1), "overflows_by_size": dict(sizes), "versions_unseen": missed,
                "cuts": rows[-1][5] - rows[0][5]}


async def _reset(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DELETE FROM rekognition.rate_limit_buckets")
    finally:
        await conn.close()


def run_fleet(args: argparse.Namespace, code_root: Path, emulator: EmulatorThread, database_url: str,
              work: Path) -> dict[str, Any]:
    groups = [[synth.detection_job(f"fleet-{uuid.uuid4().hex[:12]}", faces=args.page_size * args.pages - 7,
                                   attributes="DEFAULT", persons=2) for _ in range(args.jobs)]
              for _ in range(args.processes)]
    emulator.add_jobs([f for g in groups for f in g])
    asyncio.run(_reset(database_url))  # a fresh bucket row, as on a new deployment
    # A quota change starts a full bucket: every variant starts from the same emulator state.
    emulator.configure(quota_tps=None)
    emulator.configure(quota_tps=args.quota, latency_s=args.latency_s, fault_rate=0.0)
    emulator.reset_stats()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PYTHONPATH"))}
    env.update({"DATABASE_URL": database_url, "RATE_LIMIT_SCOPE": "fleet", "REKOGNITION_TPS": str(args.ceiling),
                "MAX_CONCURRENT_JOBS": str(args.jobs), "PAGE_SIZE": str(args.page_size), "LOG_FORMAT": "json",
                "AWS_ENDPOINT_URL_REKOGNITION": emulator.url, "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1", "PYTHONPATH": str(code_root)})
    wall_to_mono_s = time.time() - time.monotonic()
    procs = []
    with BucketSampler(database_url) as sampler:
        for n, group in enumerate(groups):
            job_file = work / f"jobs-{uuid.uuid4().hex[:8]}-{n}.txt"
            job_file.write_text("".join(f"{f.job_id},{f.api}\n" for f in group))
            procs.append(subprocess.Popen([sys.executable, "-m", "worker", "backfill", "--from-file",
                                           str(job_file)], cwd=code_root, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
            if args.stagger_s > 0:
                time.sleep(args.stagger_s)
        with _stalls(procs, args.pause_s, args.pause_every_s), \
                _other_caller(emulator.url, groups[0][0].job_id, args.other_calls, args.other_every_s, procs):
            logs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, logs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"backfill exited {p.returncode}:\n{out[-2000:]}\n{err[-2000:]}")
    calls = emulator.stats()["calls"]
    out = figures(calls, [_parse_log(err, wall_to_mono_s) for _, err in logs], args.quota,
                  other=dict(OTHER_CALLS))
    OTHER_CALLS.clear()
    out["bucket"] = sampler.figures(calls[0][0], calls[-1][0])
    return out


@contextmanager
def _stalls(procs: list[subprocess.Popen[str]], pause_s: float, every_s: float) -> Iterator[None]:
    """Every ``every_s``, stop all the processes for ``pause_s`` at once (a starved machine), then go on."""
    done = threading.Event()

    def stall() -> None:
        while not done.wait(every_s - pause_s):
            running = [p for p in procs if p.poll() is None]
            for p in running:
                p.send_signal(signal.SIGSTOP)
            done.wait(pause_s)
            for p in running:
                p.send_signal(signal.SIGCONT)

    thread = threading.Thread(target=stall, daemon=True)
    if pause_s > 0:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if pause_s > 0:
            thread.join()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)


# The other caller's outcomes (Counter updates are atomic enough under the GIL for a tally).
OTHER_CALLS: Counter[str] = Counter()


@contextmanager
def _other_caller(url: str, job_id: str, calls: int, every_s: float,
                  procs: list[subprocess.Popen[str]]) -> Iterator[None]:
    """Another application in the same account: every ``every_s``, ``calls`` Get* calls at once."""
    done = threading.Event()
    client = botocore.session.get_session().create_client(
        "rekognition", region_name="us-east-1", endpoint_url=url, aws_access_key_id="other",
        aws_secret_access_key="other", config=botocore.config.Config(retries={"total_max_attempts": 1}))

    def call() -> None:
        try:
            client.get_face_detection(JobId=job_id, MaxResults=1)
        except botocore.exceptions.ClientError:
            OTHER_CALLS["throttled"] += 1
        else:
            OTHER_CALLS["admitted"] += 1

    def burst() -> None:
        while not done.wait(every_s) and any(p.poll() is None for p in procs):
            threads = [threading.Thread(target=call) for _ in range(calls)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    thread = threading.Thread(target=burst, daemon=True)
    if calls > 0:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if calls > 0:
            thread.join()


@contextmanager
def _terminated(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _line(name: str, f: dict[str, Any]) -> str:
    return (f"{name:>10}: quota used {f['quota_used']:.1%}, throttled {f['throttled_share']:.1%} of {f['calls']} "
            f"calls over {f['window_s']:.1f} s ({f['admitted_per_s']:.2f}/s); unspent calls {f['unspent_calls']} "
            f"(startup {f['startup_s']:.1f} s, tail {f['tail_s']:.1f} s); fleet bucket {f['bucket']}")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    server = None
    database_url = os.environ.get("DATABASE_URL")
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        work = Path(tmp)
        if not database_url:
            server, database_url = start_embedded_postgres(work / "pg")
        try:
            upgrade_to_head(Settings(database_url=database_url))
            variants = [("this tree", ROOT)]
            if args.compare:
                variants.insert(0, (args.compare, _extract(args.compare, work / "before")))
            results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
            with EmulatorThread(EmulatorConfig(quota_tps=args.quota, latency_s=args.latency_s)) as emulator, \
                    _terminated(hogs):
                for _ in range(args.repeat):
                    for name, code_root in variants:
                        f = run_fleet(args, code_root, emulator, database_url, work)
                        results[name].append(f)
                        print(_line(name, f), flush=True)
                        print(f"{'':>10}  admitted each second: {f['admitted_each_second']}", flush=True)
        finally:
            if server is not None:
                server.cleanup_mode = "delete"
                server.cleanup()
    out = {"processes": args.processes, "jobs_per_process": args.jobs, "pages": args.pages,
           "ceiling": args.ceiling, "quota": args.quota, "latency_s": args.latency_s, "load": args.load,
           "pause_s": args.pause_s, "pause_every_s": args.pause_every_s, "other_calls": args.other_calls,
           "other_every_s": args.other_every_s,
           "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
