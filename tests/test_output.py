"""Output for people and for pipes: tables that fit a terminal, one record per line into a pipe, and a pipe
closed by its reader ending quietly. Real processes against PostgreSQL, the emulator and moto's SQS."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from test_service_support import Queues

from tests.test_cli_errors import run_cli
from worker.commands.jobs import JOB_COLUMNS
from worker.commands.output import table, tsv_field
from worker.local import synth
from worker.local.sqs import notification, sns_envelope

ROOT = Path(__file__).resolve().parents[1]
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def job_id_64(tag: str) -> str:
    """A JobId as long as Rekognition's own (64 characters)."""
    return (tag + "-" + os.urandom(32).hex())[:64]


@pytest.fixture
def env(db_url: str, emulator: Any) -> dict[str, str]:
    emulator.configure(quota_tps=None, fault_rate=0.0, latency_s=0.0)
    return {"DATABASE_URL": db_url, "AWS_ENDPOINT_URL_REKOGNITION": emulator.url, "REKOGNITION_TPS": "200"}


@pytest.fixture
def jobs(env: dict[str, str], emulator: Any) -> dict[str, str]:
    """Three ingested or failed jobs with 64-character JobIds; JobId -> ingest state."""
    good = synth.detection_job(job_id_64("out-good"), faces=20)
    search = synth.search_job(job_id_64("out-search"), persons_elements=10)
    # A reason over several lines, with a tab: one line in TSV all the same.
    bad = synth.failed_job(job_id_64("out-bad"), "GetFaceDetection", "first line\nsecond\tline [/x]")
    emulator.add_jobs([good, search, bad])
    result = run_cli("backfill", "--from-file", "-", env=env,
                     stdin=f"{good.job_id},GetFaceDetection\n{search.job_id},GetFaceSearch\n"
                           f"{bad.job_id},GetFaceDetection\n")
    assert result.returncode == 1, result.stderr  # the failed job
    return {good.job_id: "ingested", search.job_id: "ingested", bad.job_id: "failed"}


def test_piped_jobs_list_is_one_line_per_job_with_its_full_job_id_and_state(env: dict[str, str],
                                                                            jobs: dict[str, str]) -> None:
    result = run_cli("jobs", "list", env=env)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split("\t")[:3] == ["job_id", "api", "ingest_state"]
    assert len(lines) == len(jobs)
    seen = {}
    for line in lines:
        fields = line.split("\t")
        assert len(fields) == len(header.split("\t"))
        assert len(fields[0]) == 64
        seen[fields[0]] = fields[2]
    assert seen == jobs
    assert "─" not in result.stdout and "│" not in result.stdout
    failed = next(line for line in lines if "failed" in line.split("\t")[2])
    assert "JobFailed: first line\\nsecond\\tline [/x]" in failed

    as_json = run_cli("jobs", "list", "--format", "json", env=env)
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert {r["job_id"]: r["ingest_state"] for r in records} == jobs
    assert {r["failure_reason"] for r in records} == {None, "first line\nsecond\tline [/x]"}

    summary = run_cli("backfill", "--format", "json", "--api", "GetFaceDetection", *[j for j, s in jobs.items()
                                                                                     if s == "failed"], env=env)
    [row] = [json.loads(line) for line in summary.stdout.splitlines()]
    assert row["outcome"] == "failed" and len(row["job_id"]) == 64


def test_a_table_on_a_terminal_fits_its_width_and_keeps_the_job_id(env: dict[str, str],
                                                                   jobs: dict[str, str]) -> None:
    out = _on_a_terminal(["jobs", "list"], env, columns=120)
    lines = [_ANSI.sub("", line).rstrip("\r") for line in out.splitlines()]
    assert lines and max(len(line) for line in lines) <= 120, "\n".join(lines)
    for job_id, state in jobs.items():
        row = next(line for line in lines if job_id in line)  # the whole JobId on one line
        assert state in row
    text = " ".join(lines)
    assert "first line" in text and "[/x]" in text  # the failure reason, wrapped
    assert "not shown at 120 columns" in text  # what had to be left out is named


def _on_a_terminal(args: list[str], env: dict[str, str], *, columns: int) -> str:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    full = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in ("COLUMNS", "LINES")}
    full.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                 "TERM": "xterm", "LOG_FORMAT": "json", **env})
    proc = subprocess.Popen([sys.executable, "-m", "worker", *args], cwd=ROOT, env=full, stdout=slave,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    return b"".join(chunks).decode()


def test_narrow_tables_keep_the_identifying_columns() -> None:
    now = datetime.now(UTC)
    rows = [{"job_id": "j" * 64, "api": "FACE_DETECTION", "ingest_state": "failed", "failure": "ResourceNotFound: " * 5,
             "job_status": "FAILED", "attempts": 3, "updated_at": now, "notified_at": now, "ingested_at": None}]
    for width in (80, 100, 120, 200):
        console = Console(width=width, force_terminal=True, color_system=None, record=True)
        console.print(table(rows, JOB_COLUMNS, width=width))
        text = console.export_text()
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= width
        assert any("j" * 64 in line for line in lines) and any("failed" in line for line in lines)
        assert "ResourceNotFound" in text
    assert tsv_field("a\tb\nc\\d\r") == "a\\tb\\nc\\\\d\\r" and tsv_field(None) == "" and tsv_field(True) == "true"


def _closed_before_it_writes(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reader is gone before the command writes (what `| head` leaves)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in ("DATABASE_URL",)}
    full.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                 "LOG_FORMAT": "json", **env})
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([sys.executable, "-m", "worker", *args], cwd=ROOT, env=full, stdout=write_end,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, timeout=90, check=False)
    os.close(write_end)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", proc.stderr)


async def test_output_into_a_closed_pipe_ends_quietly(env: dict[str, str], jobs: dict[str, str], sqs: Any,
                                                      queues: Queues, moto_url: str) -> None:
    job_id = next(j for j, s in jobs.items() if s == "ingested")
    for body in ("not a notification", sns_envelope(notification(synth.detection_job("dlq-x", faces=1)))):
        await sqs.send_message(QueueUrl=queues.dlq_url, MessageBody=body)
    dlq_env = {**env, "QUEUE_URL": queues.url, "AWS_ENDPOINT_URL_SQS": moto_url}
    for args, extra in ((["jobs", "list"], {}), (["jobs", "list", "--format", "table"], {}),
                        (["report", job_id, "--format", "json"], {}), (["report", job_id], {}),
                        (["submissions"], {}), (["dlq", "list"], dlq_env), (["--help"], {})):
        result = _closed_before_it_writes(args, {**env, **extra})
        assert result.returncode == 141, (args, result.stderr)
        assert result.stderr == "", (args, result.stderr)  # no traceback, no error line

    # As a shell runs it: the reader takes a little and goes.
    for command in (f"report {job_id} --format json | head -c 10", f"report {job_id} --format json | true",
                    "jobs list | head -n 1"):
        shell = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m worker {command}"], cwd=ROOT,
                               env={**os.environ, "LOG_FORMAT": "json", **env}, capture_output=True, text=True,
                               timeout=90, check=False)
        assert shell.returncode in (0, 141), (command, shell.stderr)
        assert shell.stderr == "", (command, shell.stderr)
