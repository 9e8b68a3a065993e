"""The commands as a user runs them: real processes, the emulator over HTTP, a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import unique_job_id
from worker.local import synth

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
            timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    full_env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                     "LOG_FORMAT": "json", "COLUMNS": "200"})
    full_env.pop("DATABASE_URL", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=ROOT, env=full_env, input=stdin,
                          capture_output=True, text=True, timeout=timeout_s, check=False)


@pytest.fixture
def cli_env(db_url: str, emulator: Any) -> dict[str, str]:
    emulator.configure(quota_tps=None, fault_rate=0.0, latency_s=0.0)
    return {"DATABASE_URL": db_url, "AWS_ENDPOINT_URL_REKOGNITION": emulator.url, "REKOGNITION_TPS": "200"}


def test_migrate_is_idempotent(db_url: str) -> None:
    result = run_cli("migrate", env={"DATABASE_URL": db_url.replace("postgresql://", "postgresql+asyncpg://")})
    assert result.returncode == 0, result.stderr
    assert "head" in result.stdout


def test_migrate_without_database_url_is_a_clear_error() -> None:
    result = run_cli("migrate")
    assert result.returncode == 2 and "DATABASE_URL is not set" in result.stderr


async def test_backfill_ingests_and_summarises(cli_env: dict[str, str], emulator: Any, db: asyncpg.Connection) -> None:
    det = synth.detection_job(unique_job_id("cli-det"), faces=1500, attributes="ALL")
    srch = synth.search_job(unique_job_id("cli-search"), persons_elements=300)
    emulator.add_jobs([det, srch])
    result = run_cli("backfill", "--api", "StartFaceDetection", det.job_id, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert det.job_id in result.stdout and "ingested" in result.stdout and "1500" in result.stdout
    # Off a terminal: JSON log lines, one summary line per job.
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(line.get("event") == "job finished" and line.get("job_id") == det.job_id for line in lines)
    result = run_cli("backfill", "--from-file", "-", env=cli_env, stdin=f"# jobs\n{srch.job_id},FACE_SEARCH\n\n")
    assert result.returncode == 0, result.stderr
    assert await db.fetchval("SELECT count(*) FROM faces WHERE "
                             "ingest_id = (SELECT ingest_id FROM jobs WHERE job_id = $1)", srch.job_id) == 300


async def test_backfill_reports_each_bad_job_and_runs_the_rest(cli_env: dict[str, str], emulator: Any,
                                                               tmp_path: Path, db: asyncpg.Connection) -> None:
    good = synth.detection_job(unique_job_id("cli-good"), faces=20)
    emulator.add_job(good)
    missing = unique_job_id("cli-missing")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(f"{good.job_id},GetFaceDetection\nbad/job!,GetFaceDetection\n{missing},getfacedetection\n"
                    f"{good.job_id}x,StartLabelDetection\nno-api-here\n")
    result = run_cli("backfill", "--from-file", str(jobs), env=cli_env)
    assert result.returncode == 1
    err = result.stderr
    assert "invalid JobId 'bad/job!'" in err
    assert "StartLabelDetection" in err
    assert "no-api-here" in err and "neither GetFaceDetection nor GetFaceSearch" in err
    assert missing in err and "ResourceNotFoundException" in err
    assert await db.fetchval("SELECT ingest_state FROM jobs WHERE job_id = $1", good.job_id) == "ingested"
    assert await db.fetchval("SELECT ingest_state FROM jobs WHERE job_id = $1", missing) == "failed"


@pytest.mark.parametrize(("args", "message"), [
    (("backfill", "--api", "GetLabelDetection", "job-1"), "unknown or unsupported API"),
    (("backfill", "job-never-seen-1"), "neither GetFaceDetection nor GetFaceSearch knows this JobId"),
    (("backfill", "--api", "GetFaceSearch", "x" * 65), "invalid JobId"),
    (("backfill",), "backfill needs JOB_ID"),
    (("backfill", "--from-file", "/nonexistent/jobs.txt"), "cannot read /nonexistent/jobs.txt"),
    (("report", "not a job"), "invalid JobId"),
])
def test_invalid_input_gets_a_one_line_error(args: tuple[str, ...], message: str, cli_env: dict[str, str]) -> None:
    result = run_cli(*args, env=cli_env)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_report_of_unknown_job(cli_env: dict[str, str]) -> None:
    result = run_cli("report", "never-ingested-job", env=cli_env)
    assert result.returncode == 3 and "never-ingested-job has not been ingested" in result.stderr


def test_run_without_queue_url(cli_env: dict[str, str]) -> None:
    result = run_cli("run", "--exit-when-idle", env=cli_env)
    assert result.returncode == 2 and "QUEUE_URL is not set" in result.stderr


def test_bad_setting_is_reported_without_secrets() -> None:
    result = run_cli("migrate", env={"DATABASE_URL": "mysql://user:hunter2@db/x"})
    assert result.returncode == 2 and "DATABASE_URL must start with" in result.stderr
    assert "hunter2" not in result.stderr
    result = run_cli("backfill", "--api", "GetFaceSearch", "j", env={"REKOGNITION_TPS": "-1"})
    assert result.returncode == 2 and "REKOGNITION_TPS" in result.stderr


def test_unreachable_database_fails_the_job_run_not_silently(emulator: Any) -> None:
    result = run_cli("backfill", "--api", "GetFaceSearch", "job-unreachable",
                     env={"DATABASE_URL": "postgresql://u:pw@127.0.0.1:1/db",
                          "AWS_ENDPOINT_URL_REKOGNITION": emulator.url},
                     timeout_s=120)
    assert result.returncode != 0
    assert "pw@" not in result.stderr and "pw@" not in result.stdout


async def test_backfill_finds_the_api_of_plain_job_ids(cli_env: dict[str, str], emulator: Any, tmp_path: Path,
                                                       db: asyncpg.Connection) -> None:
    det = synth.detection_job(unique_job_id("plain-det"), faces=30)
    srch = synth.search_job(unique_job_id("plain-search"), persons_elements=30)
    emulator.add_jobs([det, srch])
    jobs = tmp_path / "plain.txt"
    jobs.write_text(f"{det.job_id}\n{srch.job_id}\n")
    result = run_cli("backfill", "--from-file", str(jobs), env=cli_env)
    assert result.returncode == 0, result.stderr
    apis = dict(await db.fetch("SELECT job_id, api::text FROM jobs WHERE job_id = ANY($1)", [det.job_id, srch.job_id]))
    assert apis == {det.job_id: "FACE_DETECTION", srch.job_id: "FACE_SEARCH"}
