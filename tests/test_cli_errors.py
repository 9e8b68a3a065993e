"""The error boundary as a user meets it: real processes, a real PostgreSQL (or a closed port), moto, the emulator.

Every expected failure is one line on stderr (one JSON object under LOG_FORMAT=json) and a code from the table
in docs/cli.md; a traceback only for a bug, after its line; markup in input comes back intact.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unique_job_id, with_database
from worker import __version__
from worker.local import synth

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "pw-never-shown-3c1e9a"
KEY = "k" * 40

# Every command that reads the database, as a user would call it (stdin for erase's identifier).
DATABASE_COMMANDS: list[tuple[str, ...]] = [
    ("migrate",), ("report", "job-1"), ("submissions",), ("delete", "job-1"), ("reprocess", "job-1"),
    ("erase", "--external-image-id", "-"), ("backfill", "--api", "GetFaceSearch", "job-1"),
    ("submit", "--api", "FACE_DETECTION", "s3://some-bucket/videos/"), ("jobs", "list"), ("jobs", "retry"),
    ("dlq", "list"), ("dlq", "redrive", "--all"), ("run",), ("run", "--exit-when-idle"),
]


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = "",
            timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in ("DATABASE_URL", "QUEUE_URL")}
    full.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
                 "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "LOG_FORMAT": "json", "DECODE_PROCESSES": "0"})
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=ROOT, env=full, input=stdin,
                          capture_output=True, text=True, timeout=timeout_s, check=False)


def json_events(stderr: str) -> list[dict[str, Any]]:
    events = []
    for line in stderr.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pytest.fail(f"stderr line is not JSON: {line!r}\n{stderr[-3000:]}")
    return events


def the_error(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one `command failed` event (and no traceback anywhere)."""
    events = json_events(result.stderr)
    failed = [e for e in events if e["event"] == "command failed"]
    assert len(failed) == 1, result.stderr
    assert "Traceback" not in result.stderr and "exception" not in failed[0]
    return failed[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fault_env(url: str) -> dict[str, str]:
    # AWS points at a closed port too: the database must be what is reported, and checked first.
    closed = f"http://127.0.0.1:{closed_port()}"
    return {"DATABASE_URL": url, "QUEUE_URL": f"{closed}/000000000000/jobs", "AWS_ENDPOINT_URL": closed,
            "AWS_MAX_ATTEMPTS": "1", "ERASURE_HASH_KEY": KEY, "HEALTH_PORT": "0"}


@pytest.mark.parametrize("args", DATABASE_COMMANDS, ids=lambda a: "-".join(a)[:30])
def test_closed_database_port_is_one_plain_line_naming_the_database(args: tuple[str, ...]) -> None:
    port = closed_port()
    result = run_cli(*args, env={**fault_env(f"postgresql://worker:{PASSWORD}@127.0.0.1:{port}/rekognition"),
                                 "LOG_FORMAT": "console"}, stdin="someone\n")
    assert result.returncode == 4, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # exactly one line
    assert result.stderr.startswith(f"error: database 127.0.0.1:{port}/rekognition is unreachable"), result.stderr
    assert "check that PostgreSQL runs there" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", DATABASE_COMMANDS, ids=lambda a: "-".join(a)[:30])
def test_missing_database_and_wrong_role_are_one_json_event(args: tuple[str, ...], pg_server_url: str) -> None:
    missing = run_cli(*args, env=fault_env(with_database(pg_server_url, "no_such_database_here")), stdin="x\n")
    assert missing.returncode == 4, missing.stderr
    event = the_error(missing)
    assert event["kind"] == "database" and event["exit_code"] == 4
    assert "/no_such_database_here does not exist" in event["error"]

    wrong_role = pg_server_url.replace("postgresql://postgres:@", f"postgresql://nobody_here:{PASSWORD}@", 1)
    assert wrong_role != pg_server_url
    refused = run_cli(*args, env=fault_env(wrong_role), stdin="x\n")
    assert refused.returncode == 4, refused.stderr
    event = the_error(refused)
    assert "refused the role 'nobody_here'" in event["error"] and PASSWORD not in refused.stderr


def test_unknown_host_names_the_host() -> None:
    result = run_cli("jobs", "list", env={"DATABASE_URL": "postgresql://u@no-such-host.invalid:5433/db"})
    assert result.returncode == 4
    assert "no-such-host.invalid:5433/db is unreachable: unknown host" in the_error(result)["error"]


def test_a_database_without_the_schema_says_run_migrate(pg_server_url: str) -> None:
    # The server's own maintenance database has no worker tables.
    result = run_cli("jobs", "list", env={"DATABASE_URL": pg_server_url})
    assert result.returncode == 2
    assert "has no worker schema" in (error := the_error(result)["error"]) and "migrate` first" in error


@pytest.fixture
def env(db_url: str, emulator: Any) -> dict[str, str]:
    emulator.configure(quota_tps=None, fault_rate=0.0, latency_s=0.0)
    return {"DATABASE_URL": db_url, "AWS_ENDPOINT_URL_REKOGNITION": emulator.url, "REKOGNITION_TPS": "200",
            "ERASURE_HASH_KEY": KEY}


def test_a_job_that_does_not_exist_is_exit_3_from_every_command(env: dict[str, str]) -> None:
    missing = unique_job_id("nowhere")
    for args in (("report", missing), ("delete", missing), ("jobs", "retry", "--job", missing),
                 ("reprocess", missing)):
        result = run_cli(*args, env=env)
        assert result.returncode == 3, (args, result.stderr)
        assert missing in result.stderr and "Traceback" not in result.stderr


def test_markup_in_input_and_in_aws_text_comes_back_intact(env: dict[str, str], emulator: Any) -> None:
    console = {**env, "LOG_FORMAT": "console"}
    result = run_cli("backfill", "--api", "GetFaceSearch", "[/x]", env=console)
    assert result.returncode == 2, result.stderr  # nothing but invalid JobIds
    assert "error: job '[/x]': invalid JobId '[/x]': must match ^[a-zA-Z0-9-_]{1,64}$" in result.stderr
    assert "MarkupError" not in result.stderr and "Traceback" not in result.stderr
    assert "[/x]" in result.stdout  # the summary's row, TSV into the pipe
    report = run_cli("report", "[bold]x[/bold]", env=console)
    assert report.returncode == 2
    assert report.stderr == "error: invalid JobId '[bold]x[/bold]': must match ^[a-zA-Z0-9-_]{1,64}$\n"
    redrive = run_cli("dlq", "redrive", "--job", "[red]", env={**env, "QUEUE_URL": "http://127.0.0.1:1/0/q"})
    assert redrive.returncode == 2 and "invalid JobId '[red]'" in the_error(redrive)["error"]

    # A failure reason from Rekognition with brackets, in a table on a terminal width and in TSV.
    job = synth.failed_job(unique_job_id("markup"), "GetFaceDetection", "codec [/x] [bold]h264[/bold] ^[a-z]+$")
    emulator.add_job(job)
    assert run_cli("backfill", "--api", "GetFaceDetection", job.job_id, env=env).returncode == 1
    table = run_cli("jobs", "list", "--format", "table", env=env)
    assert table.returncode == 0, table.stderr
    # The failure column may wrap between words; every word is there as sent.
    assert all(word in table.stdout for word in ("JobFailed: codec", "[/x]", "[bold]h264[/bold]", "^[a-z]+$"))
    tsv = run_cli("jobs", "list", env=env)
    assert "JobFailed: codec [/x] [bold]h264[/bold] ^[a-z]+$" in tsv.stdout


@pytest.mark.parametrize(("args", "extra_env", "code", "text"), [
    (("jobs", "list"), {"LOG_LEVEL": "loud"}, 2, "LOG_LEVEL must be one of debug, info, warning, error, critical"),
    (("report", "job-1", "--chart", "x.txt"), {}, 2, "--chart x.txt: the chart is written as PNG, SVG or PDF"),
    (("jobs", "list"), {"ERASURE_HASH_KEY": "k"}, 2, "ERASURE_HASH_KEY must have at least 32 bytes (it has 1)"),
    (("jobs", "lst"), {}, 2, "invalid choice: 'lst'"),
    (("dlq", "list"), {}, 2, "QUEUE_URL is not set"),
    (("run", "--exit-when-idle"), {}, 2, "QUEUE_URL is not set"),
    (("backfill",), {}, 2, "backfill needs JOB_ID"),
    (("erase", "--user-id"), {}, 2, "erase: no identifier in stdin"),
])
def test_usage_and_configuration_errors_are_one_json_event(args: tuple[str, ...], extra_env: dict[str, str],
                                                           code: int, text: str, db_url: str) -> None:
    result = run_cli(*args, env={"DATABASE_URL": db_url, **extra_env})
    assert result.returncode == code, result.stderr
    [event] = json_events(result.stderr)  # exactly one line, and it is JSON
    assert event["event"] == "command failed" and text in event["error"] and event["exit_code"] == code


def test_version_and_usage_name_the_program_that_was_run() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout == f"python -m worker {__version__}\n"
    usage = run_cli("--help")
    assert usage.returncode == 0 and usage.stdout.startswith("usage: python -m worker ")
    # The console script's name, as the installed script runs main (tests/test_package.py runs the real one).
    script = subprocess.run([sys.executable, "-c", "import sys; from worker.cli import main; "
                             "sys.argv[0] = '/usr/local/bin/rekognition-worker'; sys.exit(main(['--version']))"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert script.returncode == 0 and script.stdout == f"rekognition-worker {__version__}\n"


def test_a_bug_prints_its_line_first_then_the_traceback(tmp_path: Path, db_url: str) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import worker.commands.migrate as m\n"
        "def broken(ctx):\n    return {}['no such key']\n"
        "m.run = broken\n")
    env = {"DATABASE_URL": db_url, "PYTHONPATH": f"{ROOT}:{tmp_path}"}
    plain = run_cli("migrate", env={**env, "LOG_FORMAT": "console"})
    assert plain.returncode == 70
    first, *rest = plain.stderr.splitlines()
    assert first == "error: internal error (a bug, please report it with what follows): KeyError: 'no such key'"
    assert rest[0] == "Traceback (most recent call last):" and "KeyError" in rest[-1]
    as_json = run_cli("migrate", env=env)
    assert as_json.returncode == 70
    [event] = json_events(as_json.stderr)
    assert event["kind"] == "bug" and event["level"] == "critical" and "KeyError" in event["exception"]


async def test_redrive_of_a_job_with_no_dead_letter_is_exit_3(db_url: str, queues: Any, moto_url: str,
                                                              sqs: Any) -> None:
    await sqs.send_message(QueueUrl=queues.dlq_url, MessageBody="not a notification")
    env = {"DATABASE_URL": db_url, "QUEUE_URL": queues.url, "AWS_ENDPOINT_URL_SQS": moto_url}
    missing = unique_job_id("no-letter")
    result = run_cli("dlq", "redrive", "--job", missing, env=env)
    assert result.returncode == 3, result.stderr
    assert the_error(result)["error"] == f"no message of job {missing} in the dead-letter queue"
    # The message that was there is still there.
    attrs = await sqs.get_queue_attributes(QueueUrl=queues.dlq_url, AttributeNames=["ApproximateNumberOfMessages"])
    assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "1"


def test_aws_unreachable_is_exit_4_naming_the_endpoint() -> None:
    closed = f"http://127.0.0.1:{closed_port()}"
    result = run_cli("dlq", "list", env={"QUEUE_URL": f"{closed}/000000000000/jobs", "AWS_ENDPOINT_URL_SQS": closed,
                                         "AWS_MAX_ATTEMPTS": "1"})
    assert result.returncode == 4, result.stderr
    event = the_error(result)
    assert event["kind"] == "aws_unreachable" and closed in event["error"]


def test_failures_are_classified_from_the_whole_chain() -> None:
    from botocore.exceptions import ClientError, NoCredentialsError

    from worker.commands.failure import classify, database_place

    denied = ClientError({"Error": {"Code": "AccessDeniedException", "Message": "not [b]allowed[/b]"},
                          "ResponseMetadata": {"RequestId": "req-1", "HTTPStatusCode": 400}}, "GetFaceSearch")
    found = classify(denied)
    assert found is not None and (found.code, found.kind) == (4, "aws_refused")
    assert "not [b]allowed[/b] (request id req-1)" in found.line
    no_queue = ClientError({"Error": {"Code": "AWS.SimpleQueueService.NonExistentQueue", "Message": "gone"}},
                           "GetQueueAttributes")
    assert (found := classify(no_queue)) is not None and found.code == 2 and "QUEUE_URL" in found.line
    assert (found := classify(NoCredentialsError())) is not None and found.code == 2
    # Wrapped twice, as SQLAlchemy and a pool wrap a refused connection.
    try:
        try:
            raise ConnectionRefusedError(111, "Connect call failed")
        except OSError as inner:
            raise RuntimeError("pool could not connect") from inner
    except RuntimeError as outer:
        found = classify(outer, dsn=f"postgresql://u:{PASSWORD}@db.internal:6432/rek")
    assert found is not None and found.code == 4
    assert found.line.startswith("database db.internal:6432/rek is unreachable (connection refused)")
    assert PASSWORD not in found.line
    # Not the database's, not expected: a bug (None), whatever errno it carries.
    assert classify(FileNotFoundError(2, "No such file")) is None and classify(KeyError("x")) is None
    assert str(database_place("postgresql://u@/rek?host=/run/pg&port=5433")) == "/run/pg:5433/rek"
    assert classify(Exception("multi\nline\n" + "x" * 2000)) is None
