"""The one place that reads the environment: a typed, immutable Settings object.

AWS endpoints and credentials are deliberately absent: botocore resolves them itself
(`AWS_ENDPOINT_URL_REKOGNITION`, `AWS_ENDPOINT_URL_SQS`, the credential chain, ...), and
re-implementing that resolution is how projects end up ignoring one of its sources. The one AWS
value read here is `AWS_REGION`, which the AWS SDKs honour but botocore only knows as
`AWS_DEFAULT_REGION`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from worker.errors import ConfigError

RateLimitScope = Literal["process", "fleet"]
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# HMAC-SHA256's own block is 64 bytes; 32 random bytes make the audit's hash of a short identifier (an
# ExternalImageId such as "anna") as hard to guess as the key itself.
MIN_ERASURE_KEY_BYTES = 32


def normalize_database_url(url: str) -> str:
    """Return a libpq-style ``postgresql://`` DSN for asyncpg.

    Accepts ``postgresql://``, ``postgres://`` and SQLAlchemy's ``postgresql+asyncpg://``. Query
    parameters (``host=/socket/dir``, ``sslmode``, ...) are kept verbatim because asyncpg parses
    them the way libpq does.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in {"postgresql", "postgres", "postgresql+asyncpg"}:
        raise ConfigError(
            f"DATABASE_URL must start with postgresql:// or postgresql+asyncpg:// (got scheme {scheme!r})"
        )
    return urlunsplit(("postgresql", parts.netloc, parts.path, parts.query, parts.fragment))


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if not parts.password:
        # No password, or an empty one (the embedded demo database): nothing to hide, and the URL stays
        # usable as printed.
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def log_format_from_env(env: Mapping[str, str] | None = None) -> Literal["auto", "json", "console"]:
    """LOG_FORMAT alone, for reporting an error before Settings exist; an invalid value means auto."""
    value = ((os.environ if env is None else env).get("LOG_FORMAT") or "auto").strip().lower()
    return value if value in ("json", "console") else "auto"  # type: ignore[return-value]


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer (got {raw!r})") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum} (got {value})")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number (got {raw!r})") from None
    if not value >= minimum:  # also rejects NaN
        raise ConfigError(f"{name} must be >= {minimum} (got {raw})")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false (got {raw!r})")


def _log_level(env: Mapping[str, str]) -> str:
    level = (env.get("LOG_LEVEL") or "info").strip().lower()
    level = "warning" if level == "warn" else level
    if level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)} (got {env.get('LOG_LEVEL')!r})")
    return level


def _erasure_hash_key(env: Mapping[str, str]) -> str | None:
    key = env.get("ERASURE_HASH_KEY") or None
    if key is not None and len(key.encode()) < MIN_ERASURE_KEY_BYTES:
        # The value itself is never quoted: it is a secret.
        raise ConfigError(f"ERASURE_HASH_KEY must have at least {MIN_ERASURE_KEY_BYTES} bytes (it has "
                          f"{len(key.encode())}); generate one with: openssl rand -hex 32")
    return key


def _retention_days(env: Mapping[str, str]) -> float | None:
    raw = env.get("RETENTION_DAYS")
    if raw is None or raw.strip() == "":
        return None
    days = _float(env, "RETENTION_DAYS", 0.0)
    if not days > 0:
        raise ConfigError(f"RETENTION_DAYS must be a number of days > 0, or unset to keep forever (got {raw!r})")
    return days


