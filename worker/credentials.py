"""Pause taking work while AWS refuses the deployment's credentials; resume when a probe call succeeds.

AccessDenied, expired or unrecognized credentials are the deployment's fault, not the job's: each such job
is handed back (transient) and, after CREDENTIALS_PAUSE_AFTER of them in a row, the service stops taking
messages (so the queue is not churned through to its redrive limit), reports not ready, and probes
Rekognition every CREDENTIALS_PROBE_INTERVAL_S with a call that exercises the same identity and permission.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from worker import metrics
from worker.errors import CredentialsError, PermanentJobError, WorkerError
from worker.ingest import JobOutcome
from worker.logs import get_logger
from worker.messages import Api
from worker.rekognition import Fetcher

log = get_logger(__name__)

# A well-formed JobId no job has: Rekognition answers ResourceNotFound once identity and permission pass.
PROBE_JOB_ID = "credentials-probe-00000000000000000000000000000000"
# Answers that prove the call got past authentication and authorization.
_AUTHORIZED_CODES = frozenset({"ResourceNotFoundException", "InvalidParameterException"})
# Outcomes that only happen after Rekognition answered a job's call (so the credentials worked).
_PROVEN_OUTCOMES = frozenset({"ingested", "not_ready", "failed"})

# The probe's verdict: True (credentials work), False (still refused), None (no verdict: throttled, unreachable).
Probe = Callable[[Api], Awaitable[tuple[bool | None, str]]]


def rekognition_probe(fetcher: Fetcher) -> Probe:
    """Get* with MaxResults 1 for a job that cannot exist, through the fetcher (and so the limiter)."""

    async def probe(api: Api) -> tuple[bool | None, str]:
        try:
            await fetcher.fetch_response(api, PROBE_JOB_ID, None, max_results=1)
        except CredentialsError as exc:
            return False, str(exc)[:300]
        except PermanentJobError as exc:
            if exc.code in _AUTHORIZED_CODES:
                return True, f"{api.operation} answered {exc.code}"
            return None, str(exc)[:300]
        except (WorkerError, OSError, TimeoutError) as exc:
            return None, f"{type(exc).__name__}: {exc}"[:300]
        return True, f"{api.operation} answered"

    return probe


class CredentialsGate:
    """Counts credential failures in a row; closed (paused) after ``pause_after``; a probe reopens it."""

    def __init__(self, *, pause_after: int, probe_interval_s: float, probe: Probe | None) -> None:
        self.pause_after = pause_after
        self.probe_interval_s = probe_interval_s
        self._probe = probe
        self.failures_in_row = 0
        self.last_error: str | None = None
        self._api = Api.FACE_DETECTION  # probed: the operation last refused
        self._open = asyncio.Event()
        self._open.set()
        self._prober: asyncio.Task[None] | None = None
        metrics.CREDENTIALS_PAUSED.set(0)

    @property
    def paused(self) -> bool:
        return not self._open.is_set()

    def record(self, outcome: JobOutcome) -> None:
        """Count one job's outcome: a credentials failure, or one that proves the credentials work."""
        if outcome.credentials_error:
            metrics.CREDENTIALS_FAILURES.inc()
            self.failures_in_row += 1
            self.last_error = outcome.reason
            with contextlib.suppress(ValueError):
                self._api = Api(outcome.api)
            if self.failures_in_row >= self.pause_after and not self.paused:
                self._pause()
        elif outcome.outcome in _PROVEN_OUTCOMES:
            self.failures_in_row = 0

    def _pause(self) -> None:
        self._open.clear()
        metrics.CREDENTIALS_PAUSED.set(1)
        log.warning("AWS refuses the worker's credentials: no new messages until a probe call succeeds",
                    failures_in_row=self.failures_in_row, last_error=self.last_error,
                    probe_interval_s=self.probe_interval_s)
        if self._probe is not None:
            self._prober = asyncio.create_task(self._probe_until_accepted(self._probe))

    def _resume(self, detail: str) -> None:
        self.failures_in_row = 0
        self._open.set()
        metrics.CREDENTIALS_PAUSED.set(0)
        log.info("AWS accepts the worker's credentials again: taking messages", probe=detail)

    async def _probe_until_accepted(self, probe: Probe) -> None:
        while self.paused:
            await asyncio.sleep(self.probe_interval_s)
            try:
                accepted, detail = await probe(self._api)
            except Exception as exc:  # a bug in the probe must not leave the worker paused for good
                accepted, detail = None, f"{type(exc).__name__}: {exc}"[:300]
            if accepted:
                self._resume(detail)
                return
            log.debug("credentials probe", accepted=accepted, detail=detail)
            if accepted is False:
                self.last_error = detail

    async def wait_until_open(self, stopping: asyncio.Event, timeout_s: float = 5.0) -> None:
        """Return when the gate opens, ``stopping`` is set, or after ``timeout_s`` (so the caller can beat)."""
        waits = [asyncio.create_task(self._open.wait()), asyncio.create_task(stopping.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waits:
                t.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def readiness(self) -> tuple[bool, str]:
        """The /readyz check: not ready while paused, with the reason."""
        if not self.paused:
            return True, "ok"
        return False, (f"paused: AWS refused the credentials {self.failures_in_row} times in a row; probing every "
                       f"{self.probe_interval_s:g} s; last: {self.last_error}")[:500]

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
            self._prober = None
