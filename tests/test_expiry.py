"""The 7-day clock of pending notifications (worker/expiry.py), on a fake wall clock."""

from __future__ import annotations

from worker import metrics
from worker.expiry import MAX_TRACKED_JOBS, NotificationClock

DAY_S = 86400.0


def gauge() -> float:
    return float(metrics.OLDEST_PENDING_NOTIFICATION_AGE._value.get())


def test_oldest_pending_notification_age_follows_the_first_completion_time() -> None:
    now = [10 * DAY_S]
    clock = NotificationClock(wall_clock_s=lambda: now[0])
    assert clock.oldest_age_s() == 0.0
    clock.seen("job-a", int((now[0] - 2 * DAY_S) * 1000))
    clock.seen("job-b", int((now[0] - 1 * DAY_S) * 1000))
    assert clock.oldest_age_s() == 2 * DAY_S and gauge() == 2 * DAY_S
    # A re-sent copy carries the same body; even a later Timestamp does not reset the job's clock.
    clock.seen("job-a", int(now[0] * 1000))
    now[0] += DAY_S
    clock.publish()
    assert gauge() == 3 * DAY_S
    clock.done("job-a")
    assert gauge() == 2 * DAY_S
    clock.done("job-b")
    assert gauge() == 0.0
    clock.seen("job-c", None)  # a hand-queued message without a Timestamp has no clock
    assert clock.oldest_age_s() == 0.0


def test_tracking_is_bounded_and_keeps_the_oldest() -> None:
    clock = NotificationClock(wall_clock_s=lambda: 1_000_000.0)
    for i in range(MAX_TRACKED_JOBS):
        clock.seen(f"job-{i}", 500_000_000 + i)
    clock.seen("older", 1_000)  # older than all: replaces the newest
    clock.seen("newer", 900_000_000)  # newer than all: not tracked
    assert clock.oldest_age_s() == 1_000_000.0 - 1.0
    assert len(clock._completed_ms) == MAX_TRACKED_JOBS and "newer" not in clock._completed_ms
