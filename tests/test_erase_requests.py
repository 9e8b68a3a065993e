"""Erasure requests that cannot be mistaken: nothing matched is exit 3 with no removal claimed, the identifier
read from stdin or a file, ERASURE_HASH_KEY of at least 32 bytes. Real processes, PostgreSQL, the emulator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import unique_job_id
from tests.test_cli_errors import json_events, run_cli
from worker.config import MIN_ERASURE_KEY_BYTES, Settings
from worker.errors import ConfigError
from worker.lifecycle import selector_hash
from worker.local import synth

KEY = "an-erasure-key-of-more-than-32-bytes-0123456789"


@pytest.fixture
def env(db_url: str, emulator: Any) -> dict[str, str]:
    emulator.configure(quota_tps=None, fault_rate=0.0, latency_s=0.0)
    return {"DATABASE_URL": db_url, "AWS_ENDPOINT_URL_REKOGNITION": emulator.url, "REKOGNITION_TPS": "200",
            "ERASURE_HASH_KEY": KEY}


async def _audit(db: asyncpg.Connection) -> list[dict[str, Any]]:
    return [dict(r) for r in await db.fetch("SELECT * FROM erasures ORDER BY id")]


async def test_an_identifier_that_matches_nothing_is_exit_3_and_claims_no_removal(
        env: dict[str, str], db: asyncpg.Connection) -> None:
    dry = run_cli("erase", "--external-image-id", "-", "--dry-run", env=env, stdin="nobody-99\n")
    assert dry.returncode == 3, dry.stderr
    assert await _audit(db) == []  # a dry run records nothing

    result = run_cli("erase", "--external-image-id", "-", env=env, stdin="nobody-99\n")
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""  # no "removed: ..." line that could be read as done
    [failed] = [e for e in json_events(result.stderr) if e["event"] == "command failed"]
    assert failed["kind"] == "not_found" and "nothing matched" in failed["error"]
    assert "nobody-99" not in result.stderr  # the identifier is not echoed into logs
    # The request is on record, provably, with every count 0: the audit claims no removal.
    [row] = await _audit(db)
    assert row["selector_hash"] == selector_hash(KEY, "external_image_id", "nobody-99")
    counts = ("jobs", "collection_faces", "face_matches", "persons", "faces", "landmarks", "emotions",
              "pages_rewritten")
    assert all(row[name] == 0 for name in counts)
    assert f"audit row {row['id']}" in failed["error"]


async def test_the_identifier_comes_from_stdin_or_a_file(env: dict[str, str], emulator: Any,
                                                         db: asyncpg.Connection, tmp_path: Path) -> None:
    job = synth.search_job(unique_job_id("erase-req"), persons_elements=60, persons=4, seed=3)
    emulator.add_job(job)
    assert run_cli("backfill", "--api", "GetFaceSearch", job.job_id, env=env).returncode == 0
    ids = [r[0] for r in await db.fetch("SELECT DISTINCT external_image_id FROM collection_faces "
                                        "WHERE external_image_id IS NOT NULL ORDER BY 1")]
    assert len(ids) >= 2, ids
    first = ids[0]

    request = tmp_path / "erase-request"
    request.write_text(f"\n{first}\n\n")  # blank lines are ignored
    by_file = run_cli("erase", "--external-image-id", "--from-file", str(request), env=env, stdin=None)
    assert by_file.returncode == 0, by_file.stderr
    assert by_file.stdout.startswith("erase --external-image-id: removed: jobs 1, ")
    # Erasing `first` also removes the persons that matched it, and collection faces only they matched: the
    # second request names an identity that is still stored.
    second = (await db.fetchval("SELECT min(external_image_id) FROM collection_faces"))
    assert second is not None and second != first
    by_stdin = run_cli("erase", "--external-image-id", "-", env=env, stdin=f"{second}\n")
    assert by_stdin.returncode == 0, by_stdin.stderr
    left = {r[0] for r in await db.fetch("SELECT external_image_id FROM collection_faces")}
    assert first not in left and second not in left
    audit = await _audit(db)
    assert [a["selector_hash"] for a in audit] == [selector_hash(KEY, "external_image_id", i) for i in (first, second)]
    assert all(a["jobs"] == 1 and a["collection_faces"] >= 1 for a in audit)
    # Erased already: the same request again matches nothing.
    again = run_cli("erase", "--external-image-id", "-", env=env, stdin=f"{first}\n")
    assert again.returncode == 3

    for args, stdin, text in (
            (("erase", "--external-image-id", first, "--from-file", str(request)), None, "not both"),
            (("erase", "--face-id", "-"), "a\nb\n", "holds 2 lines"),
            (("erase", "--user-id", "--from-file", str(tmp_path / "missing")), None, "--from-file"),
            (("erase", "--user-id", "-"), "\n\n", "no identifier in stdin")):
        result = run_cli(*args, env=env, stdin=stdin)
        assert result.returncode == 2, (args, result.stderr)
        [event] = json_events(result.stderr)
        assert text in event["error"], event


def test_a_short_erasure_key_is_refused_by_every_command(db_url: str) -> None:
    short = "k" * (MIN_ERASURE_KEY_BYTES - 1)
    for args in (("erase", "--face-id", "-"), ("jobs", "list"), ("run",)):
        result = run_cli(*args, env={"DATABASE_URL": db_url, "ERASURE_HASH_KEY": short}, stdin="x\n")
        assert result.returncode == 2
        [event] = json_events(result.stderr)
        assert f"ERASURE_HASH_KEY must have at least 32 bytes (it has {len(short)})" in event["error"]
        assert short not in result.stderr  # the key itself is never printed
    with pytest.raises(ConfigError):
        Settings.from_env({"ERASURE_HASH_KEY": "é" * 15})  # 30 bytes, however many characters
    assert Settings.from_env({"ERASURE_HASH_KEY": "k" * 32}).erasure_hash_key == "k" * 32
    assert json.dumps(Settings.from_env({}).erasure_hash_key) == "null"
