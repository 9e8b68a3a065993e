"""The `report` command: one job, readable on a terminal, as JSON, or as a timeline chart.

Everything is read from the reporting views (schema `reporting`), so the report shows exactly what
SQL users see: completely ingested jobs only, and the previous complete ingest while a re-ingest
is in flight. Face detection results carry no person identity, so a detection job's timeline has
one lane ("any face on screen") above a plot of how many faces each sampled frame held, rather
than lanes invented by a tracker.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

from worker.config import Settings
from worker.db.engine import connect
from worker.errors import InvalidInput, NotFound
from worker.messages import validate_job_id

TOP_PERSONS = 15
CHART_LANES = 30
# A person is "still on screen" across a gap of this many sampling intervals: bridges one missed
# sample without merging a real exit and re-entry.
GAP_SAMPLES = 3
MIN_GAP_MS = 1000
_TICK_STEPS_MS = (250, 500, 1000, 2000, 5000, 10_000, 15_000, 30_000, 60_000, 120_000, 300_000, 600_000, 900_000,
                  1_800_000, 3_600_000, 7_200_000)

_PERSONS_SQL = """
SELECT a.person_index, a.first_seen_ms, a.last_seen_ms, a.detections, a.span_ms, a.seconds_present,
       i.face_id, i.external_image_id, i.max_similarity AS similarity, i.matches AS identity_matches
FROM reporting.person_appearances a
LEFT JOIN reporting.person_identities i
       ON i.job_id = a.job_id AND i.person_index = a.person_index AND i.match_rank = 1
WHERE a.job_id = $1
ORDER BY a.seconds_present DESC, a.detections DESC, a.person_index
"""
_SIGHTINGS_SQL = """
SELECT face_id, external_image_id, image_id, user_id, first_seen_ms, last_seen_ms, matches, max_similarity, persons
FROM reporting.collection_face_sightings WHERE job_id = $1
ORDER BY matches DESC, max_similarity DESC, face_id
"""
_PRESENCE_SQL = """
SELECT (SELECT count(DISTINCT second) FROM reporting.person_seconds WHERE job_id = $1) AS seconds_with_faces,
       (SELECT max(n) FROM (SELECT count(*) AS n FROM reporting.face_observations
                            WHERE job_id = $1 GROUP BY timestamp_ms) per_frame) AS max_faces_at_once,
       (SELECT count(DISTINCT timestamp_ms) FROM reporting.face_observations WHERE job_id = $1) AS sampled_frames,
       (SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY step_ms)
          FROM (SELECT t - lag(t) OVER (ORDER BY t) AS step_ms
                  FROM (SELECT DISTINCT timestamp_ms AS t FROM reporting.face_observations WHERE job_id = $1) ts
               ) steps
         WHERE step_ms > 0) AS sample_interval_ms
