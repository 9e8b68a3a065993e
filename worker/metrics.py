"""Prometheus metrics of the worker, registered once per process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter("worker_messages_total", "SQS messages handled, by outcome", ["outcome"])
JOBS = Counter("worker_jobs_total", "Jobs finished, by API and outcome", ["api", "outcome"])
PAGES = Counter("worker_pages_fetched_total", "Result pages fetched", ["api"])
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
CREDENTIALS_PAUSED = Gauge("worker_credentials_paused",
                           "1 while the worker takes no messages because AWS refuses its credentials")
