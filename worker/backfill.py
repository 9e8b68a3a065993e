"""The `backfill` command: ingest named jobs directly, with progress and a closing summary."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from worker.config import Settings
from worker.errors import InvalidInput, PermanentJobError, TransientError
from worker.ingest import JobOutcome
from worker.logs import get_logger
from worker.messages import Api, ApiMissing, JobRef, parse_api, parse_backfill_line, validate_job_id
from worker.runtime import Runtime, open_runtime

log = get_logger(__name__)

# Outcomes worth another try within the same run before giving up on the job.
_RETRY_OUTCOMES = ("busy", "transient")
RETRY_ROUNDS = 3
RETRY_DELAY_S = 2.0


@dataclass
class BackfillInput:
    """What the command line names: jobs with an API, jobs without one, and the invalid lines."""

    refs: list[JobRef] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)  # JobIds whose API Rekognition is asked for
    errors: list[JobOutcome] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)

    def add(self, job_id: str, api: Api | None) -> None:
        if job_id in self._seen:  # the same job twice in one run is one ingest
            return
        self._seen.add(job_id)
        if api is None:
            self.unresolved.append(job_id)
        else:
            self.refs.append(JobRef(job_id=job_id, api=api))


def refs_from_args(api_name: str | None, job_ids: Sequence[str], from_file: str | None) -> BackfillInput:
    """Valid jobs in order; each invalid one becomes an ``invalid`` outcome naming the job."""
    default_api = parse_api(api_name) if api_name is not None else None  # a bad --api fails the command
    found = BackfillInput()
    for job_id in job_ids:
        try:
            found.add(validate_job_id(job_id), default_api)
        except InvalidInput as exc:
            found.errors.append(JobOutcome(job_id[:64], str(default_api or "?"), "invalid", reason=str(exc)))
    for n, line in enumerate(_read_lines(from_file) if from_file is not None else (), start=1):
        try:
            ref = parse_backfill_line(line, default_api)
        except ApiMissing as exc:
            found.add(exc.job_id, None)
        except InvalidInput as exc:
            found.errors.append(JobOutcome(line.strip()[:64], "?", "invalid", reason=f"{from_file}:{n}: {exc}"))
        else:
            if ref is not None:
                found.add(ref.job_id, ref.api)
    return found


def _read_lines(path: str) -> Iterable[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{path} is not UTF-8 text") from None


async def _resolve(rt: Runtime, job_ids: Sequence[str]) -> tuple[list[JobRef], list[JobOutcome]]:
    refs: list[JobRef] = []
    unknown: list[JobOutcome] = []
    for job_id in job_ids:
        try:
            api = await rt.fetcher.which_api(job_id)
        except PermanentJobError as exc:
            unknown.append(JobOutcome(job_id, "?", "failed", reason=f"could not tell its API: {exc}"))
            continue
        except TransientError as exc:  # credentials refused, Rekognition unreachable: not the job's failure
            unknown.append(JobOutcome(job_id, "?", "transient", reason=f"could not tell its API: {exc}"))
            continue
        if api is None:
            unknown.append(JobOutcome(job_id, "?", "failed",
                                      reason="neither GetFaceDetection nor GetFaceSearch knows this JobId"))
        else:
            refs.append(JobRef(job_id=job_id, api=api))
    return refs, unknown


async def run_backfill(settings: Settings, refs: list[JobRef], *, console: Console,
                       unresolved: Sequence[str] = ()) -> list[JobOutcome]:
    outcomes: dict[str, JobOutcome] = {}
    show_progress = console.is_terminal
    async with open_runtime(settings) as rt:
        resolved, unknown = await _resolve(rt, unresolved)
        refs = [*refs, *resolved]
        outcomes.update((o.job_id, o) for o in unknown)
        pending = list(refs)
        with Progress(TextColumn("[bold]backfill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.description}"), console=console, disable=not show_progress,
                      transient=False) as progress:
            task = progress.add_task("", total=len(refs))

            def done(o: JobOutcome) -> None:
                if o.outcome not in _RETRY_OUTCOMES:
                    progress.advance(task)
                progress.update(task, description=f"{o.job_id}: {o.outcome}")

            for round_no in range(RETRY_ROUNDS):
                results = await rt.ingestor.ingest_many(pending, concurrency=settings.max_concurrent_jobs,
                                                        on_done=done)
                for o in results:
                    outcomes[o.job_id] = o
                pending = [r for r, o in zip(pending, results, strict=True) if o.outcome in _RETRY_OUTCOMES]
                if not pending or round_no == RETRY_ROUNDS - 1:
                    break
                log.info("retrying jobs after a transient problem", jobs=len(pending), delay_s=RETRY_DELAY_S)
                await asyncio.sleep(RETRY_DELAY_S * (round_no + 1))
            progress.update(task, completed=len(refs))
    return [*(outcomes[r.job_id] for r in refs), *unknown]
