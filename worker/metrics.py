"""Prometheus metrics of the worker, registered once per process.

Units are in the names (``_seconds``, ``_per_second``, ``_total`` for counters). Every metric about a
job's API labels it ``api`` with the notification's spelling (``FACE_DETECTION``, ``FACE_SEARCH``);
metrics about one AWS call label it ``operation`` (``GetFaceDetection``). deploy/monitoring/ reads only
these names, and tests/test_monitoring.py checks that against a running service.

Every name starts with PREFIX (``rekognition_worker_``): a bare ``worker_`` would collide with other
workers in a shared Prometheus. Decided before 1.0 (docs/monitoring.md); a metric added here takes the prefix
too (tests/test_monitoring.py checks). ``_created`` series are not exposed: they doubled the exposition and no
alert or panel reads them.
"""

from __future__ import annotations

import platform

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from worker import __version__

PREFIX = "rekognition_worker_"
disable_created_metrics()  # type: ignore[no-untyped-call]

MESSAGES = Counter(f"{PREFIX}messages_total", "SQS messages handled, by outcome", ["outcome"])
JOBS = Counter(f"{PREFIX}jobs_total", "Jobs finished, by API and outcome", ["api", "outcome"])
PAGES = Counter(f"{PREFIX}pages_fetched_total", "Result pages fetched, by API (FACE_DETECTION, FACE_SEARCH)", ["api"])
ROWS = Counter(f"{PREFIX}rows_written_total", "Rows written, by table", ["table"])
CALLS = Counter(f"{PREFIX}rekognition_calls_total", "Rekognition Get* calls, by outcome", ["operation", "outcome"])
IN_FLIGHT = Gauge(f"{PREFIX}jobs_in_flight", "Jobs being ingested now")
JOB_SECONDS = Histogram(
    f"{PREFIX}job_duration_seconds", "Wall time of one job ingest",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
OLDEST_MESSAGE_AGE = Gauge(f"{PREFIX}oldest_message_age_seconds", "Age of the oldest message received")
RATE_LIMIT = Gauge(f"{PREFIX}rekognition_rate_limit_per_second", "Current Get* call rate of this process")
HEARTBEAT_FAILURES = Counter(f"{PREFIX}visibility_extension_failures_total", "Failed visibility extensions")
# By member only: the value comes from AWS, and a label per value would let a page mint series without
# bound. unknown_values.py logs each value the first time it is seen.
UNKNOWN_VALUES = Counter(
    f"{PREFIX}unknown_enum_values_total",
    "Enumeration values this version does not know, stored as sent; by member (landmark_type, gender, ...)",
    ["member"],
)
REQUEUES_HELD = Gauge(f"{PREFIX}requeues_held", "Messages on their last receive held invisible while their fresh "
                      "copy is retried in the background")
CREDENTIALS_FAILURES = Counter(f"{PREFIX}credentials_failures_total",
                               "Jobs handed back because AWS refused the worker's credentials or permissions")
# A FAILED/ERROR notification that Rekognition's own JobStatus contradicts: forged, or a stray copy.
NOTIFIED_FAILED_CONTRADICTED = Counter(
    f"{PREFIX}failed_notifications_contradicted_total",
    "Notifications saying FAILED or ERROR for a job Rekognition reports SUCCEEDED: settled as completions")
CREDENTIALS_PAUSED = Gauge(f"{PREFIX}credentials_paused",
                           "1 while the worker takes no messages because AWS refuses its credentials")

# Latencies. Buckets span a fast local call to a page under heavy throttling.
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CALL_SECONDS = Histogram(f"{PREFIX}rekognition_call_duration_seconds",
                         "Wall time of one Rekognition Get* call, whatever it answered", ["operation"],
                         buckets=_LATENCY_BUCKETS_S)
LIMITER_WAIT_SECONDS = Histogram(f"{PREFIX}rate_limiter_wait_seconds",
                                 "Time one Get* call waited for the rate limiter before it was sent",
                                 buckets=(0.001, *_LATENCY_BUCKETS_S))
DB_WRITE_SECONDS = Histogram(f"{PREFIX}db_write_duration_seconds",
                             "Wall time of one database write step: a page's rows (page), a job's end (finish), the "
                             "removal of erased identities before the switch (erasures), the switch (switch)",
                             ["step"], buckets=_LATENCY_BUCKETS_S)
RATE_CEILING = Gauge(f"{PREFIX}rekognition_rate_ceiling_per_second",
                     "The configured Get* ceiling (REKOGNITION_TPS); the limiter's rate stays at or below it")
# Queue depth as SQS approximates it, read by the worker every QUEUE_DEPTH_INTERVAL_S.
QUEUE_MESSAGES = Gauge(f"{PREFIX}queue_messages", "Messages in the worker's queue by state (visible, in_flight, "
                       "delayed), as SQS approximates them", ["state"])
DLQ_MESSAGES = Gauge(f"{PREFIX}dead_letter_queue_messages",
                     "Messages in the dead-letter queue named by the queue's redrive policy")
OLDEST_PENDING_JOB_AGE = Gauge(
    f"{PREFIX}oldest_pending_job_age_seconds",
    "Age of the oldest job recorded pending in the database (notification received, neither ingested nor failed), "
    "from Rekognition's completion time: results expire 7 days (604800 s) after it; the same for every replica")
READY = Gauge(f"{PREFIX}ready", "1 when the last /readyz evaluation found every check ok, else 0")
JOBS_STALLED = Gauge(f"{PREFIX}jobs_stalled", "Jobs without a page fetched or written for JOB_STALL_TIMEOUT_S, "
                     "still running")
BUILD_INFO = Gauge(f"{PREFIX}build_info", "Always 1; the labels say which build is running", ["version", "python"])
BUILD_INFO.labels(__version__, platform.python_version()).set(1)
RETENTION_ROWS_PURGED = Counter(f"{PREFIX}retention_rows_purged_total",
                                "Rows removed by the retention purge of `run` (RETENTION_DAYS), by table", ["table"])
TOMBSTONED_NOTIFICATIONS = Counter(
    f"{PREFIX}tombstoned_notifications_total",
    "Notifications of jobs that were deleted or expired (a tombstone), settled without ingesting them")
RETENTION_PASSES = Counter(f"{PREFIX}retention_passes_total",
                           "Retention passes, by outcome: done, skipped (another replica held the lock), error",
                           ["outcome"])
# Submissions (`submit`) and the jobs `run` starts for them.
SUBMISSIONS = Gauge(f"{PREFIX}submissions", "Submitted videos by state (submitted, starting, started, finished, "
                    "ingested, failed), read from the database: the same for every replica", ["state"])
REKOGNITION_JOBS_RUNNING = Gauge(
    f"{PREFIX}rekognition_jobs_running",
    "This deployment's Rekognition jobs starting or running (at most MAX_REKOGNITION_JOBS)")
STARTS = Counter(f"{PREFIX}rekognition_starts_total", "Start* calls by API and outcome: started, limit_exceeded "
                 "(the account's concurrent-job limit), throttled, credentials_error, error (retried), failed "
                 "(the video was refused)", ["api", "outcome"])
PROBES = Counter(f"{PREFIX}submission_probes_total", "Get* probes of started jobs whose notification is overdue, by "
                 "result: in_progress, finished (ingested as if notified), failed, error", ["result"])
# Job events (worker/events/): the outbox backlog, read from the database by `run` when a destination is set.
EVENTS_PENDING = Gauge(f"{PREFIX}events_pending", "Job events in the outbox not yet delivered to EVENTS_SNS_TOPIC_ARN "
                       "/ EVENTS_EVENT_BUS_NAME, read from the database: the same for every replica")
EVENTS_OLDEST_PENDING_AGE = Gauge(f"{PREFIX}events_oldest_pending_age_seconds",
                                  "Age of the oldest job event not yet delivered (0 when none), by the database's "
                                  "clock")
EVENTS_PUBLISHED = Counter(f"{PREFIX}events_published_total", "Job events delivered by this process, by type", ["type"])
EVENTS_PUBLISH_FAILURES = Counter(f"{PREFIX}events_publish_failures_total",
                                  "Failed deliveries of a job event, by destination (sns, eventbridge); retried "
                                  "with backoff", ["destination"])
for _destination in ("sns", "eventbridge"):
    EVENTS_PUBLISH_FAILURES.labels(_destination)
for _type in ("job.ingested", "job.failed", "job.deleted", "identity.erased"):
    EVENTS_PUBLISHED.labels(_type)
