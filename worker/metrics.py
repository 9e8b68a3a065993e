"""Prometheus metrics of the worker, registered once per process.

Units are in the names (``_seconds``, ``_per_second``, ``_total`` for counters). Every metric about a
job's API labels it ``api`` with the notification's spelling (``FACE_DETECTION``, ``FACE_SEARCH``);
metrics about one AWS call label it ``operation`` (``GetFaceDetection``). deploy/monitoring/ reads only
these names, and tests/test_monitoring.py checks that against a running service.
"""

from __future__ import annotations

import platform

from prometheus_client import Counter, Gauge, Histogram

from worker import __version__

MESSAGES = Counter("worker_messages_total", "SQS messages handled, by outcome", ["outcome"])
JOBS = Counter("worker_jobs_total", "Jobs finished, by API and outcome", ["api", "outcome"])
PAGES = Counter("worker_pages_fetched_total", "Result pages fetched, by API (FACE_DETECTION, FACE_SEARCH)", ["api"])
ROWS = Counter("worker_rows_written_total", "Rows written, by table", ["table"])
CALLS = Counter("worker_rekognition_calls_total", "Rekognition Get* calls, by outcome", ["operation", "outcome"])
IN_FLIGHT = Gauge("worker_jobs_in_flight", "Jobs being ingested now")
JOB_SECONDS = Histogram(
    "worker_job_duration_seconds", "Wall time of one job ingest",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
OLDEST_MESSAGE_AGE = Gauge("worker_oldest_message_age_seconds", "Age of the oldest message received")
RATE_LIMIT = Gauge("worker_rekognition_rate_limit_per_second", "Current Get* call rate of this process")
HEARTBEAT_FAILURES = Counter("worker_visibility_extension_failures_total", "Failed visibility extensions")
UNKNOWN_VALUES = Counter(
    "worker_unknown_enum_values_total",
    "Enumeration values this version does not know, stored as sent; by member and value (truncated)",
    ["member", "value"],
)
REQUEUES_HELD = Gauge("worker_requeues_held", "Messages on their last receive held invisible while their fresh "
                      "copy is retried in the background")
CREDENTIALS_FAILURES = Counter("worker_credentials_failures_total",
                               "Jobs handed back because AWS refused the worker's credentials or permissions")
# A FAILED/ERROR notification that Rekognition's own JobStatus contradicts: forged, or a stray copy.
NOTIFIED_FAILED_CONTRADICTED = Counter(
    "worker_failed_notifications_contradicted_total",
    "Notifications saying FAILED or ERROR for a job Rekognition reports SUCCEEDED: settled as completions")
CREDENTIALS_PAUSED = Gauge("worker_credentials_paused",
                           "1 while the worker takes no messages because AWS refuses its credentials")

# Latencies. Buckets span a fast local call to a page under heavy throttling.
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CALL_SECONDS = Histogram("worker_rekognition_call_duration_seconds",
                         "Wall time of one Rekognition Get* call, whatever it answered", ["operation"],
                         buckets=_LATENCY_BUCKETS_S)
LIMITER_WAIT_SECONDS = Histogram("worker_rate_limiter_wait_seconds",
                                 "Time one Get* call waited for the rate limiter before it was sent",
                                 buckets=(0.001, *_LATENCY_BUCKETS_S))
DB_WRITE_SECONDS = Histogram("worker_db_write_duration_seconds",
                             "Wall time of one database write step: a page's rows (page) or a job's end (finish)",
                             ["step"], buckets=_LATENCY_BUCKETS_S)
RATE_CEILING = Gauge("worker_rekognition_rate_ceiling_per_second",
                     "The configured Get* ceiling (REKOGNITION_TPS); the limiter's rate stays at or below it")
# Queue depth as SQS approximates it, read by the worker every QUEUE_DEPTH_INTERVAL_S.
QUEUE_MESSAGES = Gauge("worker_queue_messages", "Messages in the worker's queue by state (visible, in_flight, "
                       "delayed), as SQS approximates them", ["state"])
DLQ_MESSAGES = Gauge("worker_dead_letter_queue_messages",
                     "Messages in the dead-letter queue named by the queue's redrive policy")
OLDEST_PENDING_JOB_AGE = Gauge(
    "worker_oldest_pending_job_age_seconds",
    "Age of the oldest job recorded pending in the database (notification received, neither ingested nor failed), "
    "from Rekognition's completion time: results expire 7 days (604800 s) after it; the same for every replica")
READY = Gauge("worker_ready", "1 when the last /readyz evaluation found every check ok, else 0")
JOBS_STALLED = Gauge("worker_jobs_stalled", "Jobs without a page fetched or written for JOB_STALL_TIMEOUT_S, "
                     "still running")
BUILD_INFO = Gauge("worker_build_info", "Always 1; the labels say which build is running", ["version", "python"])
BUILD_INFO.labels(__version__, platform.python_version()).set(1)
RETENTION_ROWS_PURGED = Counter("worker_retention_rows_purged_total",
                                "Rows removed by the retention purge of `run` (RETENTION_DAYS), by table", ["table"])
RETENTION_PASSES = Counter("worker_retention_passes_total",
                           "Retention passes, by outcome: done, skipped (another replica held the lock), error",
                           ["outcome"])
# Submissions (`submit`) and the jobs `run` starts for them.
SUBMISSIONS = Gauge("worker_submissions", "Submitted videos by state (submitted, starting, started, finished, "
                    "ingested, failed), read from the database: the same for every replica", ["state"])
REKOGNITION_JOBS_RUNNING = Gauge(
    "worker_rekognition_jobs_running",
    "This deployment's Rekognition jobs starting or running (at most MAX_REKOGNITION_JOBS)")
STARTS = Counter("worker_rekognition_starts_total", "Start* calls by API and outcome: started, limit_exceeded "
                 "(the account's concurrent-job limit), throttled, credentials_error, error (retried), failed "
                 "(the video was refused)", ["api", "outcome"])
PROBES = Counter("worker_submission_probes_total", "Get* probes of started jobs whose notification is overdue, by "
                 "result: in_progress, finished (ingested as if notified), failed, error", ["result"])
