"""The Rekognition client and the Get* page loop.

Retries are owned here, not by botocore: botocore runs with a single attempt so that every try,
including retries of throttled calls, passes through the process's rate limiter and counts once.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import orjson
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    SSOError,
    TokenRetrievalError,
    UnauthorizedSSOTokenError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from worker import metrics
from worker.errors import (
    CredentialsError,
    InfrastructureError,
    JobNotReady,
    PaginationLoop,
    PermanentJobError,
    RestartJob,
    TransientError,
    WorkerError,
    aws_error,
    aws_message,
    aws_request_id,
    aws_status,
)
from worker.logs import get_logger
from worker.messages import Api
from worker.ratelimit import Limiter, Permit, Sleep, full_jitter_backoff_s

log = get_logger(__name__)

THROTTLE_CODES = frozenset({
    "ThrottlingException", "ProvisionedThroughputExceededException", "Throttling", "TooManyRequestsException",
    "RequestLimitExceeded", "SlowDown",
})
FAULT_CODES = frozenset({"InternalServerError", "ServiceUnavailable", "InternalFailure", "ServiceUnavailableException"})
PERMANENT_CODES = frozenset({"ResourceNotFoundException", "InvalidParameterException"})
# The deployment's identity or permissions, not the job: AccessDeniedException is modeled for both
# operations; the rest are the answers of AWS's common authentication layer.
CREDENTIAL_CODES = frozenset({
    "AccessDeniedException", "AccessDenied", "ExpiredTokenException", "ExpiredToken",
    "UnrecognizedClientException", "InvalidClientTokenId", "InvalidSignatureException", "SignatureDoesNotMatch",
    "IncompleteSignature", "MissingAuthenticationToken", "MissingAuthenticationTokenException",
    "NotAuthorized", "AuthFailure",
})
# Raised by botocore while it resolves or refreshes credentials, before any request is sent.
_CREDENTIAL_EXCEPTIONS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError,
                          TokenRetrievalError, SSOError, UnauthorizedSSOTokenError)
RESTART_CODES = frozenset({"InvalidPaginationTokenException"})
_OPERATIONS = ("GetFaceDetection", "GetFaceSearch")
RAW_BODY = "_raw_body"


def _raw_body_before_parse(operation_model: Any, response_dict: dict[str, Any],
                           customized_response_dict: dict[str, Any], **_: Any) -> None:
    """Keep successful Get* bodies as bytes and hand botocore an empty document to walk.

    botocore's shape-walking parser costs ~9x orjson on a 1000-face page; the caller decodes the
    bytes with orjson (on another core, see worker/pagecodec.py). Errors still go through botocore,
    so ``__type`` parsing and modeled exceptions are unchanged.
    """
    if response_dict.get("status_code", 500) >= 300:
        return
    body = response_dict.get("body")
    if not body:
        return
    customized_response_dict[RAW_BODY] = body
    response_dict["body"] = b"{}"


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))


@asynccontextmanager
async def create_client(*, region: str | None = None, max_pool_connections: int = 50,
                        read_timeout_s: float = 60.0) -> AsyncIterator[Any]:
    """One aiobotocore Rekognition client for the process.

    Region, endpoint (``AWS_ENDPOINT_URL_REKOGNITION``) and credentials are resolved by botocore.
    """
    session = get_session()
    config = AioConfig(
        # One attempt: this module retries, through the limiter (see module docstring).
        retries={"mode": "standard", "total_max_attempts": 1},
        max_pool_connections=max_pool_connections,
        connect_timeout=10,
        read_timeout=read_timeout_s,
    )
    async with session.create_client("rekognition", region_name=region, config=config) as client:
        for op in _OPERATIONS:
            client.meta.events.register(f"before-parse.rekognition.{op}", _raw_body_before_parse)
        yield client


_CALL_ERRORS = (ClientError, NoCredentialsError, BotoConnectionError, HTTPClientError, aiohttp.ClientError,
                TimeoutError, BotoCoreError)


@dataclass(slots=True)
class _Tries:
    """Failed tries of one page so far, by kind: throttling is allowed many more than faults."""

    throttles: int = 0
    faults: int = 0


@dataclass(frozen=True, slots=True)
class Page:
    """One decoded result page and the bytes it came from (for the raw archive)."""

    number: int
    body: dict[str, Any]
    raw: bytes | None


T = TypeVar("T")
# Turns a page's raw bytes (and its number) into the caller's item, its JobStatus and its NextToken.
Decode = Callable[[bytes, int], Awaitable[tuple[T, str | None, str | None]]]


def raw_body(response: dict[str, Any]) -> bytes:
    """The undecoded body of a Get* response (re-encoded only if the hook did not see one)."""
    raw = response.get(RAW_BODY)
    if isinstance(raw, bytes):
        return raw
    return orjson.dumps({k: v for k, v in response.items() if k != "ResponseMetadata"})


async def _decode_in_process(raw: bytes, number: int) -> tuple[Page, str | None, str | None]:
    body = orjson.loads(raw)
    return Page(number=number, body=body, raw=raw), body.get("JobStatus"), body.get("NextToken")


class Fetcher:
    """Fetches result pages through the limiter, retrying throttling and faults with backoff."""

    def __init__(self, client: Any, limiter: Limiter, *, page_size: int = 1000, max_attempts: int = 8,
                 retry_base_s: float = 0.25, retry_cap_s: float = 20.0, sleep: Sleep = asyncio.sleep,
                 rng: random.Random | None = None, max_pages: int = 100_000) -> None:
        self._client = client
        self.limiter = limiter
        self.page_size = page_size
        self.max_pages = max_pages
        self.max_attempts = max_attempts
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        self._sleep = sleep
        self._rng = rng or random.Random()

    async def _request(self, api: Api, job_id: str, token: str | None,
                       max_results: int | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"JobId": job_id, "MaxResults": max_results or self.page_size}
        if token:
            params["NextToken"] = token
        if api is Api.FACE_SEARCH:
            params["SortBy"] = "TIMESTAMP"
        method = self._client.get_face_detection if api is Api.FACE_DETECTION else self._client.get_face_search
        return await method(**params)

    async def fetch(self, api: Api, job_id: str, token: str | None) -> dict[str, Any]:
        """One page, decoded; see :meth:`fetch_response` for retries and errors."""
        response = await self.fetch_response(api, job_id, token)
        return orjson.loads(raw_body(response))

    async def fetch_response(self, api: Api, job_id: str, token: str | None, *,
                             max_results: int | None = None) -> dict[str, Any]:
        """One page's response with its body undecoded under ``RAW_BODY``, retried with full-jitter
        backoff; raises the error type that decides the job's fate."""
        tries = _Tries()
        while True:
            # Every attempt, first or retry, takes a slot from the limiter: retries never bypass it.
            waiting_since = time.monotonic()
            async with self.limiter as permit:
                sent_at = time.monotonic()
                metrics.LIMITER_WAIT_SECONDS.observe(sent_at - waiting_since)
                try:
                    response = await self._request(api, job_id, token, max_results)
                except _CALL_ERRORS as exc:
                    failure: BaseException | None = exc
                else:
                    failure = None
                metrics.CALL_SECONDS.labels(api.operation).observe(time.monotonic() - sent_at)
            if failure is None:
                metrics.CALLS.labels(api.operation, "ok").inc()
                self.limiter.record_success(permit)
                return response
            try:
                delay_s = await self._retry_delay_s(api.operation, failure, permit, tries)
            except WorkerError:
                # The error that ends this page's tries: with the request id AWS Support asks for.
                log.warning("rekognition call failed", operation=api.operation, **aws_error(failure))
                raise
            await self._sleep(delay_s)

    async def _retry_delay_s(self, op: str, failure: BaseException, permit: Permit, tries: _Tries) -> float:
        """How long to wait before retrying ``failure``, or raise the error that ends the page's tries."""
        if isinstance(failure, _CREDENTIAL_EXCEPTIONS):
            metrics.CALLS.labels(op, "credentials_error").inc()
            raise CredentialsError(f"{op}: AWS credentials unavailable: {type(failure).__name__}: "
                                   f"{str(failure)[:300]}") from failure
        if not isinstance(failure, ClientError):
            metrics.CALLS.labels(op, "connection_error").inc()
            tries.faults += 1
            if tries.faults >= self.max_attempts:
                raise InfrastructureError(f"{op} unreachable after {tries.faults} tries: {failure}") from failure
            return self._backoff(tries.faults - 1)
        code = error_code(failure)
        status = aws_status(failure)
        message = aws_message(failure)
        if (rid := aws_request_id(failure)) is not None:
            message = f"{message} (request id {rid})"
        if code in THROTTLE_CODES:
            metrics.CALLS.labels(op, "throttled").inc()
            await self.limiter.record_throttle(permit)
            tries.throttles += 1
            # Throttling is the limiter's signal, not the job's failure: retry longer.
            if tries.throttles >= self.max_attempts * 4:
                raise InfrastructureError(f"{op} still throttled after {tries.throttles} tries") from failure
            return self._backoff(tries.throttles - 1)
        if code in RESTART_CODES:
            metrics.CALLS.labels(op, "invalid_token").inc()
            raise RestartJob(f"{op}: {code}: {message}") from failure
        if code in CREDENTIAL_CODES:
            metrics.CALLS.labels(op, "credentials_error").inc()
            raise CredentialsError(f"{op} answered {code} (HTTP {status}): {message}") from failure
        if code in PERMANENT_CODES:
            metrics.CALLS.labels(op, "permanent_error").inc()
            raise PermanentJobError(f"{op} answered {code}: {message}", code=code) from failure
        metrics.CALLS.labels(op, "fault").inc()
        if code not in FAULT_CODES and status < 500:
            # An error this version does not know: retried later, and counted toward
            # MAX_IDENTICAL_FAILURES, so one that answers the same every time ends the job.
            raise TransientError(f"{op} answered {code} (HTTP {status}): {message}") from failure
        tries.faults += 1
        if tries.faults >= self.max_attempts:
            raise InfrastructureError(f"{op} failed {tries.faults} times, last {code}: {message}") from failure
        return self._backoff(tries.faults - 1)

    def _backoff(self, attempt: int) -> float:
        return full_jitter_backoff_s(attempt, base_s=self.retry_base_s, cap_s=self.retry_cap_s, rng=self._rng)

    async def which_api(self, job_id: str) -> Api | None:
        """The face API that knows ``job_id`` (a one-result probe of each), or None if neither does."""
        for api in (Api.FACE_DETECTION, Api.FACE_SEARCH):
            try:
                await self.fetch_response(api, job_id, None, max_results=1)
            except PermanentJobError as exc:
                if exc.code in ("ResourceNotFoundException", "InvalidParameterException"):
                    continue
                raise
            return api
        return None

    def pages(self, api: Api, job_id: str) -> AsyncGenerator[Page]:
        """All pages of a job, chained by NextToken, decoded here. The first page decides readiness."""
        return self.decoded_pages(api, job_id, _decode_in_process)

    async def decoded_pages(self, api: Api, job_id: str, decode: Decode[T]) -> AsyncGenerator[T]:
        """All pages of a job as ``decode`` makes them, chained by NextToken.

        Decoding is the caller's so that it can happen off the event loop; the next page is
        requested only after ``decode`` has found its NextToken. IN_PROGRESS on any page raises
        JobNotReady; a NextToken seen before in this job (A, B, A: not only back to back) or more
        than ``max_pages`` pages raise PaginationLoop after the page that showed it was yielded.
        """
        token: str | None = None
        # 16-byte digests: a 20,000-page job remembers ~1 MB, not 20,000 tokens of up to 255 characters.
        seen: set[bytes] = set()
        number = 0
        while True:
            response = await self.fetch_response(api, job_id, token)
            item, status, next_token = await decode(raw_body(response), number)
            del response
            if status == "IN_PROGRESS":
                # On a later page too: the job is not readable as a whole yet, so try it again later.
                raise JobNotReady(f"job {job_id} is still IN_PROGRESS" + (f" (page {number + 1})" if number else ""))
            metrics.PAGES.labels(api.value).inc()
            yield item
            # A status this version does not know is followed as long as it carries a NextToken.
            if not next_token or status == "FAILED":
                return
            digest = hashlib.blake2b(str(next_token).encode(), digest_size=16).digest()
            if digest in seen:
                raise PaginationLoop(f"{api.operation} returned a NextToken already seen in this job "
                                     f"(after page {number + 1})")
            if number + 1 >= self.max_pages:
                raise PaginationLoop(f"{api.operation} still had a NextToken after {number + 1} pages "
                                     f"(MAX_PAGES_PER_JOB={self.max_pages})")
            seen.add(digest)
            token = next_token
            number += 1


# For other callers of the same client (the Start* calls of worker/scheduler.py): what a call can raise,
# and which of those are about credentials rather than the request.
CALL_ERRORS = _CALL_ERRORS
CREDENTIAL_EXCEPTIONS = _CREDENTIAL_EXCEPTIONS
