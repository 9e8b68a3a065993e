"""With LOG_FORMAT=json every line on stderr is one JSON object: structlog's events, libraries' stdlib
logging, warnings and uncaught exceptions alike, all redacted. Console format stays human-readable."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.reliability import ROOT, create_database, drop_database, worker_env
from worker import cli, logs

PASSWORD = "pw-never-printed-7f3a9c"
CLOSED = "http://127.0.0.1:1"

# Loaded by the interpreter before `python -m worker` runs. At exit, after the command has configured
# logging, it does what the command itself rarely does on cue: warns, and lets a thread die.
SITECUSTOMIZE = f'''
import atexit, threading, warnings

def _late_events():
    warnings.warn("option X is deprecated (password={PASSWORD})", UserWarning, stacklevel=1)
    thread = threading.Thread(target=lambda: 1 / 0, name="dying-thread")
    thread.start()
    thread.join()

atexit.register(_late_events)
'''


def run_worker(args: list[str], env: dict[str, str], *, python_flags: tuple[str, ...] = (),
               timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *python_flags, "-m", "worker", *args], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s, check=False)


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every line of ``stderr`` as a JSON object; fails on the first line that is not one."""
    events = []
    for number, line in enumerate(stderr.splitlines(), 1):
        try:
            event = json.loads(line)
        except ValueError:
            pytest.fail(f"stderr line {number} is not JSON: {line!r}\n--- stderr ---\n{stderr[-4000:]}")
        assert isinstance(event, dict), line
        events.append(event)
    return events


@pytest.fixture
def late_events(tmp_path: Path) -> str:
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return f"{ROOT}:{tmp_path}"


def test_failed_start_up_writes_only_json_lines(late_events: str) -> None:
    # -X dev: asyncio's debug mode logs slow steps through stdlib logging, as a library does.
    env = worker_env(QUEUE_URL=f"{CLOSED}/000000000000/jobs", AWS_ENDPOINT_URL_SQS=CLOSED, AWS_MAX_ATTEMPTS="1",
                     DATABASE_URL=f"postgresql://worker:{PASSWORD}@127.0.0.1:1/rekognition",
                     DECODE_PROCESSES="0", PYTHONPATH=late_events)
    result = run_worker(["run"], env, python_flags=("-X", "dev"))
    assert result.returncode == 4  # a dependency unavailable (docs/cli.md, "Exit codes")
    events = json_lines(result.stderr)
    # An expected failure: one event naming the database, no traceback.
    [failed] = [e for e in events if e["event"] == "command failed"]
    assert failed["level"] == "error" and failed["kind"] == "database" and failed["exit_code"] == 4
    assert "127.0.0.1:1/rekognition is unreachable" in failed["error"]
    assert not [e for e in events if e["event"] == "uncaught exception"] and "exception" not in failed
    warned = [e for e in events if e.get("logger") == "py.warnings"]
    assert len(warned) == 1 and "UserWarning: option X is deprecated" in warned[0]["event"]
    thread = [e for e in events if e["event"] == "uncaught exception in thread"]
    assert thread and thread[0]["thread"] == "dying-thread" and "ZeroDivisionError" in thread[0]["exception"]
    assert all({"level", "timestamp"} <= e.keys() for e in events)
    assert PASSWORD not in result.stderr and "password=***" in warned[0]["event"]


def test_backfill_against_unreachable_database_writes_only_json_lines(emulator: Any, late_events: str) -> None:
    env = worker_env(DATABASE_URL=f"postgresql://worker:{PASSWORD}@127.0.0.1:1/rekognition",
                     AWS_ENDPOINT_URL_REKOGNITION=emulator.url, PYTHONPATH=late_events)
    result = run_worker(["backfill", "--api", "GetFaceSearch", "job-unreachable-db"], env)
    assert result.returncode == 4
    events = json_lines(result.stderr)
    assert any(e["event"] == "command failed" and "127.0.0.1:1/rekognition" in e["error"] for e in events)
    assert any(e.get("logger") == "py.warnings" for e in events)
    assert PASSWORD not in result.stderr + result.stdout


def test_bad_input_is_a_json_event(emulator: Any) -> None:
    result = run_worker(["backfill", "--api", "GetLabelDetection", "job-1"], worker_env())
    assert result.returncode == 2
    [event] = json_lines(result.stderr)
    assert event["event"] == "command failed" and "unknown or unsupported API" in event["error"]


@pytest.fixture
async def empty_database(pg_server_url: str) -> AsyncIterator[str]:
    url = await create_database(pg_server_url)
    yield url
    await drop_database(pg_server_url, url)


def test_migrate_logs_alembic_progress_as_json(empty_database: str, late_events: str) -> None:
    result = run_worker(["migrate"], worker_env(DATABASE_URL=empty_database, PYTHONPATH=late_events))
    assert result.returncode == 0, result.stderr
    assert "database at head" in result.stdout
    events = json_lines(result.stderr)
    ran = [e for e in events if e.get("logger") == "alembic.runtime.migration" and "Running upgrade" in e["event"]]
    assert ran and all(e["level"] == "info" for e in ran)


def test_console_format_stays_human(empty_database: str, late_events: str) -> None:
    env = worker_env(DATABASE_URL=empty_database, PYTHONPATH=late_events, LOG_FORMAT="console")
    result = run_worker(["migrate"], env)
    assert result.returncode == 0, result.stderr
    assert "Running upgrade" in result.stderr and "UserWarning: option X is deprecated" in result.stderr
    assert "ZeroDivisionError" in result.stderr and not any(line.startswith("{") for line in result.stderr.splitlines())
    assert PASSWORD not in result.stderr


def test_task_exception_never_retrieved_goes_through_the_loop_handler() -> None:
    async def main() -> None:
        async def fail() -> None:
            raise RuntimeError(f"lost in a task, password={PASSWORD}")

        task = asyncio.get_running_loop().create_task(fail())
        await asyncio.sleep(0)
        del task
        gc.collect()  # the task is gone without anyone retrieving its exception

    with capture_logs(processors=logs.processors()) as events:
        cli._arun(main())
    [event] = [e for e in events if e["event"] == "Task exception was never retrieved"]
    assert event["log_level"] == "error" and "RuntimeError: lost in a task" in event["exception"]
    assert PASSWORD not in repr(event)
