"""The `report` command: one job, readable on a terminal, as JSON, or as a timeline chart."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

from worker.config import Settings
from worker.errors import InvalidInput
from worker.messages import validate_job_id

TOP_PERSONS = 15


async def load_report(conn: asyncpg.Connection, job_id: str) -> dict[str, Any] | None:
    """Everything the report shows, from the reporting views."""
    job = await conn.fetchrow("SELECT * FROM reporting.job_summary WHERE job_id = $1", job_id)
    if job is None:
        return None
    persons = await conn.fetch(
        """
        SELECT a.person_index, a.first_seen_ms, a.last_seen_ms, a.detections, a.span_ms,
               (SELECT i.external_image_id FROM reporting.person_identities i
                 WHERE i.job_id = a.job_id AND i.person_index = a.person_index
                 ORDER BY i.matches DESC, i.max_similarity DESC LIMIT 1) AS identity
        FROM reporting.person_appearances a WHERE a.job_id = $1
        ORDER BY a.detections DESC, a.person_index
        """,
        job_id,
    )
    sightings = await conn.fetch(
        "SELECT face_id, external_image_id, first_seen_ms, last_seen_ms, matches, max_similarity, persons "
        "FROM reporting.collection_face_sightings WHERE job_id = $1 ORDER BY matches DESC, face_id",
        job_id,
    )
    return {
        "job": _plain(job),
        "persons": [_plain(p) for p in persons],
        "collection_faces": [_plain(s) for s in sightings],
    }


async def load_timeline(conn: asyncpg.Connection, job_id: str) -> list[tuple[int | None, int, int]]:
    """(person_index, second, detections) rows for the chart."""
    rows = await conn.fetch(
        "SELECT person_index, second, detections FROM reporting.person_seconds WHERE job_id = $1 "
        "ORDER BY person_index NULLS FIRST, second",
        job_id,
    )
    return [(r["person_index"], int(r["second"]), int(r["detections"])) for r in rows]


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in dict(row).items()}


def _ms(value: int | None) -> str:
    if value is None:
        return "-"
    seconds, ms = divmod(int(value), 1000)
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}:{seconds:02d}.{ms:03d}"


def render_text(report: Mapping[str, Any], console: Console) -> None:
    job = report["job"]
    head = Table(title=f"job {job['job_id']}", show_header=False)
    head.add_column("field", style="bold")
    head.add_column("value")
    video = f"s3://{job['video_bucket']}/{job['video_name']}" if job.get("video_bucket") else "-"
    for label, value in (
        ("api", job["api"]), ("job status", job["job_status"]), ("ingest state", job["ingest_state"]),
        ("failure", job.get("failure_reason") or job.get("status_message") or "-"),
        ("video", video), ("duration", _ms(job.get("duration_ms"))),
        ("frame", f"{job.get('frame_width')}x{job.get('frame_height')} @ {job.get('frame_rate')} fps"),
        ("pages", job["pages"]), ("faces", job["faces"]), ("persons", job["persons"]),
        ("collection matches", job["collection_matches"]), ("ingested at", job.get("ingested_at") or "-"),
    ):
        head.add_row(label, str(value))
    console.print(head)
    if report["persons"]:
        t = Table(title=f"top persons by screen time (of {len(report['persons'])})")
        for col in ("person", "identity", "first seen", "last seen", "detections"):
            t.add_column(col, justify="right" if col == "detections" else "left")
        for p in report["persons"][:TOP_PERSONS]:
            t.add_row(str(p["person_index"]), p["identity"] or "-", _ms(p["first_seen_ms"]),
                      _ms(p["last_seen_ms"]), str(p["detections"]))
        console.print(t)
    if report["collection_faces"]:
        t = Table(title="collection faces seen")
        for col in ("external image id", "face id", "first seen", "last seen", "matches", "max similarity"):
            t.add_column(col)
        for s in report["collection_faces"]:
            t.add_row(s["external_image_id"] or "-", s["face_id"], _ms(s["first_seen_ms"]), _ms(s["last_seen_ms"]),
                      str(s["matches"]), f"{s['max_similarity']:.2f}" if s["max_similarity"] is not None else "-")
        console.print(t)


def render_chart(report: Mapping[str, Any], timeline: Sequence[tuple[int | None, int, int]], path: str) -> None:
    """One lane per person (or one for all faces of a detection job), a bar for each second seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    job = report["job"]
    labels = {p["person_index"]: p["identity"] for p in report["persons"]}
    lanes = sorted({p for p, _, _ in timeline}, key=lambda v: (v is not None, v if v is not None else -1))
    height = max(2.5, 0.45 * len(lanes) + 1.5)
    fig, ax = plt.subplots(figsize=(12, height))
    cmap = plt.get_cmap("tab20")
    for lane_no, person in enumerate(lanes):
        seconds = [(s, 1) for p, s, _ in timeline if p == person]
        ax.broken_barh(seconds, (lane_no - 0.4, 0.8), color=cmap(lane_no % 20))
    names = []
    for person in lanes:
        if person is None:
            names.append("all faces")
        else:
            ident = labels.get(person)
            names.append(f"person {person}" + (f" ({ident})" if ident else ""))
    ax.set_yticks(range(len(lanes)), names)
    duration_s = (job.get("duration_ms") or 0) / 1000
    ax.set_xlim(0, max(duration_s, max((s + 1 for _, s, _ in timeline), default=1)))
    ax.set_xlabel("video time (s)")
    ax.set_title(f"{job['api']} {job['job_id']}: who is on screen when")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def run_report(settings: Settings, job_id: str, *, fmt: str, chart: str | None, console: Console) -> int:
    validate_job_id(job_id)
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        report = await load_report(conn, job_id)
        if report is None:
            raise InvalidInput(f"job {job_id} has not been ingested (no such job in the database)")
        timeline = await load_timeline(conn, job_id) if chart else []
    finally:
        await conn.close()
    if fmt == "json":
        print(json.dumps(report, indent=2, default=str))
    else:
        render_text(report, console)
    if chart:
        render_chart(report, timeline, chart)
        if fmt != "json":
            console.print(f"timeline written to {chart}")
    return 0
