"""Listings for people and for pipes (docs/cli.md, "Output").

On a terminal a listing is a table that fits the terminal's width: the columns that identify a record
(the JobId, the state) are never dropped or cut, the one free-text column (a failure reason) wraps, and
columns of lesser priority are left out, named in the caption, when the width cannot hold them.
Piped or redirected, it is one record per line with every value in full: TSV with a header (the default),
or JSON lines with ``--format json``. Nothing from input or AWS is ever read as rich markup: cells are
plain ``Text``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from worker.commands.base import note
from worker.logs import redact

FORMAT_CHOICES = ("auto", "table", "text", "tsv", "json")
Format = Literal["table", "tsv", "json"]
# The width the free-text column keeps at least before lesser columns are left out for it.
MIN_FLEXIBLE_WIDTH = 24
# Between two columns: one space of padding on each side and the divider.
_GAP = 3


def add_format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMAT_CHOICES, default="auto",
                        help="table on a terminal, else tsv (auto, the default); table; tsv (a header, one record "
                             "per line); json (one JSON object per line). text is table's old name")


def resolve(fmt: str, console: Console) -> Format:
    if fmt in ("table", "text"):
        return "table"
    if fmt in ("tsv", "json"):
        return fmt  # type: ignore[return-value]
    return "table" if console.is_terminal else "tsv"


def when(value: Any) -> str:
    """A timestamp as a table shows it: UTC, to the second."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return "-" if value is None else str(value)


@dataclass(frozen=True, slots=True)
class Column:
    """One field of a listing. ``priority`` 0 is never left out; higher numbers go first when space runs out.
    ``flexible``: the free-text column that wraps to the width left."""

    key: str
    title: str
    priority: int = 1
    flexible: bool = False
    justify: Literal["left", "right"] = "left"
    show: Callable[[Any], str] | None = None

    def cell(self, row: Mapping[str, Any]) -> str:
        value = row.get(self.key)
        if self.show is not None:
            return self.show(value)
        if isinstance(value, datetime):
            return when(value)
        return "-" if value is None or value == "" else str(value)


def tsv_field(value: Any) -> str:
    """A value in full on one line: tabs, newlines and backslashes escaped as in PostgreSQL's text COPY."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    text = redact(value if isinstance(value, str) else str(value))
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def fit_columns(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]],
                width: int) -> tuple[list[Column], list[Column]]:
    """The columns a ``width``-wide table shows (in their order) and those it leaves out."""
    need = {c.key: max([len(c.title), *(len(c.cell(r)) for r in rows)]) for c in columns}
    for c in columns:
        if c.flexible:
            need[c.key] = min(need[c.key], MIN_FLEXIBLE_WIDTH)
    shown = {c.key for c in columns if c.priority == 0}
    used = sum(need[k] for k in shown) + _GAP * max(len(shown) - 1, 0)
    for c in sorted((c for c in columns if c.priority > 0), key=lambda c: c.priority):
        extra = need[c.key] + _GAP
        if used + extra <= width:
            shown.add(c.key)
            used += extra
    return [c for c in columns if c.key in shown], [c for c in columns if c.key not in shown]


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], *, width: int,
          title: str | None = None, styles: Mapping[str, Callable[[Any], str | None]] | None = None) -> Table:
    """A table no wider than ``width``: see the module docstring. When even the columns never left out leave the
    free-text column too little room, its text goes on a line of its own under the record's first cell."""
    shown, left_out = fit_columns(columns, rows, width)
    flexible = next((c for c in shown if c.flexible), None)
    fixed_width = sum(_width(c, rows) for c in shown if not c.flexible) + _GAP * (len(shown) - 1)
    beneath = flexible is not None and len(shown) > 1 and width - fixed_width < MIN_FLEXIBLE_WIDTH // 2
    if beneath:
        shown = [c for c in shown if c is not flexible]
    caption = None
    if left_out:
        caption = (f"not shown at {width} columns: {', '.join(c.title for c in left_out)} "
                   "(a wider terminal, or --format tsv, shows every column)")
    out = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                title_justify="left", caption_justify="left")
    for i, c in enumerate(shown):
        if c.flexible:
            out.add_column(c.title, justify=c.justify, overflow="fold",
                           min_width=min(_width(c, rows), MIN_FLEXIBLE_WIDTH))
        elif beneath and i == 0:
            out.add_column(f"{c.title} / {flexible.title}" if flexible else c.title, overflow="fold",
                           min_width=_width(c, rows))
        else:
            out.add_column(c.title, justify=c.justify, no_wrap=True, min_width=_width(c, rows))
    for r in rows:
        cells = []
        for i, c in enumerate(shown):
            style = (styles or {}).get(c.key)
            cell = Text(redact(c.cell(r)), style=(style(r.get(c.key)) or "") if style else "")
            if beneath and i == 0 and flexible is not None and r.get(flexible.key):
                cell.append("\n  " + redact(flexible.cell(r)), style="dim")
            cells.append(cell)
        out.add_row(*cells)
    return out


def _width(column: Column, rows: Sequence[Mapping[str, Any]]) -> int:
    return max([len(column.title), *(len(column.cell(r)) for r in rows)])


def emit(console: Console, fmt: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], *,
         title: str | None = None, notes: Sequence[str] = (), warnings: Sequence[str] = (),
         records: Sequence[Mapping[str, Any]] | None = None,
         styles: Mapping[str, Callable[[Any], str | None]] | None = None) -> None:
    """Print a listing in the format asked for (``auto``: table on a terminal, TSV otherwise).

    ``records``: what JSON lines carry for each row (every field, raw), when more than the columns.
    ``notes`` (a summary) and ``warnings`` (a limit reached) follow a table, and go to stderr beside TSV and
    JSON (as log events) so pipes carry records only.
    """
    kind = resolve(fmt, console)
    if kind == "table":
        console.print(table(rows, columns, width=console.width, title=title, styles=styles))
        for text in [*notes, *warnings]:
            console.print(text, markup=False, highlight=False)
        return
    out = console.file
    if kind == "json":
        for record in records if records is not None else rows:
            out.write(orjson.dumps(dict(record), default=_json_default).decode() + "\n")
    else:
        out.write("\t".join(c.key for c in columns) + "\n")
        for r in rows:
            out.write("\t".join(tsv_field(r.get(c.key)) for c in columns) + "\n")
    out.flush()
    for text in notes:
        note(text)
    for text in warnings:
        note(text, warning=True)
