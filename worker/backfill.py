"""The `backfill` command: ingest named jobs directly, with progress and a closing summary."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker.config import Settings
from worker.errors import InvalidInput
from worker.ingest import JobOutcome
from worker.logs import get_logger, redact
from worker.messages import Api, JobRef, parse_api, parse_backfill_line, validate_job_id
from worker.runtime import open_runtime

log = get_logger(__name__)

# Outcomes worth another try within the same run before giving up on the job.
_RETRY_OUTCOMES = ("busy", "transient")
RETRY_ROUNDS = 3
RETRY_DELAY_S = 2.0


def refs_from_args(api_name: str | None, job_ids: Sequence[str], from_file: str | None,
                   errors: list[JobOutcome]) -> list[JobRef]:
    """Valid refs in order; each invalid one becomes an ``invalid`` outcome naming the job."""
    default_api: Api | None = None
    if api_name is not None:
        default_api = parse_api(api_name)  # a bad --api fails the whole command: nothing could run
    refs: list[JobRef] = []
    seen: set[str] = set()

    def add(ref: JobRef) -> None:
        if ref.job_id not in seen:  # the same job twice in one run is one ingest
            seen.add(ref.job_id)
            refs.append(ref)

    for job_id in job_ids:
        try:
            if default_api is None:
                raise InvalidInput("no API given: pass --api")
            add(JobRef(job_id=validate_job_id(job_id), api=default_api))
        except InvalidInput as exc:
            errors.append(JobOutcome(job_id[:64], str(default_api or "?"), "invalid", reason=str(exc)))
    if from_file is not None:
        for n, line in enumerate(_read_lines(from_file), start=1):
            try:
                ref = parse_backfill_line(line, default_api)
            except InvalidInput as exc:
                errors.append(JobOutcome(line.strip()[:64], "?", "invalid", reason=f"{from_file}:{n}: {exc}"))
                continue
            if ref is not None:
                add(ref)
    return refs


def _read_lines(path: str) -> Iterable[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{path} is not UTF-8 text") from None


async def run_backfill(settings: Settings, refs: list[JobRef], *, console: Console) -> list[JobOutcome]:
    outcomes: dict[str, JobOutcome] = {}
    show_progress = console.is_terminal
    async with open_runtime(settings) as rt:
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
    return [outcomes[r.job_id] for r in refs]


def summary_table(outcomes: Sequence[JobOutcome]) -> Table:
    table = Table(title="backfill summary")
    for col in ("job", "api", "status", "pages", "faces", "persons", "matches", "seconds", "reason"):
        table.add_column(col, justify="right" if col in ("pages", "faces", "persons", "matches", "seconds") else "left")
    for o in outcomes:
        style = "green" if o.ok else "red"
        table.add_row(o.job_id, o.api, f"[{style}]{o.outcome}[/]", str(o.pages), str(o.faces), str(o.persons),
                      str(o.matches), f"{o.seconds:.2f}", redact(o.reason or "")[:120])
    return table
