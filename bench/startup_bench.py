"""`backfill` start-up: imports, runtime (client, engine, decoding process), first page, with and without the
warm start of the decoding process.

Each round runs `python -m worker backfill` on one job of one full-attribute page (served pre-rendered by
the emulator in its own process) in a fresh process, twice: as shipped (the decoding process starts with
the runtime) and with DECODE_WARM_START=0 (it starts on the first page, as before), the two taking turns
to go first. The command's wall time and CPU (its own and its children's) are read around it, and
`python -c "import worker.backfill"` gives the import share. Usage:

    .venv/bin/python bench/startup_bench.py [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s of the command and everything it started)."""
    cpu, started = _children_cpu_s(), time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    return time.perf_counter() - started, _children_cpu_s() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    from ingest_bench import Workload, _database, _machine, _serve  # type: ignore[import-not-found]

    from worker.local.pg import start_embedded_postgres

    server, base_url = start_embedded_postgres(Path(tempfile.mkdtemp(prefix="startup-pg-")) / "pgdata")
    w = Workload("startup", "GetFaceDetection", jobs=1, pages=1)
    ctx = mp.get_context("spawn")
    ready_parent, ready_child = ctx.Pipe()
    stop_parent, stop_child = ctx.Pipe()
    emu = ctx.Process(target=_serve, args=([asdict(w)], ready_child, stop_child), daemon=True)
    emu.start()
    figures: dict[str, list[tuple[float, float]]] = {"warm": [], "lazy": [], "imports": []}
    try:
        endpoint = ready_parent.recv()
        env = {**os.environ, "AWS_ENDPOINT_URL_REKOGNITION": endpoint, "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "REKOGNITION_TPS": "1000",
               "LOG_FORMAT": "json", "DECODE_PROCESSES": "1"}
        python = sys.executable
        for n in range(args.rounds):
            figures["imports"].append(_run([python, "-c", "import worker.backfill"], env))
            for mode in ("warm", "lazy")[::(-1 if n % 2 else 1)]:
                url = _database(base_url, f"startup_{mode}_{n}")
                run_env = {**env, "DATABASE_URL": url, "DECODE_WARM_START": "1" if mode == "warm" else "0"}
                figures[mode].append(_run([python, "-m", "worker", "backfill", "--api", w.api, *w.job_ids], run_env))
    finally:
        stop_parent.send("stop")
        emu.join(timeout=10)
        server.cleanup_mode = "delete"
        server.cleanup()
    out: dict[str, Any] = {"machine": _machine(), "rounds": args.rounds}
    print(f"machine: {out['machine']}; medians of {args.rounds} alternating rounds; one job of one 1000-face page")
    for name, label in (("imports", "import worker.backfill"), ("warm", "backfill, decoding process started "
                                                                         "with the runtime"),
                        ("lazy", "backfill, decoding process started on the first page")):
        wall, cpu = median(f[0] for f in figures[name]), median(f[1] for f in figures[name])
        out[name] = {"wall_s": wall, "cpu_s": cpu, "runs": figures[name]}
        print(f"  {label:<58} wall {wall:6.2f} s   CPU {cpu:6.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
