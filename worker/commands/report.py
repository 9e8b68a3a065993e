"""`report`: human summary of one ingested job (text, JSON, or a timeline chart)."""

from __future__ import annotations

from pathlib import Path

from worker.commands.base import Context, SubParsers, arun
from worker.errors import InvalidInput

# What matplotlib writes without extra backends; the file name's suffix picks the format.
CHART_SUFFIXES = (".png", ".svg", ".pdf")


def register(sub: SubParsers) -> None:
    rep = sub.add_parser("report", help="human summary of one ingested job")
    rep.add_argument("job_id", metavar="JOB_ID")
    rep.add_argument("--format", choices=("text", "json"), default="text",
                     help="text (the default) or json (one object; indented on a terminal, one line otherwise)")
    rep.add_argument("--chart", metavar="PATH", help="write a timeline of who is on screen when (.png, .svg or .pdf)")
    rep.set_defaults(handler=run)


def check_chart_path(path: str) -> None:
    if Path(path).suffix.lower() not in CHART_SUFFIXES:
        raise InvalidInput(f"--chart {path}: the chart is written as PNG, SVG or PDF, chosen by the file name: "
                           f"name it {', '.join('*' + s for s in CHART_SUFFIXES)}")


def run(ctx: Context) -> int:
    from worker.messages import validate_job_id
    from worker.report import run_report

    validate_job_id(ctx.args.job_id)
    if ctx.args.chart is not None:
        check_chart_path(ctx.args.chart)
    return arun(run_report(ctx.settings, ctx.args.job_id, fmt=ctx.args.format, chart=ctx.args.chart,
                           console=ctx.out))
