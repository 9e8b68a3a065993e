"""The documentation names only tests that exist: every guarantee in docs/guarantees.md stands next to
the test that shows it, so a renamed or deleted test fails here instead of leaving a claim unbacked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `tests/test_x.py::test_name`, or `::test_name` for another test of the file named just before it.
_REF = re.compile(r"`(tests/[\w/]+\.py)?::(\w+)(\[[^\]`]*\])?`")


def test_every_test_named_in_the_guarantees_exists() -> None:
    text = (REPO / "docs" / "guarantees.md").read_text(encoding="utf-8")
    current: str | None = None
    checked, missing = 0, []
    for match in _REF.finditer(text):
        current = match.group(1) or current
        assert current is not None, f"{match.group(0)} names no file"
        source = (REPO / current).read_text(encoding="utf-8") if (REPO / current).is_file() else ""
        if not re.search(rf"^(async )?def {match.group(2)}\(", source, flags=re.M):
            missing.append(f"{current}::{match.group(2)}")
        checked += 1
    assert checked >= 40, checked
    assert missing == []


# The documentation a reader follows: the README, docs/ and deploy/README.md.
_DOCS = [REPO / "README.md", REPO / "deploy" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) and ![alt](target); not inside code spans, which name paths without linking them.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCED = re.compile(r"```.*?```", flags=re.S)
_CODE = re.compile(r"```.*?```|`[^`\n]*`", flags=re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCED.sub("", path.read_text(encoding="utf-8"))  # a `# comment` in a code block is no heading
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _broken_links(path: Path, root: Path = REPO) -> list[str]:
    """Relative links of a page whose file (inside `root`) or heading does not exist."""
    text = _CODE.sub("", path.read_text(encoding="utf-8"))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists() or not linked.is_relative_to(root):
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no such heading)")
    return broken


def test_the_slug_of_a_heading_is_githubs() -> None:
    assert _slug("Raw result archive and `reprocess`") == "raw-result-archive-and-reprocess"
    assert _slug("Atomic, idempotent writes, without a job-long transaction") == (
        "atomic-idempotent-writes-without-a-job-long-transaction")


def test_every_relative_link_in_the_docs_reaches_a_file_and_heading() -> None:
    broken = {str(path.relative_to(REPO)): links for path in _DOCS if (links := _broken_links(path))}
    assert broken == {}


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [bad](#nowhere) `[code](not-a-link.md)`\n")
    assert _broken_links(page, root=tmp_path) == ["missing.md (no such file)", "#nowhere (no such heading)"]


def test_every_setting_the_config_reads_is_in_the_readme_table() -> None:
    """worker/config.py is the only reader of the environment: each variable it reads is a row of the
    README's configuration table."""
    source = (REPO / "worker" / "config.py").read_text(encoding="utf-8")
    names = set(re.findall(r"""(?:env|environ)(?:\.get\(|\[|, )\s*["']([A-Z][A-Z0-9_]+)["']""", source))
    names |= set(re.findall(r"""_\w+\(env, ["']([A-Z][A-Z0-9_]+)["']""", source))
    assert {"DATABASE_URL", "QUEUE_URL", "MAX_CONCURRENT_JOBS", "ERASURE_HASH_KEY"} <= names, names
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Configuration"):]
    table = table[:table.index("\n## ", 1)]
    rows = "\n".join(line for line in table.splitlines() if line.startswith("|"))
    assert sorted(name for name in names if f"`{name}`" not in rows) == []


def test_every_command_and_reporting_view_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    usage = subprocess.run([sys.executable, "-m", "worker", "--help"], capture_output=True, text=True,
                           check=True, cwd=REPO).stdout
    # argparse lists each subcommand indented under the positional arguments, with its help text
    commands = set(re.findall(r"^ {4}([a-z][a-z-]+)(?: {2,}|$)", usage, flags=re.M))
    assert {"migrate", "backfill", "run", "report"} <= commands, usage
    assert sorted(c for c in commands if f"`{c}" not in readme) == []
    migrations = "".join(p.read_text(encoding="utf-8") for p in (REPO / "migrations").rglob("*.py"))
    views = set(re.findall(r"(?:VIEW|FUNCTION) (reporting\.\w+)", migrations))
    assert "reporting.job_summary" in views
    assert sorted(v for v in views if v not in readme) == []
    for target in ("make demo", "make test"):
        assert target in readme
