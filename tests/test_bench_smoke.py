"""The benchmark runs end to end on a tiny workload, so it cannot rot. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_run(tmp_path: Path, pg_server_url: str) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["DATABASE_URL"] = pg_server_url
    result = subprocess.run([sys.executable, "bench/ingest_bench.py", "--smoke", "--json", str(out)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worker faces/s" in result.stdout and "ratio" in result.stdout
    figures = json.loads(out.read_text())
    assert {r["workload"] for r in figures["results"]} == {"smoke-det", "smoke-search"}
    for r in figures["results"]:
        # Both pipelines stored the same number of faces from the same pages.
        assert r["faces"] == 400 if r["workload"] == "smoke-det" else r["faces"] == 200
        assert r["worker_faces_per_s"] > 0 and r["reference_faces_per_s"] > 0 and r["worker_peak_rss_mb"] > 0
        # One run per workload in smoke mode, kept per pipeline beside the medians.
        assert r["repeats"] == 1 and len(r["runs"]) == 1 and r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
        assert r["runs"][0]["worker"]["faces"] == r["runs"][0]["reference"]["faces"] == r["faces"]
