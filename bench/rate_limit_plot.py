"""Plot Rekognition Get* calls per second while the limiter converges on a quota below its ceiling.

    .venv/bin/python bench/rate_limit_plot.py --out docs/img/rate-limit.png

Runs the real worker (Fetcher, limiter, normalizer, PostgreSQL writes) against the local emulator with
an account quota, latency and injected faults, then draws admitted, faulted and throttled calls per
second (as the emulator recorded them) and the limiter's rate. PostgreSQL is embedded unless
DATABASE_URL is set. Prints the run's figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg"): no display needed

from worker.config import Settings
from worker.db.migrate import upgrade_to_head
from worker.local import synth
from worker.local.emulator import EmulatorConfig, EmulatorThread
from worker.local.pg import start_embedded_postgres
from worker.messages import JobRef
from worker.runtime import open_runtime

PAGE_SIZE = 50


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/img/rate-limit.png"))
    p.add_argument("--ceiling", type=float, default=20.0, help="REKOGNITION_TPS (default 20)")
    p.add_argument("--quota", type=float, default=5.0, help="the emulator's account quota, calls/s (default 5)")
    p.add_argument("--latency-s", type=float, default=0.4)
    p.add_argument("--fault-rate", type=float, default=0.05)
    p.add_argument("--throttle-error", default="ProvisionedThroughputExceededException",
                   choices=("ProvisionedThroughputExceededException", "ThrottlingException"))
    p.add_argument("--jobs", type=int, default=8, help="concurrent jobs")
    p.add_argument("--pages", type=int, default=30, help="result pages per job")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


async def _run(settings: Settings, fixtures: list[synth.JobFixture]) -> tuple[list[tuple[float, float]], list[str]]:
    """Ingest the jobs; returns (monotonic time, limiter rate) samples and the job outcomes."""
    samples: list[tuple[float, float]] = []
    async with open_runtime(settings) as rt:
        limiter = rt.fetcher.limiter

        async def sample() -> None:
            while True:
                samples.append((time.monotonic(), limiter.rate_per_s))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        try:
            outcomes = await rt.ingestor.ingest_many([JobRef.create(f.job_id, f.api) for f in fixtures],
                                                     concurrency=settings.max_concurrent_jobs)
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
    return samples, [o.outcome for o in outcomes]


def _figures(calls: list[tuple[float, str]], quota: float) -> dict[str, Any]:
    span_s = calls[-1][0] - calls[0][0]
    by = Counter(outcome for _, outcome in calls)
    admitted = len(calls) - by["throttled"]
    return {"calls": len(calls), "throttled": by["throttled"], "faults": by["fault"], "span_s": round(span_s, 2),
            "admitted_per_s": round(admitted / span_s, 3), "quota_used": round(admitted / span_s / quota, 3),
            "throttled_share": round(by["throttled"] / len(calls), 3)}


def _plot(out: Path, calls: list[tuple[float, str]], samples: list[tuple[float, float]], args: argparse.Namespace,
          figures: dict[str, Any]) -> None:
    t0 = calls[0][0]
    seconds = int(calls[-1][0] - t0) + 1
    series = {name: [0] * seconds for name in ("succeeded", "fault", "throttled")}
    for arrival_s, outcome in calls:
        series[outcome if outcome in series else "fault"][int(arrival_s - t0)] += 1
    x = list(range(seconds))
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=120)
    ax.bar(x, series["succeeded"], width=1.0, align="edge", color="#4c9a52", label="admitted (200)")
    ax.bar(x, series["fault"], width=1.0, align="edge", bottom=series["succeeded"], color="#e0a030",
           label="admitted, InternalServerError (injected)")
    below = [a + b for a, b in zip(series["succeeded"], series["fault"], strict=True)]
    ax.bar(x, series["throttled"], width=1.0, align="edge", bottom=below, color="#c8433a",
           label=f"throttled ({args.throttle_error})")
    rate_t = [t - t0 for t, _ in samples if t >= t0 - 0.5]
    rate_v = [r for t, r in samples if t >= t0 - 0.5]
    ax.step(rate_t, rate_v, where="post", color="#1f4e9c", linewidth=2.0, label="limiter rate (calls/s)")
    ax.axhline(args.quota, color="black", linestyle="--", linewidth=1.0, label=f"account quota {args.quota:g}/s")
    ax.set_xlim(0, seconds)
    ax.set_ylim(0, max(args.ceiling, max(below)) * 1.08)
    ax.set_xlabel("seconds since the first call")
    ax.set_ylabel("Get* calls per second")
    ax.set_title(f"REKOGNITION_TPS={args.ceiling:g} against a {args.quota:g}/s quota, {args.latency_s:g} s latency, "
                 f"{args.fault_rate:.0%} faults, {args.jobs} jobs\n"
                 f"quota used {figures['quota_used']:.0%}, throttled {figures['throttled_share']:.1%} of "
                 f"{figures['calls']} calls", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = None
    database_url = os.environ.get("DATABASE_URL")
    if not database_url:
        server, database_url = start_embedded_postgres(Path(tempfile.mkdtemp(prefix="rate-limit-bench-")))
    try:
        settings = Settings(database_url=database_url, rekognition_tps=args.ceiling, max_concurrent_jobs=args.jobs,
                            page_size=PAGE_SIZE, log_format="json")
        upgrade_to_head(settings)
        fixtures = [synth.detection_job(f"bench-{uuid.uuid4().hex[:12]}", faces=PAGE_SIZE * args.pages - 7,
                                        attributes="DEFAULT", persons=2) for _ in range(args.jobs)]
        config = EmulatorConfig(quota_tps=args.quota, latency_s=args.latency_s, fault_rate=args.fault_rate,
                                throttle_error=args.throttle_error, seed=args.seed)
        with EmulatorThread(config, jobs=fixtures) as emulator:
            os.environ["AWS_ENDPOINT_URL_REKOGNITION"] = emulator.url
            samples, outcomes = asyncio.run(_run(settings, fixtures))
            calls = emulator.stats()["calls"]
    finally:
        if server is not None:
            server.cleanup_mode = "delete"
            server.cleanup()
    figures = _figures(calls, args.quota)
    figures["jobs_ingested"] = outcomes.count("ingested")
    _plot(args.out, calls, samples, args, figures)
    print(json.dumps({"out": str(args.out), **figures}))
    return 0 if figures["jobs_ingested"] == args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
