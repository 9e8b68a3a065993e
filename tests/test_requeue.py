"""A requeue (a fresh copy instead of the dead-letter queue, on a message's last receive) that SQS failures and
shutdown cannot turn into a dead-lettered good job.

Real components only: moto's SQS server behind tests/faulty_proxy.py (a real HTTP proxy that fails chosen
SendMessage / DeleteMessage calls), the Rekognition emulator over HTTP, PostgreSQL. The queue's redrive
policy allows 2 receives: the job below is IN_PROGRESS on both, so the second ends in a requeue.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from test_service import FAST, events, logs_with_context, metric, wait_until
from test_service_support import Queues, detection, enveloped, job_row, queue_counts, send, take_all

from tests.faulty_proxy import FaultyProxy
from worker.config import Settings
from worker.local import synth
from worker.runtime import open_runtime
from worker.service import Action, RequeueRetry, SqsWorker, decide, describe_queue

# Tries and backoffs short enough for tests; production keeps 5 tries, 0.5..8 s.
FAST_REQUEUE = RequeueRetry(attempts=3, base_s=0.05, cap_s=0.2, background_cap_s=0.3, shutdown_deadline_s=4.0)




@pytest.fixture
def wsettings(settings: Settings, queues: Queues) -> Settings:
    return settings.with_(queue_url=queues.url, poll_wait_s=1, visibility_timeout_s=2, heartbeat_interval_s=0.5,
                          not_ready_delay_s=1, not_ready_max_delay_s=2, shutdown_grace_s=5.0, health_port=0,
                          page_size=25)


@pytest.fixture
async def proxy(moto_url: str) -> AsyncIterator[FaultyProxy]:
    async with FaultyProxy(moto_url) as p:
        yield p


@asynccontextmanager
async def worker_via(proxy: FaultyProxy, settings: Settings, *, exit_when_idle: bool = False,
                     ) -> AsyncIterator[tuple[SqsWorker, asyncio.Task[int]]]:
    """A worker whose SQS calls go through ``proxy``; botocore makes one try, so the worker's own retries
    are what is tested. On exit it is asked to stop (if still running) and must return 0."""
    assert settings.queue_url is not None
    config = AioConfig(retries={"total_max_attempts": 1})
    async with get_session().create_client("sqs", region_name="us-east-1", endpoint_url=proxy.url,
                                           config=config) as sqs, open_runtime(settings) as rt:
        worker = SqsWorker(settings, rt, sqs, await describe_queue(sqs, settings.queue_url), retry_policy=FAST,
                           requeue_retry=FAST_REQUEUE)
        task = asyncio.create_task(worker.run(exit_when_idle=exit_when_idle))
        try:
            yield worker, task
        finally:
            worker.request_stop()
            assert await asyncio.wait_for(task, 30) == 0


def not_ready_twice(emu: Any) -> synth.JobFixture:
    """A job IN_PROGRESS on its first two Get* calls: its second receive (the last the redrive policy allows)
    ends in a requeue."""
    job = detection(emu, faces=30)
    emu.complete_after(job.job_id, 2)
    return job


async def assert_ingested_once_and_nothing_dead_lettered(sqs: Any, queues: Queues, db_url: str,
                                                         job: synth.JobFixture) -> None:
    assert await take_all(sqs, queues.dlq_url) == [], "a good job reached the dead-letter queue"
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    row = await job_row(db_url, job.job_id)
    assert row is not None and row["ingest_state"] == "ingested" and row["faces"] == len(job.results)
    assert row["attempts"] == 1, "ingested more than once"


# --- the pure part ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("receive_count", "expected"), [(1, Action("retry", 0)), (2, Action("requeue", 0))])
def test_a_message_released_at_shutdown_on_its_last_receive_is_requeued(receive_count: int,
                                                                        expected: Action) -> None:
    assert decide("released", receive_count, Settings(), max_receive_count=2) == expected


# --- SQS failing under a requeue -------------------------------------------------------------------


async def test_requeue_send_that_fails_is_retried_and_the_job_never_reaches_the_dlq(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str, proxy: FaultyProxy,
) -> None:
    job = not_ready_twice(emu)
    await send(sqs, queues.url, enveloped(job))
    proxy.fail("SendMessage", times=1, mode="500")
    async with asyncio.timeout(60):
        with logs_with_context() as logs:
            async with worker_via(proxy, wsettings, exit_when_idle=True) as (worker, task):
                proxy.fail("SendMessage", times=2, mode="drop")  # a 500, then two dropped connections
                await asyncio.shield(task)
        assert proxy.failed["SendMessage"] == 3 and proxy.calls["SendMessage"] == 4
        assert worker.counters.by_outcome == {"not_ready": 2, "ingested": 1}
        assert len(events(logs, "last delivery before the dead-letter queue: requeued a fresh copy")) == 1
        await assert_ingested_once_and_nothing_dead_lettered(sqs, queues, db_url, job)


async def test_requeue_send_that_keeps_failing_holds_the_original_until_sqs_recovers(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str, proxy: FaultyProxy,
) -> None:
    job = not_ready_twice(emu)
    await send(sqs, queues.url, enveloped(job))
    proxy.fail("SendMessage")  # every send, until healed
    async with asyncio.timeout(60):
        with logs_with_context() as logs:
            async with worker_via(proxy, wsettings, exit_when_idle=True) as (worker, task):
                # The bounded tries, then tries in the background.
                await wait_until(lambda: proxy.failed["SendMessage"] >= FAST_REQUEUE.attempts + 2, 15, "tries")
                assert metric("rekognition_worker_requeues_held") == 1
                # Well past its 2 s visibility timeout the original is still hidden, so never received again
                # (that receive would move it to the DLQ).
                await asyncio.sleep(2.5)
                assert await queue_counts(sqs, queues.url) == (0, 1, 0)
                assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)
                proxy.heal()
                await asyncio.shield(task)
        assert metric("rekognition_worker_requeues_held") == 0
        held = events(logs, "requeue not finished: the original is held invisible")
        assert len(held) == 1 and held[0]["hidden_for_s"] > 11 * 3600 and held[0]["copy_sent"] is False
        assert len(events(logs, "requeue finished in the background")) == 1
        assert worker.counters.by_outcome == {"not_ready": 2, "ingested": 1}
        await assert_ingested_once_and_nothing_dead_lettered(sqs, queues, db_url, job)


@pytest.mark.parametrize("mode", ["500", "drop"])
async def test_sqs_calls_that_fail_half_way_through_a_requeue(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str, proxy: FaultyProxy, mode: Any,
) -> None:
    """The copy is sent, then deleting the original fails."""
    job = not_ready_twice(emu)
    await send(sqs, queues.url, enveloped(job))
    async with asyncio.timeout(60):
        async with worker_via(proxy, wsettings, exit_when_idle=True) as (worker, task):
            proxy.fail("DeleteMessage", times=2, mode=mode)  # the first deletes are the requeue's
            await asyncio.shield(task)
        assert proxy.failed["DeleteMessage"] == 2
        assert worker.counters.by_outcome == {"not_ready": 2, "ingested": 1}
        await assert_ingested_once_and_nothing_dead_lettered(sqs, queues, db_url, job)


async def test_a_copy_sent_twice_is_ingested_once(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str, proxy: FaultyProxy,
) -> None:
    """SQS took the copy but the answer was lost: the retry sends a second copy, which finds the job done."""
    job = not_ready_twice(emu)
    await send(sqs, queues.url, enveloped(job))
    proxy.fail("SendMessage", times=1, mode="drop_after")
    async with asyncio.timeout(60):
        async with worker_via(proxy, wsettings, exit_when_idle=True) as (worker, task):
            await asyncio.shield(task)
        assert proxy.calls["SendMessage"] == 2
        assert worker.counters.by_outcome.get("ingested") == 1
        assert worker.counters.by_outcome.get("ingested", 0) + worker.counters.by_outcome.get("duplicate", 0) == 2
        await assert_ingested_once_and_nothing_dead_lettered(sqs, queues, db_url, job)


# --- shutdown ----------------------------------------------------------------------------------------


async def test_shutdown_cancel_between_send_and_delete_finishes_the_requeue(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str, proxy: FaultyProxy,
) -> None:
    job = not_ready_twice(emu)
    await send(sqs, queues.url, enveloped(job))
    proxy.fail("DeleteMessage", times=1, mode="stall")  # the requeue's delete waits on the wire
    async with asyncio.timeout(60):
        with logs_with_context() as logs:
            async with worker_via(proxy, wsettings.with_(shutdown_grace_s=0.2)) as (worker, task):
                await asyncio.wait_for(proxy.stalled.wait(), 15)
                assert proxy.calls["SendMessage"] == 1, "the copy is sent"
                worker.request_stop()
                # The grace period ends with the delete still stalled: the job's task is cancelled.
                await wait_until(lambda: bool(events(logs, "grace period over")), 10, "the cancellation")
                proxy.release()
                assert await asyncio.wait_for(asyncio.shield(task), 10) == 0
        assert worker.counters.by_outcome == {"not_ready": 2}, "settled, not released as well"
        # The original is deleted; the copy waits in the queue (delayed), the DLQ is empty.
        assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)
        assert sum(await queue_counts(sqs, queues.url)) == 1
        async with worker_via(proxy, wsettings, exit_when_idle=True) as (second, task):
            await asyncio.shield(task)
        assert second.counters.by_outcome == {"ingested": 1}
        await assert_ingested_once_and_nothing_dead_lettered(sqs, queues, db_url, job)


async def test_a_job_cut_short_on_its_last_receive_is_requeued_not_dead_lettered(
    wsettings: Settings, sqs: Any, queues: Queues, emu: Any, db_url: str, proxy: FaultyProxy,
) -> None:
    job = detection(emu, faces=100)  # 4 pages
    emu.complete_after(job.job_id, 1)  # IN_PROGRESS on its first receive only
    await send(sqs, queues.url, enveloped(job))
    async with asyncio.timeout(60):
        async with worker_via(proxy, wsettings.with_(shutdown_grace_s=0.2)) as (worker, task):
            await wait_until(lambda: worker.counters.by_outcome.get("not_ready") == 1, 10, "the first receive")
            emu.configure(latency_s=0.5)  # the second receive, the last allowed, runs long
            await wait_until(lambda: worker.counters.received == 2 and worker.in_flight == 1, 10,
                             "the second receive")
            await asyncio.sleep(0.3)
            worker.request_stop()
            assert await asyncio.wait_for(asyncio.shield(task), 15) == 0
        emu.configure(latency_s=0.0)
        assert worker.counters.by_outcome == {"not_ready": 1, "released": 1}
        assert await queue_counts(sqs, queues.dlq_url) == (0, 0, 0)
        async with worker_via(proxy, wsettings, exit_when_idle=True) as (second, task):
            await asyncio.shield(task)
        assert second.counters.by_outcome == {"ingested": 1}
        await assert_ingested_once_and_nothing_dead_lettered(sqs, queues, db_url, job)


async def test_the_queue_is_not_idle_while_a_copy_of_ours_is_still_delayed(
    wsettings: Settings, sqs: Any, queues: Queues,
) -> None:
    """SQS's counts are approximate (moto computes each one at a different instant), so a copy whose delay is
    just ending can be missing from all of them: `run --exit-when-idle` exited once with a requeued job left
    in the queue. The worker waits for its own copies by its own clock instead."""
    from worker.queue import OWN_COPY_MARGIN_S, Counters, SqsQueue

    now = [1000.0]
    queue = SqsQueue(sqs, await describe_queue(sqs, queues.url), wsettings, Counters(), retry=FAST_REQUEUE,
                     clock=lambda: now[0])
    await send(sqs, queues.url, "{}")
    [message] = (await sqs.receive_message(QueueUrl=queues.url, MaxNumberOfMessages=1))["Messages"]
    await queue.requeue(message, delay_s=5, receives=2, why="not_ready")
    # SQS counting nothing, as in the race.
    await sqs.purge_queue(QueueUrl=queues.url)
    assert await queue_counts(sqs, queues.url) == (0, 0, 0)
    assert not await queue.is_empty(), "a copy of ours is due in 5 s"
    now[0] += 5 + OWN_COPY_MARGIN_S
    assert await queue.is_empty()