"""


@dataclass(slots=True)
class Timeline:
    """What the chart draws: on-screen segments per person and faces per sampled frame."""

    max_gap_ms: int
    segments: list[tuple[int | None, int, int, int]] = field(default_factory=list)
    frames: list[tuple[int, int]] = field(default_factory=list)


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in dict(row).items()}


async def load_report(conn: asyncpg.Connection, job_id: str) -> dict[str, Any] | None:
    """Everything the report shows, from the reporting views; None when the job is not there."""
    job = await conn.fetchrow("SELECT * FROM reporting.job_summary WHERE job_id = $1", job_id)
    if job is None:
        return None
    persons = await conn.fetch(_PERSONS_SQL, job_id)
    sightings = await conn.fetch(_SIGHTINGS_SQL, job_id)
    presence = await conn.fetchrow(_PRESENCE_SQL, job_id)
    return {
        "job": _plain(job),
        "presence": _plain(presence) if presence is not None else {},
        "persons": [_plain(p) for p in persons],
        "collection_faces": [_plain(s) for s in sightings],
    }


def gap_for(report: Mapping[str, Any]) -> int:
    """The largest pause (ms) that still counts as one continuous appearance for this job."""
    step = report.get("presence", {}).get("sample_interval_ms")
    return max(MIN_GAP_MS, GAP_SAMPLES * int(step)) if step else MIN_GAP_MS


async def load_timeline(conn: asyncpg.Connection, job_id: str, max_gap_ms: int = MIN_GAP_MS) -> Timeline:
    segments = await conn.fetch(
        "SELECT person_index, start_ms, end_ms, detections FROM reporting.person_segments($1, $2)", job_id, max_gap_ms
    )
    frames = await conn.fetch(
        "SELECT timestamp_ms, count(*) AS faces FROM reporting.face_observations WHERE job_id = $1 "
        "GROUP BY timestamp_ms ORDER BY timestamp_ms",
        job_id,
    )
    return Timeline(
        max_gap_ms=max_gap_ms,
        segments=[(r["person_index"], int(r["start_ms"]), int(r["end_ms"]), int(r["detections"])) for r in segments],
        frames=[(int(r["timestamp_ms"]), int(r["faces"])) for r in frames],
    )


def _ms(value: int | None) -> str:
    if value is None:
        return "-"
    seconds, ms = divmod(int(value), 1000)
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}:{seconds:02d}.{ms:03d}"


def _pct(value: float | None) -> str:
    # Truncated, not rounded: a 99.97 % match must not read as a certain 100.0 %.
    return "-" if value is None else f"{math.floor(value * 10) / 10:.1f}%"


def _identity(person: Mapping[str, Any]) -> str:
    if person.get("face_id") is None:
        return "no collection match"
    return str(person.get("external_image_id") or person["face_id"])


def _pairs_table(title: str, rows: Sequence[tuple[str, object]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for label, value in rows:
        table.add_row(label, "-" if value is None or value == "" else str(value))
    return table


def render_text(report: Mapping[str, Any], console: Console) -> None:
    job, presence = report["job"], report.get("presence", {})
    failure = None
    if job.get("failure_code"):
        failure = f"{job['failure_code']}: {job.get('failure_reason') or ''}".strip()
        if job["ingest_state"] == "ingested":
            failure = f"last re-ingest failed ({failure}); showing the previous complete ingest"
    console.print(_pairs_table(f"job {job['job_id']}", [
        ("api", job["api"]), ("job status", job["job_status"]), ("ingest state", job["ingest_state"]),
        ("failure", failure), ("status message", job.get("status_message")), ("job tag", job.get("job_tag")),
        ("ingested at", job.get("ingested_at")), ("attempts", job.get("attempts")),
    ]))
    frame = None
    if job.get("frame_width"):
        rate = f" @ {job['frame_rate']:.3f} fps" if job.get("frame_rate") else ""
        frame = f"{job['frame_width']}x{job['frame_height']}{rate}"
    console.print(_pairs_table("video", [
        ("location", job.get("video_uri")), ("version", job.get("video_version")),
        ("duration", _ms(job.get("duration_ms"))), ("format", job.get("video_format")),
        ("codec", job.get("video_codec")), ("frame", frame), ("color range", job.get("color_range")),
    ]))
    search = job["api"] == "FACE_SEARCH"
    console.print(_pairs_table("counts", [
        ("result pages", job["pages"]), (f"faces (elements of {'Persons' if search else 'Faces'})", job["faces"]),
        ("distinct persons", job["persons"] if search else "0 (face detection has no person index)"),
        ("collection matches", job["collection_matches"]),
        ("distinct collection faces", job["distinct_collection_faces"]),
        ("seconds with a face on screen", presence.get("seconds_with_faces")),
        ("most faces in one frame", presence.get("max_faces_at_once")),
        ("sampling interval", f"{presence['sample_interval_ms']} ms" if presence.get("sample_interval_ms") else None),
    ]))
    persons = report["persons"]
    if persons:
        shown = min(TOP_PERSONS, len(persons))
        t = Table(title=f"top {shown} of {len(persons)} persons by screen time", title_justify="left")
        for col in ("person", "identity", "similarity", "screen time", "first seen", "last seen", "detections"):
            t.add_column(col, justify="right" if col in ("similarity", "screen time", "detections") else "left")
        for p in persons[:TOP_PERSONS]:
            t.add_row(str(p["person_index"]), _identity(p), _pct(p["similarity"]), f"{p['seconds_present']} s",
                      _ms(p["first_seen_ms"]), _ms(p["last_seen_ms"]), str(p["detections"]))
        console.print(t)
    if report["collection_faces"]:
        t = Table(title="collection faces seen", title_justify="left")
        for col in ("external image id", "face id", "first seen", "last seen", "matches", "persons", "max similarity"):
            t.add_column(col, justify="right" if col in ("matches", "persons", "max similarity") else "left")
        for s in report["collection_faces"]:
            t.add_row(s["external_image_id"] or "-", s["face_id"], _ms(s["first_seen_ms"]), _ms(s["last_seen_ms"]),
                      str(s["matches"]), str(s["persons"]), _pct(s["max_similarity"]))
        console.print(t)


def _lane_label(person: Mapping[str, Any]) -> str:
    if person.get("face_id") is None:
        return f"person {person['person_index']} · no match"
    return f"person {person['person_index']} · {_identity(person)} ({_pct(person.get('similarity'))})"


def render_chart(report: Mapping[str, Any], timeline: Timeline, path: str) -> None:
    """Write a PNG timeline: one lane per person (search) or faces on screen (detection)."""
    try:
        import matplotlib
    except ImportError:  # charts are an extra: the production image does not carry matplotlib
        raise InvalidInput("--chart needs matplotlib: pip install 'rekognition-ingest-worker[charts]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    job = report["job"]
    search = job["api"] == "FACE_SEARCH"
    end_ms = max([job.get("duration_ms") or 0] + [end for _, _, end, _ in timeline.segments]) or 1000
    # A lone detection is a zero-length segment; draw it one sampling interval wide so it shows.
    min_width_ms = max(1, int(report.get("presence", {}).get("sample_interval_ms") or 200))
    # Ticks on round numbers of seconds (every 10 s, 30 s, 5 min...), about a dozen across the video;
    # whole seconds read best, but a clip of a few seconds needs tenths or every tick says 0:00.
    step_ms = next((s for s in _TICK_STEPS_MS if end_ms / s <= 12), _TICK_STEPS_MS[-1])
    if end_ms > 10_000:
        mmss = FuncFormatter(lambda x, _pos: f"{int(x // 60000)}:{int(x // 1000) % 60:02d}")
    else:
        mmss = FuncFormatter(lambda x, _pos: f"{int(x // 60000)}:{x % 60000 / 1000:04.1f}")
    by_person: dict[int | None, list[tuple[int, int]]] = {}
    for person, start, end, _ in timeline.segments:
        by_person.setdefault(person, []).append((start, max(end - start, min_width_ms)))

    if search:
        ranked = sorted(report["persons"], key=lambda p: (-p["seconds_present"], p["person_index"]))[:CHART_LANES]
        lanes = sorted(ranked, key=lambda p: (p["first_seen_ms"], p["person_index"]))
        fig, ax = plt.subplots(figsize=(13, max(3.0, 0.42 * len(lanes) + 1.8)))
        axes = [ax]
        palette = plt.get_cmap("tab10")
        colours: dict[str, Any] = {}
        for lane, person in enumerate(lanes):
            ident = person.get("face_id")
            colour = "#9e9e9e" if ident is None else colours.setdefault(ident, palette(len(colours) % 10))
            ax.broken_barh(by_person.get(person["person_index"], []), (lane - 0.35, 0.7), color=colour)
        ax.set_yticks(range(len(lanes)), [_lane_label(p) for p in lanes])
        ax.set_ylim(max(len(lanes), 1) - 0.5, -0.5)  # first to appear at the top
        hidden = len(report["persons"]) - len(lanes)
        note = f" ({hidden} persons with less screen time not shown)" if hidden > 0 else ""
        if not lanes:
            ax.text(0.5, 0.5, "no persons stored for this job", ha="center", va="center", transform=ax.transAxes)
    else:
        fig, (ax, counts) = plt.subplots(2, 1, figsize=(13, 4.2), sharex=True,
                                         gridspec_kw={"height_ratios": [1, 2.2]})
        axes = [ax, counts]
        ax.broken_barh(by_person.get(None, []), (-0.35, 0.7), color="#1f77b4")
        ax.set_yticks([0], ["any face on screen"])
        ax.set_ylim(-0.6, 0.6)
        if timeline.frames:
            xs = [t for t, _ in timeline.frames]
            ys = [n for _, n in timeline.frames]
            counts.step(xs, ys, where="post", color="#1f77b4", linewidth=1)
            counts.fill_between(xs, ys, step="post", alpha=0.25, color="#1f77b4")
            counts.set_ylim(0, max(ys) + 1)
        else:
            counts.text(0.5, 0.5, "no faces stored for this job", ha="center", va="center", transform=counts.transAxes)
        counts.set_ylabel("faces in frame")
        counts.yaxis.get_major_locator().set_params(integer=True)
        note = " (face detection has no person identity)"

    for a in axes:
        a.set_xlim(0, end_ms)
        a.xaxis.set_major_locator(MultipleLocator(step_ms))
        a.xaxis.set_major_formatter(mmss)
        a.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("video time (m:ss)")
    where = job.get("video_name") or job["job_id"]
    state = "" if job["ingest_state"] == "ingested" else f" [{job['ingest_state']}: {job.get('failure_reason')}]"
    fig.suptitle(f"{where}: who is on screen when{state}", fontsize=12, x=0.01, ha="left")
    axes[0].set_title(
        f"{job['api']} job {job['job_id']} · {job['faces']} faces, {job['persons']} persons, "
        f"{job['collection_matches']} collection matches · pauses up to {timeline.max_gap_ms} ms bridged{note}",
        fontsize=8, loc="left",
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def run_report(settings: Settings, job_id: str, *, fmt: str, chart: str | None, console: Console) -> int:
    validate_job_id(job_id)
    conn = await connect(settings.asyncpg_dsn)
    try:
        # One snapshot for every query: a re-ingest committing between them cannot mix two ingests.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            report = await load_report(conn, job_id)
            if report is None:
                if await conn.fetchval("SELECT true FROM reporting.pending_jobs WHERE job_id = $1", job_id):
                    raise NotFound(f"job {job_id} has not been ingested yet: its notification arrived, "
                                       "it is pending (reporting.pending_jobs)")
                raise NotFound(f"job {job_id} has not been ingested (no such job in the database)")
            timeline = await load_timeline(conn, job_id, gap_for(report)) if chart else None
    finally:
        await conn.close()
    if chart and timeline is not None:
        # Drawn first: a path that cannot be written fails the command before anything is printed.
        try:
            render_chart(report, timeline, chart)
        except OSError as exc:  # the caller's input, not a crash
            raise InvalidInput(f"cannot write the chart to {chart}: {exc.strerror or exc}") from exc
    if fmt == "json":
        # One record: indented for a person, one line for a pipe.
        print(json.dumps(report, indent=2 if console.is_terminal else None, default=str))
    else:
        render_text(report, console)
        if chart:
            console.print(f"timeline written to {chart}")
    return 0
