"""The few exception types that decide what happens to a job: retry later, or give up and record why."""

from __future__ import annotations


class WorkerError(Exception):
    """Base class of the worker's own errors."""


class ConfigError(WorkerError):
    """Settings are missing or invalid; the process cannot start."""


class InvalidInput(WorkerError):
    """Input that can never succeed: a bad JobId, an unknown API name, an unreadable message."""


class JobNotReady(WorkerError):
    """Rekognition still reports the job IN_PROGRESS: try again later, nothing was stored."""


class TransientError(WorkerError):
    """Worth retrying later (throttling, service faults, database unreachable). Nothing was stored."""


class PermanentJobError(WorkerError):
    """The job can never be ingested (no such job, access denied, malformed results).

    The job is recorded as failed with ``reason``; retrying would not help.
    """

    def __init__(self, reason: str, *, code: str = "Error") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class MalformedPage(PermanentJobError):
    """A result page violates the response model (missing Timestamp, wrong types, unknown enum)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, code="MalformedPage")


class RestartJob(WorkerError):
    """The pagination token was rejected: fetch the job again from its first page."""
