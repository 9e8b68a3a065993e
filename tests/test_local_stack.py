"""`python -m worker local`: the whole local stack kept running, the environment printed, every kind of command
working against it, and Ctrl-C stopping it cleanly. One real process with its own embedded PostgreSQL."""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
EXPECTED = {"DATABASE_URL", "QUEUE_URL", "AWS_ENDPOINT_URL_REKOGNITION", "AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL_S3",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "REKOGNITION_SNS_TOPIC_ARN",
            "REKOGNITION_ROLE_ARN", "ERASURE_HASH_KEY"}


def _lines(stream: object, into: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)
    into.put(None)


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k not in ("DATABASE_URL", "QUEUE_URL", "ERASURE_HASH_KEY")}
    env.update({"PYTHONPATH": str(ROOT), "LOG_FORMAT": "json", "AWS_CONFIG_FILE": "/nonexistent",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"})
    return env


def _worker(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=120, check=False)


def _port_open(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=1):
            return True
    except OSError:
        return False


def test_local_stack_prints_its_environment_serves_the_commands_and_stops_on_sigint(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "worker", "local"], cwd=tmp_path, env=_base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    out: queue.Queue[str | None] = queue.Queue()
    err: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
    threading.Thread(target=_lines, args=(proc.stderr, err), daemon=True).start()
    try:
        exported: dict[str, str] = {}
        deadline = time.monotonic() + 120
        while set(exported) != EXPECTED:
            line = out.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "local exited before printing its environment"
            assert line.startswith("export "), line  # stdout carries the environment only
            name, _, value = line.removeprefix("export ").strip().partition("=")
            exported[name] = shlex.split(value)[0]
        assert exported["DATABASE_URL"].startswith("postgresql://") and str(tmp_path) in exported["DATABASE_URL"]
        assert len(exported["ERASURE_HASH_KEY"]) >= 32
        env = {**_base_env(), **exported}

        # Jobs to ingest, a video library to submit and start, a queue with a DLQ, an erasure key.
        backfill = _worker(env, "backfill", "--api", "GetFaceDetection", "demo-det-lobby-0001")
        assert backfill.returncode == 0, backfill.stderr
        report = _worker(env, "report", "demo-det-lobby-0001", "--format", "json")
        assert report.returncode == 0 and json.loads(report.stdout)["job"]["faces"] == 2500
        submit = _worker(env, "submit", "--api", "FACE_DETECTION", "s3://demo-video-library/lobby/")
        assert submit.returncode == 0, submit.stderr
        run = _worker(env, "run", "--exit-when-idle")
        assert run.returncode == 0, run.stderr[-3000:]
        states = [line.split("\t") for line in _worker(env, "submissions").stdout.splitlines()[1:]]
        assert len(states) == 2 and {s[1] for s in states} == {"ingested"}
        assert _worker(env, "dlq", "list").returncode == 0
        assert _worker(env, "erase", "--external-image-id", "-", stdin="nobody-here\n").returncode == 3

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    messages = []
    while (line := err.get(timeout=5)) is not None:
        messages.append(line)
    assert "# local stack stopped (SIGINT)\n" in messages and not any("Traceback" in m for m in messages)
    # Everything it started is gone: the emulator, moto, and the PostgreSQL it started.
    assert not _port_open(exported["AWS_ENDPOINT_URL_REKOGNITION"])
    assert not _port_open(exported["AWS_ENDPOINT_URL_SQS"])
    assert not (tmp_path / ".local" / "pgdata" / "postmaster.pid").exists()