@dataclass(frozen=True, slots=True)
class Settings:
    """Every tunable of the worker. Build with :meth:`from_env`; tests build their own."""

    database_url: str | None = None
    queue_url: str | None = None
    rekognition_tps: float = 5.0
    max_concurrent_jobs: int = 4
    rate_limit_scope: RateLimitScope = "process"
    page_size: int = 1000
    # Pages fetched ahead of the writer per job: bounds memory (a full page is ~3.6 MB of JSON).
    prefetch_pages: int = 2
    # Processes that decode, normalize and compress pages; -1: one when a second core exists.
    decode_processes: int = -1
    # Start the decoding process with the runtime (False: on the first page; for bench/startup_bench.py).
    decode_warm_start: bool = True
    db_pool_size: int = 10
    archive_raw_pages: bool = True
    # Retries of one Get* call for faults and throttling before the job is handed back as transient.
    max_call_attempts: int = 8
    # A job with no page fetched or written for this long is cancelled and handed back; /livez fails meanwhile.
    job_stall_timeout_s: float = 600.0
    # More pages than this in one job ends it as PaginationLoop (a 1000-hour video is ~20,000 pages).
    max_pages_per_job: int = 100_000
    # The same non-infrastructure error on this many attempts in a row records the job failed.
    max_identical_failures: int = 5
    # How often `run` drops the rows of ingests that stopped (a killed process, a lost connection) and that no
    # later writer of the same job cleaned up (worker/sweep.py).
    stale_sweep_interval_s: float = 300.0
    # Credential or IAM errors in a row before the service stops taking messages, and how often it then
    # probes Rekognition to resume.
    credentials_pause_after: int = 3
    credentials_probe_interval_s: float = 30.0
    # How often `run` reads its queue's and dead-letter queue's depth into the metrics.
    queue_depth_interval_s: float = 60.0
    # Completion notifications of other Rekognition APIs on a shared topic: "dead-letter" (never deleted
    # unseen: they go to the DLQ like any unusable message) or "delete" (dropped, counted as "other_api").
    other_api_notifications: Literal["dead-letter", "delete"] = "dead-letter"
    retry_base_s: float = 0.25
    retry_cap_s: float = 20.0
    # SQS worker
    poll_wait_s: int = 20
    visibility_timeout_s: int = 60
    heartbeat_interval_s: float = 20.0
    shutdown_grace_s: float = 25.0
    not_ready_delay_s: int = 30
    not_ready_max_delay_s: int = 900
    health_port: int = 8080
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"
    # AWS_REGION as the AWS SDKs define it (it wins over AWS_DEFAULT_REGION); None leaves the
    # region entirely to botocore (AWS_DEFAULT_REGION, the profile).
    aws_region: str | None = None
    # Retention: `run` purges jobs ingested (failed jobs: last updated) more than this many days ago;
    # None keeps everything forever. Checked every RETENTION_INTERVAL_S by one replica at a time.
    retention_days: float | None = None
    retention_interval_s: float = 3600.0
    # The key of the erasure audit's HMAC (`erase` refuses to run without it); never printed.
    erasure_hash_key: str | None = field(default=None, repr=False)
    # Starting submitted videos (`submit`, then `run`): the jobs' NotificationChannel, how many of this
    # deployment's jobs may run at Rekognition at once (across replicas), the Start* call ceiling, and how
    # long a started job may go without a completion notification before one Get* probe asks about it.
    rekognition_sns_topic_arn: str | None = None
    rekognition_role_arn: str | None = None
    max_rekognition_jobs: int = 20
    rekognition_start_tps: float = 5.0
    submit_sweep_after_s: float = 900.0
    # How often each replica looks for submissions to start when nothing wakes it sooner, and how long a
    # claimed start may go unrecorded (a replica died between claim and record) before another retries it
    # with the same ClientRequestToken.
    submit_poll_interval_s: float = 5.0
    submit_start_lease_s: float = 120.0
    # Job events (docs/events.md): where the outbox is delivered (unset: events stay in the outbox), how long
    # delivered events are kept, how often `run` looks for events when no NOTIFY woke it, and how long a
    # command (and `run --exit-when-idle` before it exits) tries to deliver what is pending.
    events_sns_topic_arn: str | None = None
    events_event_bus_name: str | None = None
    events_retention_days: float = 7.0
    events_poll_interval_s: float = 5.0
    events_flush_timeout_s: float = 10.0
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def asyncpg_dsn(self) -> str:
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set")
        return normalize_database_url(self.database_url)

    def with_(self, **changes: object) -> Settings:
        """A copy with some fields changed (tests and the local stack use this)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        database_url = env.get("DATABASE_URL") or None
        if database_url is not None:
            normalize_database_url(database_url)  # validate early, with a clear message
        scope = (env.get("RATE_LIMIT_SCOPE") or "process").strip().lower()
        if scope not in ("process", "fleet"):
            raise ConfigError(f"RATE_LIMIT_SCOPE must be 'process' or 'fleet' (got {scope!r})")
        log_format = (env.get("LOG_FORMAT") or "auto").strip().lower()
        if log_format not in ("auto", "json", "console"):
            raise ConfigError(f"LOG_FORMAT must be auto, json or console (got {log_format!r})")
        other_api = (env.get("OTHER_API_NOTIFICATIONS") or "dead-letter").strip().lower()
        if other_api not in ("dead-letter", "delete"):
            raise ConfigError(f"OTHER_API_NOTIFICATIONS must be dead-letter or delete (got {other_api!r})")
        page_size = _int(env, "PAGE_SIZE", 1000, minimum=1)
        if page_size > 1000:
            raise ConfigError(f"PAGE_SIZE must be 1..1000 (got {page_size})")
        rekognition_tps = _float(env, "REKOGNITION_TPS", 5.0, minimum=0.01)
        return cls(
            database_url=database_url,
            queue_url=env.get("QUEUE_URL") or None,
            rekognition_tps=rekognition_tps,
            max_concurrent_jobs=_int(env, "MAX_CONCURRENT_JOBS", 4, minimum=1),
            rate_limit_scope=scope,  # type: ignore[arg-type]
            page_size=page_size,
            prefetch_pages=_int(env, "PREFETCH_PAGES", 2, minimum=1),
            decode_processes=_int(env, "DECODE_PROCESSES", -1, minimum=-1),
            decode_warm_start=_bool(env, "DECODE_WARM_START", True),
            db_pool_size=_int(env, "DB_POOL_SIZE", 10, minimum=1),
            archive_raw_pages=_bool(env, "ARCHIVE_RAW_PAGES", True),
            max_call_attempts=_int(env, "MAX_CALL_ATTEMPTS", 8, minimum=1),
            job_stall_timeout_s=_float(env, "JOB_STALL_TIMEOUT_S", 600.0, minimum=1.0),
            max_pages_per_job=_int(env, "MAX_PAGES_PER_JOB", 100_000, minimum=1),
            max_identical_failures=_int(env, "MAX_IDENTICAL_FAILURES", 5, minimum=1),
            stale_sweep_interval_s=_float(env, "STALE_SWEEP_INTERVAL_S", 300.0, minimum=1.0),
            credentials_pause_after=_int(env, "CREDENTIALS_PAUSE_AFTER", 3, minimum=1),
            credentials_probe_interval_s=_float(env, "CREDENTIALS_PROBE_INTERVAL_S", 30.0, minimum=0.1),
            queue_depth_interval_s=_float(env, "QUEUE_DEPTH_INTERVAL_S", 60.0, minimum=1.0),
            other_api_notifications=other_api,  # type: ignore[arg-type]
            retry_base_s=_float(env, "RETRY_BASE_S", 0.25),
            retry_cap_s=_float(env, "RETRY_CAP_S", 20.0),
            poll_wait_s=_int(env, "POLL_WAIT_S", 20, minimum=0),
            visibility_timeout_s=_int(env, "VISIBILITY_TIMEOUT_S", 60, minimum=1),
            heartbeat_interval_s=_float(env, "HEARTBEAT_INTERVAL_S", 20.0, minimum=0.1),
            shutdown_grace_s=_float(env, "SHUTDOWN_GRACE_S", 25.0),
            not_ready_delay_s=_int(env, "NOT_READY_DELAY_S", 30, minimum=0),
            not_ready_max_delay_s=_int(env, "NOT_READY_MAX_DELAY_S", 900, minimum=0),
            health_port=_int(env, "HEALTH_PORT", 8080, minimum=0),
            log_format=log_format,  # type: ignore[arg-type]
            log_level=_log_level(env),
            aws_region=env.get("AWS_REGION") or None,
            retention_days=_retention_days(env),
            retention_interval_s=_float(env, "RETENTION_INTERVAL_S", 3600.0, minimum=1.0),
            erasure_hash_key=_erasure_hash_key(env),
            rekognition_sns_topic_arn=env.get("REKOGNITION_SNS_TOPIC_ARN") or None,
            rekognition_role_arn=env.get("REKOGNITION_ROLE_ARN") or None,
            max_rekognition_jobs=_int(env, "MAX_REKOGNITION_JOBS", 20, minimum=1),
            rekognition_start_tps=_float(env, "REKOGNITION_START_TPS", 5.0, minimum=0.01),
            submit_sweep_after_s=_float(env, "SUBMIT_SWEEP_AFTER_S", 900.0, minimum=0.1),
            submit_poll_interval_s=_float(env, "SUBMIT_POLL_INTERVAL_S", 5.0, minimum=0.05),
            submit_start_lease_s=_float(env, "SUBMIT_START_LEASE_S", 120.0, minimum=0.1),
            events_sns_topic_arn=env.get("EVENTS_SNS_TOPIC_ARN") or None,
            events_event_bus_name=env.get("EVENTS_EVENT_BUS_NAME") or None,
            events_retention_days=_float(env, "EVENTS_RETENTION_DAYS", 7.0, minimum=0.001),
            events_poll_interval_s=_float(env, "EVENTS_POLL_INTERVAL_S", 5.0, minimum=0.05),
            events_flush_timeout_s=_float(env, "EVENTS_FLUSH_TIMEOUT_S", 10.0),
        )
