"""The few exception types that decide what happens to a job: retry later, or give up and record why."""

from __future__ import annotations

from typing import Any


class WorkerError(Exception):
    """Base class of the worker's own errors."""


class ConfigError(WorkerError):
    """Settings are missing or invalid; the process cannot start."""


class InvalidInput(WorkerError):
    """Input that can never succeed: a bad JobId, an unknown API name, an unreadable message."""


class NotFound(WorkerError):
    """What a command was asked about does not exist: a job, a submission, a DLQ message, an identity."""


class Unavailable(WorkerError):
    """A dependency (the database, AWS) cannot be reached or refuses the command: try again later."""


class JobNotReady(WorkerError):
    """Rekognition still reports the job IN_PROGRESS: try again later, nothing was stored."""


class TransientError(WorkerError):
    """Worth retrying later. Nothing was stored.

    A plain TransientError is a problem of this job that may go away (a pagination token rejected on
    every restart, a page that crashes the decoding process, a stall): the same one on
    MAX_IDENTICAL_FAILURES attempts in a row records the job failed.
    """


class InfrastructureError(TransientError):
    """An outage of something every job depends on: the database, the network, Rekognition's throttling
    or faults. Never the job's fault, so it is retried until the results would expire."""


class CredentialsError(InfrastructureError):
    """AWS refused the deployment's identity (AccessDenied, expired or unrecognized credentials, no
    credentials at all). A property of the deploy, not of the job: the service pauses taking work."""


class ErasureKeyMissing(InfrastructureError):
    """Identities have been erased but ERASURE_HASH_KEY is not set, so a job's rows cannot be checked against
    them: the job is not made visible (nothing erased comes back) and is retried once the key is configured.
    A property of the deploy, not of the job, so it never fails the job."""


class JobStalled(TransientError):
    """No page fetched or written for JOB_STALL_TIMEOUT_S: the job was cancelled and handed back."""


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


class PaginationLoop(PermanentJobError):
    """NextToken repeated within one job, or more than MAX_PAGES_PER_JOB pages."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, code="PaginationLoop")


class RestartJob(WorkerError):
    """The pagination token was rejected: fetch the job again from its first page."""


def aws_request_id(exc: BaseException) -> str | None:
    """The request id AWS gave a failed call (what AWS Support asks for), when it answered at all."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    meta = response.get("ResponseMetadata") or {}
    headers = meta.get("HTTPHeaders") or {}
    rid = meta.get("RequestId") or headers.get("x-amzn-requestid") or headers.get("x-amz-request-id")
    return str(rid) if rid else None


def aws_status(exc: BaseException) -> int:
    """The HTTP status of a failed AWS call's answer (0 when there was none)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return 0
    return int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", 0) or 0)


def aws_message(exc: BaseException, limit: int = 500) -> str:
    """AWS's own message of a failed call's answer ("" when there was none)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    return str((response.get("Error") or {}).get("Message", "") or "")[:limit]


def aws_error(exc: BaseException, limit: int = 300) -> dict[str, Any]:
    """Log fields for a failed AWS call: the error text, and the AWS error code and request id if any."""
    fields: dict[str, Any] = {"error": str(exc)[:limit]}
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and (code := (response.get("Error") or {}).get("Code")):
        fields["aws_error_code"] = str(code)
    if (rid := aws_request_id(exc)) is not None:
        fields["aws_request_id"] = rid
    return fields
