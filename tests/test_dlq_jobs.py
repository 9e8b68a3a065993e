"""`dlq list`, `dlq redrive`, `jobs list` and `jobs retry` as a user runs them (real processes), against
moto's SQS server (a main queue whose redrive policy names a DLQ), PostgreSQL and the Rekognition
emulator over HTTP; the SQS worker then drains what was moved back.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest
from test_cli import run_cli
from test_service_support import (
    POISON_BODIES,
    Queues,
    enveloped,
    make_queues,
    plain,
    queue_counts,
    raw,
    send,
    take_all,
    unique_id,
)

from worker.config import Settings
from worker.dlq import Scan, _age, list_dead_letters, locate, move_task_unsupported, scanning
from worker.jobs import parse_since
from worker.local import synth
from worker.messages import JobRef
from worker.runtime import open_runtime
from worker.service import RetryPolicy, SqsWorker, describe_queue

FAST = RetryPolicy(busy_base_s=1, busy_cap_s=2, transient_base_s=1, transient_cap_s=2)
ORIGIN = {"origin": {"DataType": "String", "StringValue": "dlq-test"}}


@pytest.fixture
def emu(rekognition_endpoint: Any) -> Any:
    return rekognition_endpoint


@pytest.fixture
async def queues(sqs: Any) -> Queues:
    # maxReceiveCount 2: the test may look at a moved message once before the worker takes it.
    return await make_queues(sqs, visibility_timeout_s=2, max_receive_count=2)


@pytest.fixture
def wsettings(settings: Settings, queues: Queues) -> Settings:
    return settings.with_(queue_url=queues.url, poll_wait_s=1, visibility_timeout_s=2, heartbeat_interval_s=0.5,
                          not_ready_delay_s=1, not_ready_max_delay_s=8, shutdown_grace_s=5.0, health_port=0)


@pytest.fixture
def env(db_url: str, emu: Any, moto_url: str, queues: Queues) -> dict[str, str]:
    return {"DATABASE_URL": db_url, "AWS_ENDPOINT_URL_REKOGNITION": emu.url, "AWS_ENDPOINT_URL_SQS": moto_url,
            "QUEUE_URL": queues.url, "REKOGNITION_TPS": "200", "DECODE_PROCESSES": "0"}


async def drain(settings: Settings, sqs: Any, timeout_s: float = 40) -> SqsWorker:
    """The SQS worker until its queue is empty (it must exit 0 within the deadline)."""
    assert settings.queue_url is not None
    async with open_runtime(settings) as rt:
        worker = SqsWorker(settings, rt, sqs, await describe_queue(sqs, settings.queue_url), retry_policy=FAST)
        async with asyncio.timeout(timeout_s):
            assert await worker.run(exit_when_idle=True) == 0
    return worker


async def ingest(settings: Settings, *fixtures_or_ids: synth.JobFixture | str) -> list[str]:
    refs = [JobRef.create(f, "GetFaceDetection") if isinstance(f, str) else JobRef.create(f.job_id, f.api)
            for f in fixtures_or_ids]
    async with open_runtime(settings) as rt, asyncio.timeout(30):
        return [(await rt.ingestor.ingest(ref)).outcome for ref in refs]


async def peek(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    """Visible messages of the main queue without hiding them (one receive each: maxReceiveCount is 2)."""
    resp = await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                     VisibilityTimeout=0, MessageAttributeNames=["All"])
    return list(resp.get("Messages", []))


def lines_of(result: Any) -> str:
    return f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}"


async def test_dlq_list_redrive_job_then_all_and_the_worker_ingests_them(
        sqs: Any, queues: Queues, wsettings: Settings, emu: Any, env: dict[str, str],
        db: asyncpg.Connection) -> None:
    poison = POISON_BODIES[:2]
    # Unusable messages reach the DLQ the real way: the worker hands them to the redrive policy.
    await send(sqs, queues.url, *poison)
    await drain(wsettings, sqs)
    assert await queue_counts(sqs, queues.dlq_url) == (2, 0, 0)

    a = synth.detection_job(unique_id("dlq-a"), faces=30)
    b = synth.search_job(unique_id("dlq-b"), persons_elements=20)
    c = synth.detection_job(unique_id("dlq-c"), faces=10)
    d = synth.detection_job(unique_id("dlq-d"), faces=15)  # not in the emulator yet: its ingest fails
    emu.add_jobs([a, b, c])
    assert await ingest(wsettings, c, d) == ["ingested", "failed"]
    # Good notifications in the DLQ: what a handler that kept crashing (or an older worker) leaves.
    await sqs.send_message(QueueUrl=queues.dlq_url, MessageBody=enveloped(a), MessageAttributes=ORIGIN)
    await send(sqs, queues.dlq_url, raw(a), plain(b), enveloped(c), enveloped(d))

    listed = run_cli("dlq", "list", "--format", "json", env=env)
    assert listed.returncode == 0, lines_of(listed)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]  # JSON lines: one message per line
    assert len(rows) == 7 and len({r["message_id"] for r in rows}) == 7
    by_job: dict[str | None, list[dict[str, Any]]] = {}
    for r in rows:
        by_job.setdefault(r["job_id"], []).append(r)
    assert sorted(r["body_excerpt"] for r in by_job[None]) == sorted(poison)
    assert all(r["reason"].startswith("unparseable: ") and r["ingested"] is None for r in by_job[None])
    reasons = {r["body_excerpt"]: r["reason"] for r in by_job[None]}
    assert reasons[poison[0]].startswith("unparseable: message body is not valid JSON: ")
    assert reasons[poison[1]] == "unparseable: notification must be a JSON object, got list"
    assert [r["ingested"] for r in by_job[a.job_id]] == [False, False]
    assert by_job[a.job_id][0]["reason"] == "handler kept failing; no outcome recorded for the job"
    assert by_job[b.job_id][0]["api"] == "FACE_SEARCH" and by_job[b.job_id][0]["receive_count"] >= 1
    assert by_job[c.job_id][0]["ingested"] is True and "ingested now" in by_job[c.job_id][0]["reason"]
    assert by_job[d.job_id][0]["ingested"] is False
    assert by_job[d.job_id][0]["reason"].startswith("job failed: ResourceNotFoundException")
    assert all(r["sent_at"] and r["age_s"] >= 0 for r in rows)
    # Reading took nothing away and hides nothing: every message is visible in the DLQ again.
    assert await queue_counts(sqs, queues.dlq_url) == (7, 0, 0)
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)

    table = run_cli("dlq", "list", "--format", "table", env=env)
    assert table.returncode == 0, lines_of(table)
    assert a.job_id in table.stdout and "unparseable" in table.stdout and "7 message(s)" in table.stdout

    dry_all = run_cli("dlq", "redrive", "--all", "--dry-run", env=env)
    assert dry_all.returncode == 0, lines_of(dry_all)
    assert "would move: 4" in dry_all.stdout and "skipped (ingested): 1\n" in dry_all.stdout
    assert "left (unparseable): 2" in dry_all.stdout and "message move task" in dry_all.stdout
    dry = run_cli("dlq", "redrive", "--job", a.job_id, "--dry-run", env=env)
    assert dry.returncode == 0, lines_of(dry)
    assert f"would move: 2 ({a.job_id})" in dry.stdout and "dry run" in dry.stdout
    assert await queue_counts(sqs, queues.dlq_url) == (7, 0, 0)

    only_a = run_cli("dlq", "redrive", "--job", a.job_id, env=env)
    assert only_a.returncode == 0, lines_of(only_a)
    assert f"moved: 2 ({a.job_id})" in only_a.stdout and "left (other jobs): 5" in only_a.stdout
    assert await queue_counts(sqs, queues.dlq_url) == (5, 0, 0)
    moved = await peek(sqs, queues.url)
    assert sorted(m["Body"] for m in moved) == sorted([enveloped(a), raw(a)])
    assert [m.get("MessageAttributes") for m in moved if m["Body"] == enveloped(a)] == [ORIGIN]

    emu.add_job(d)  # the cause of d's failure is fixed
    rest = run_cli("dlq", "redrive", "--all", env=env)
    assert rest.returncode == 0, lines_of(rest)
    # moto has no StartMessageMoveTask: the command says so and moves one by one.
    assert "message move task not available" in rest.stdout
    assert "moved: 2" in rest.stdout and b.job_id in rest.stdout and d.job_id in rest.stdout
    assert "skipped (ingested): 1, DLQ copy deleted" in rest.stdout and "left (unparseable): 2" in rest.stdout
    assert await queue_counts(sqs, queues.dlq_url) == (2, 0, 0)
    assert await queue_counts(sqs, queues.url) == (4, 0, 0)

    await drain(wsettings, sqs)
    states = dict(await db.fetch("SELECT job_id, ingest_state::text FROM jobs WHERE job_id = ANY($1)",
                                 [a.job_id, b.job_id, c.job_id, d.job_id]))
    assert states == {a.job_id: "ingested", b.job_id: "ingested", c.job_id: "ingested", d.job_id: "ingested"}
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert sorted(m["Body"] for m in await take_all(sqs, queues.dlq_url)) == sorted(poison)


async def test_dlq_commands_explain_a_missing_queue_url_or_redrive_policy(
        sqs: Any, env: dict[str, str]) -> None:
    no_url = run_cli("dlq", "list", env={k: v for k, v in env.items() if k != "QUEUE_URL"})
    assert no_url.returncode == 2 and "QUEUE_URL is not set" in no_url.stderr
    plain_queue = (await sqs.create_queue(QueueName=unique_id("no-dlq")))["QueueUrl"]
    no_policy = run_cli("dlq", "redrive", "--all", env={**env, "QUEUE_URL": plain_queue})
    assert no_policy.returncode == 2 and "has no redrive policy" in no_policy.stderr
    both = run_cli("dlq", "redrive", "--all", "--job", "x", env=env)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    bad_job = run_cli("dlq", "redrive", "--job", "not a job", env=env)
    assert bad_job.returncode == 2 and "invalid JobId" in bad_job.stderr


async def test_jobs_list_and_retry_failed_jobs(settings: Settings, emu: Any, env: dict[str, str],
                                               db: asyncpg.Connection) -> None:
    missing = synth.detection_job(unique_id("retry-missing"), faces=12)  # ResourceNotFound until added
    rek_failed = synth.detection_job(unique_id("retry-rekfailed"), faces=5)
    good = synth.detection_job(unique_id("retry-good"), faces=8)
    emu.add_jobs([rek_failed, good])
    emu.set_status(rek_failed.job_id, "FAILED", "Unsupported codec")
    assert await ingest(settings, missing, rek_failed, good) == ["failed", "failed", "ingested"]

    failed = run_cli("jobs", "list", "--state", "failed", "--format", "json", env=env)
    assert failed.returncode == 0, lines_of(failed)
    rows = {r["job_id"]: r for r in map(json.loads, failed.stdout.splitlines())}
    assert set(rows) == {missing.job_id, rek_failed.job_id}
    assert rows[missing.job_id]["failure_code"] == "ResourceNotFoundException"
    assert rows[rek_failed.job_id]["job_status"] == "FAILED"
    assert rows[rek_failed.job_id]["failure_reason"] == "Unsupported codec"
    assert {"api", "attempts", "notified_at", "ingested_at", "updated_at"} <= set(rows[missing.job_id])
    everything = run_cli("jobs", "list", "--limit", "2", "--format", "table", env=env)
    assert everything.returncode == 0 and "2 job(s), newest first" in everything.stdout
    assert "limit reached" in everything.stdout
    none = run_cli("jobs", "list", "--since", "2999-01-01", "--format", "json", env=env)
    assert none.returncode == 0 and none.stdout == ""
    bogus = run_cli("jobs", "list", "--state", "bogus", env=env)
    assert bogus.returncode == 2 and "unknown ingest state 'bogus': expected one of" in bogus.stderr

    dry = run_cli("jobs", "retry", "--state", "failed", "--dry-run", "--format", "table", env=env)
    assert dry.returncode == 0, lines_of(dry)
    assert "1 job(s) to retry, 1 skipped" in dry.stdout and "Rekognition reported the job FAILED" in dry.stdout
    attempts = await db.fetchval("SELECT attempts FROM jobs WHERE job_id = $1", missing.job_id)

    still_missing = run_cli("jobs", "retry", "--state", "failed", "--format", "table", env=env)
    assert still_missing.returncode == 1, lines_of(still_missing)
    assert "retried 1: 0 ingested" in still_missing.stdout
    assert await db.fetchval("SELECT attempts FROM jobs WHERE job_id = $1", missing.job_id) == attempts + 1

    emu.add_job(missing)  # fixed: Rekognition now has the job
    fixed = run_cli("jobs", "retry", "--state", "failed", "--since", "2000-01-01T00:00:00Z", "--format", "table",
                    env=env)
    assert fixed.returncode == 0, lines_of(fixed)
    assert "retried 1: 1 ingested" in fixed.stdout
    states = dict(await db.fetch("SELECT job_id, ingest_state::text FROM jobs"))
    assert states == {missing.job_id: "ingested", rek_failed.job_id: "failed", good.job_id: "ingested"}
    assert await db.fetchval("SELECT faces FROM jobs WHERE job_id = $1", missing.job_id) == 12

    forced = run_cli("jobs", "retry", "--job", rek_failed.job_id, good.job_id, "--include-rekognition-failed",
                     env=env)
    assert forced.returncode == 1, lines_of(forced)  # Rekognition still says FAILED
    assert any(line.get("job_id") == good.job_id and line.get("error") == "skipped: job is ingested, not failed"
               for line in map(json.loads, forced.stderr.splitlines()))
    wrong_state = run_cli("jobs", "retry", "--state", "ingested", env=env)
    assert wrong_state.returncode == 2 and "only failed jobs are retried" in wrong_state.stderr
    bad_since = run_cli("jobs", "list", "--since", "yesterday", env=env)
    assert bad_since.returncode == 2 and "not an ISO 8601" in bad_since.stderr


def test_pure_helpers() -> None:
    assert [_age(s) for s in (None, 5, 60, 95, 3600 + 120, 90000)] == ["?", "5s", "1m", "1m35s", "1h2m", "1d1h"]
    assert parse_since("2026-11-30").isoformat() == "2026-11-30T00:00:00+00:00"
    assert parse_since("2026-11-30T12:00:00+02:00").utcoffset().total_seconds() == 7200  # type: ignore[union-attr]
    assert move_task_unsupported(ValueError("x")) is None


async def test_scan_sees_each_message_once_across_batches_and_lapses_and_releases_on_error(
        sqs: Any, queues: Queues) -> None:
    bodies = [f'{{"JobId": "scan-{i:03d}", "API": "FACE_SEARCH"}}' for i in range(23)]
    await send(sqs, queues.dlq_url, *bodies)
    topo = await locate(sqs, queues.url)
    assert (topo.dlq_url, topo.max_receive_count) == (queues.dlq_url, 2)
    async with asyncio.timeout(30):
        listing = await list_dead_letters(sqs, topo, None)
    assert sorted(r["body_excerpt"] for r in listing.rows) == sorted(bodies) and not listing.truncated
    assert {r["reason"] for r in listing.rows} == {"handler kept failing (database not consulted)"}
    assert all(r["ingested"] is None for r in listing.rows)
    assert await queue_counts(sqs, queues.dlq_url) == (23, 0, 0)

    # A visibility shorter than the scan: held messages come back mid-scan and are not counted twice.
    seen: list[str] = []
    async with asyncio.timeout(30):
        scan = Scan(sqs, queues.dlq_url, visibility_s=1)
        try:
            async for batch in scan.batches():
                seen.extend(dl.message_id for dl in batch)
                await asyncio.sleep(0.6)
        finally:
            await scan.release()
    assert len(seen) == len(set(seen)) == 23 and scan.received > 23

    # The block fails half-way: whatever it held is visible again at once.
    with pytest.raises(RuntimeError):
        async with asyncio.timeout(30), scanning(sqs, queues.dlq_url) as scan:
            async for _ in scan.batches():
                raise RuntimeError("operator pressed Ctrl-C")
    assert await queue_counts(sqs, queues.dlq_url) == (23, 0, 0)
    limited = await list_dead_letters(sqs, topo, None, limit=5)
    assert len(limited.rows) == 5 and limited.truncated
    assert await queue_counts(sqs, queues.dlq_url) == (23, 0, 0)
