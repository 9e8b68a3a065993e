"""The local Rekognition Video emulator, driven by a real aiobotocore client over HTTP, and its generator.

No mocks: every API test goes through botocore's serializer, SigV4 signer and response parser, so what
passes here is what the worker will see.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiobotocore.session
import aiohttp
import botocore.session
import orjson
import pytest
import pytest_asyncio
from aiobotocore.config import AioConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from worker.local import synth
from worker.local.emulator import EmulatorConfig, EmulatorThread, RekognitionEmulator

REPO = Path(__file__).resolve().parents[1]
UUID4_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
SIGNED = {"Authorization": "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/rekognition/aws4_request"}


class FakeClock:
    """A monotonic clock the test moves by hand, so quota tests never sleep."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


DET = synth.detection_job("t-det-paged", faces=250, attributes="DEFAULT", seed=7)
DET_OTHER = synth.detection_job("t-det-other", faces=30, attributes="DEFAULT", seed=8)
DET_BIG = synth.detection_job("t-det-big", faces=1001, attributes="DEFAULT", persons=3, seed=9)
DET_ALL = synth.detection_job("t-det-all", faces=40, attributes="ALL", all_optional=True)
SEARCH = synth.search_job("t-search", persons_elements=120, persons=6, seed=3)
DENIED = replace(synth.detection_job("t-denied", faces=3), error="AccessDeniedException")
RUNNING = synth.in_progress_job("t-running", "GetFaceDetection")
FAILED = synth.failed_job("t-failed", "GetFaceSearch", "Unsupported codec")
JOBS = [DET, DET_OTHER, DET_BIG, DET_ALL, SEARCH, DENIED, RUNNING, FAILED]


@pytest.fixture(scope="module", autouse=True)
def _scrub_aws_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Module-scoped so it runs before the module-scoped clients below are created.
    missing = tmp_path_factory.mktemp("aws") / "missing"
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                mp.delenv(name)
        mp.setenv("AWS_CONFIG_FILE", str(missing))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest_asyncio.fixture(scope="module")
async def emu_server(clock: FakeClock) -> AsyncIterator[RekognitionEmulator]:
    emu = RekognitionEmulator(EmulatorConfig(), jobs=JOBS, clock=clock)
    await emu.start("127.0.0.1", 0)
    yield emu
    await emu.stop()


@pytest.fixture
def emu(emu_server: RekognitionEmulator) -> RekognitionEmulator:
    """The shared emulator with default behaviour, original jobs and zeroed counters."""
    emu_server.configure(EmulatorConfig())
    emu_server.add_jobs(JOBS)
    emu_server.reset_stats()
    return emu_server


def _client_kwargs(url: str, **config: Any) -> dict[str, Any]:
    return {
        "region_name": "us-east-1",
        "endpoint_url": url,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "config": AioConfig(retries={"total_max_attempts": 1}, **config),
    }


@pytest_asyncio.fixture(scope="module")
async def client(emu_server: RekognitionEmulator) -> AsyncIterator[Any]:
    session = aiobotocore.session.get_session()
    async with session.create_client("rekognition", **_client_kwargs(emu_server.url)) as c:
        yield c


@pytest_asyncio.fixture(scope="module")
async def lax_client(emu_server: RekognitionEmulator) -> AsyncIterator[Any]:
    """Skips botocore's client-side validation, to reach the server's own parameter checks."""
    session = aiobotocore.session.get_session()
    kwargs = _client_kwargs(emu_server.url, parameter_validation=False)
    async with session.create_client("rekognition", **kwargs) as c:
        yield c


async def _error_of(call: Any) -> ClientError:
    with pytest.raises(ClientError) as info:
        await call
    return info.value


def _code(err: ClientError) -> str:
    return str(err.response["Error"]["Code"])


def _status(err: ClientError) -> int:
    return int(err.response["ResponseMetadata"]["HTTPStatusCode"])


# --- pagination --------------------------------------------------------------------------------------------


async def test_pagination_returns_every_face_once_in_order(emu: RekognitionEmulator, client: Any) -> None:
    faces: list[dict[str, Any]] = []
    sizes: list[int] = []
    tokens: list[str] = []
    kwargs: dict[str, Any] = {"JobId": DET.job_id, "MaxResults": 100}
    while True:
        page = await client.get_face_detection(**kwargs)
        assert page["JobStatus"] == "SUCCEEDED"
        assert page["JobId"] == DET.job_id
        assert page["VideoMetadata"] == DET.video_metadata  # on every page, not only the first
        assert page["Video"] == DET.video
        assert page["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/x-amz-json-1.1"
        assert page["ResponseMetadata"]["RequestId"]
        faces.extend(page["Faces"])
        sizes.append(len(page["Faces"]))
        if "NextToken" not in page:
            break
        assert len(page["NextToken"]) <= 255
        tokens.append(page["NextToken"])
        kwargs["NextToken"] = page["NextToken"]
    assert sizes == [100, 100, 50]
    assert len(set(tokens)) == 2
    assert faces == DET.results  # every element exactly once, in order, values unchanged by the wire
    assert emu.stats()["succeeded"] == 3


async def test_endpoint_from_environment(emu: RekognitionEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker passes no endpoint_url: botocore's own per-service variable must reach the emulator.
    monkeypatch.setenv("AWS_ENDPOINT_URL_REKOGNITION", emu.url)
    session = aiobotocore.session.get_session()
    kwargs = _client_kwargs(emu.url)
    del kwargs["endpoint_url"]
    async with session.create_client("rekognition", **kwargs) as c:
        page = await c.get_face_detection(JobId=DET_OTHER.job_id)
    assert page["Faces"] == DET_OTHER.results
    assert emu.stats()["succeeded"] == 1


async def test_max_results_defaults_to_1000_and_is_capped(emu: RekognitionEmulator, lax_client: Any) -> None:
    first = await lax_client.get_face_detection(JobId=DET_BIG.job_id)
    assert len(first["Faces"]) == 1000
    capped = await lax_client.get_face_detection(JobId=DET_BIG.job_id, MaxResults=5000)
    assert len(capped["Faces"]) == 1000
    last = await lax_client.get_face_detection(JobId=DET_BIG.job_id, NextToken=capped["NextToken"])
    assert last["Faces"] == DET_BIG.results[1000:]
    assert "NextToken" not in last


async def test_sort_by_index_groups_persons_stably(emu: RekognitionEmulator, client: Any) -> None:
    persons: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"JobId": SEARCH.job_id, "MaxResults": 50, "SortBy": "INDEX"}
    while True:
        page = await client.get_face_search(**kwargs)
        persons.extend(page["Persons"])
        if "NextToken" not in page:
            break
        kwargs["NextToken"] = page["NextToken"]
    expected = sorted(SEARCH.results, key=lambda p: (p["Person"]["Index"], p["Timestamp"]))
    assert persons == expected
    by_time = await client.get_face_search(JobId=SEARCH.job_id, SortBy="TIMESTAMP")
    assert by_time["Persons"] == SEARCH.results
    default = await client.get_face_search(JobId=SEARCH.job_id)
    assert default["Persons"] == SEARCH.results


async def test_foreign_and_tampered_tokens_are_rejected(emu: RekognitionEmulator, client: Any) -> None:
    index_page = await client.get_face_search(JobId=SEARCH.job_id, MaxResults=10, SortBy="INDEX")
    err = await _error_of(
        client.get_face_search(JobId=SEARCH.job_id, NextToken=index_page["NextToken"], SortBy="TIMESTAMP")
    )
    assert _code(err) == "InvalidPaginationTokenException"

    det_page = await client.get_face_detection(JobId=DET.job_id, MaxResults=10)
    token = det_page["NextToken"]
    err = await _error_of(client.get_face_detection(JobId=DET_OTHER.job_id, NextToken=token))
    assert _code(err) == "InvalidPaginationTokenException"
    tampered = ("A" if token[0] != "A" else "B") + token[1:]
    for bad in (tampered, "not-a-token", "x" * 255):
        err = await _error_of(client.get_face_detection(JobId=DET.job_id, NextToken=bad))
        assert _code(err) == "InvalidPaginationTokenException"
        assert _status(err) == 400


async def test_replaced_job_invalidates_its_old_tokens(emu: RekognitionEmulator, client: Any) -> None:
    page = await client.get_face_detection(JobId=DET.job_id, MaxResults=10)
    assert emu.remove_job(DET.job_id)
    err = await _error_of(client.get_face_detection(JobId=DET.job_id))
    assert _code(err) == "ResourceNotFoundException"  # results "expired"
    emu.add_job(DET)
    err = await _error_of(client.get_face_detection(JobId=DET.job_id, NextToken=page["NextToken"]))
    assert _code(err) == "InvalidPaginationTokenException"


# --- modeled errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "params", "code"),
    [
        ("get_face_detection", {"JobId": "no-such-job"}, "ResourceNotFoundException"),
        ("get_face_search", {"JobId": DET.job_id}, "ResourceNotFoundException"),  # a job of the other API
        ("get_face_detection", {"JobId": DENIED.job_id}, "AccessDeniedException"),
        ("get_face_detection", {"JobId": DET.job_id, "MaxResults": 0}, "InvalidParameterException"),
        ("get_face_search", {"JobId": SEARCH.job_id, "SortBy": "NAME"}, "InvalidParameterException"),
        ("get_face_detection", {"JobId": "bad job id!"}, "InvalidParameterException"),
    ],
)
async def test_modeled_errors_reach_botocore(
    emu: RekognitionEmulator, lax_client: Any, operation: str, params: dict[str, Any], code: str
) -> None:
    err = await _error_of(getattr(lax_client, operation)(**params))
    assert _code(err) == code
    assert _status(err) == 400
    assert err.response["Error"]["Message"]
    stats = emu.stats()
    assert (stats["errors"], stats["by_error"]) == (1, {code: 1})


async def test_fault_rate_one_answers_internal_server_error(emu: RekognitionEmulator, client: Any) -> None:
    emu.configure(fault_rate=1.0)
    for _ in range(3):
        err = await _error_of(client.get_face_detection(JobId=DET.job_id))
        assert (_code(err), _status(err)) == ("InternalServerError", 500)
    emu.configure(fault_rate=0.0)
    await client.get_face_detection(JobId=DET.job_id, MaxResults=1)
    stats = emu.stats()
    assert (stats["faults"], stats["succeeded"], stats["requests"]) == (3, 1, 4)


async def test_fault_rate_is_seeded(emu: RekognitionEmulator, client: Any) -> None:
    async def outcomes() -> list[str]:
        emu.configure(fault_rate=0.5, seed=11)
        emu.configure(seed=12)  # a seed change restarts the fault sequence
        emu.reset_stats()
        for _ in range(12):
            with contextlib.suppress(ClientError):
                await client.get_face_detection(JobId=DET_OTHER.job_id, MaxResults=1)
        return [outcome for _, outcome in emu.stats()["calls"]]

    first, second = await outcomes(), await outcomes()
    assert first == second
    assert {"succeeded", "fault"} == set(first)


# --- quota -------------------------------------------------------------------------------------------------


async def test_quota_admits_bucket_then_throttles(
    emu: RekognitionEmulator, client: Any, clock: FakeClock
) -> None:
    emu.configure(quota_tps=5.0)
    start_s = clock.now_s

    async def call() -> str:
        try:
            await client.get_face_detection(JobId=DET_OTHER.job_id, MaxResults=1)
        except ClientError as err:
            assert _status(err) == 400
            return _code(err)
        return "ok"

    # 20 calls arriving together (the fake clock does not move): the bucket holds 5 tokens.
    results = await asyncio.gather(*(call() for _ in range(20)))
    assert results.count("ok") == 5
    assert results.count("ProvisionedThroughputExceededException") == 15
    # Throttled calls spent nothing, so 0.2 s refills exactly one token.
    clock.advance(0.2)
    assert [await call() for _ in range(2)] == ["ok", "ProvisionedThroughputExceededException"]
    # A full second refills the whole bucket, but never beyond its capacity.
    clock.advance(10.0)
    assert [await call() for _ in range(6)].count("ok") == 5

    stats = emu.stats()
    assert (stats["requests"], stats["succeeded"], stats["throttled"]) == (28, 11, 17)
    assert stats["by_operation"]["GetFaceDetection"]["throttled"] == 17
    arrivals = [t for t, _ in stats["calls"]]
    assert arrivals[:20] == [start_s] * 20  # recorded at arrival, on the injected clock
    assert arrivals[-1] == start_s + 10.2


async def test_throttling_exception_with_5xx(emu: RekognitionEmulator, client: Any) -> None:
    emu.configure(quota_tps=1.0, throttle_error="ThrottlingException", throttle_http_status=503)
    await client.get_face_detection(JobId=DET_OTHER.job_id, MaxResults=1)
    err = await _error_of(client.get_face_detection(JobId=DET_OTHER.job_id, MaxResults=1))
    assert (_code(err), _status(err)) == ("ThrottlingException", 503)
    assert emu.stats()["throttled"] == 1


async def test_quota_is_shared_by_both_operations(emu: RekognitionEmulator, client: Any) -> None:
    emu.configure(quota_tps=2.0)
    await client.get_face_detection(JobId=DET_OTHER.job_id, MaxResults=1)
    await client.get_face_search(JobId=SEARCH.job_id, MaxResults=1)
    err = await _error_of(client.get_face_search(JobId=SEARCH.job_id, MaxResults=1))
    assert _code(err) == "ProvisionedThroughputExceededException"


async def test_concurrent_calls_are_counted_exactly(emu: RekognitionEmulator, client: Any) -> None:
    async def one(i: int) -> None:
        try:
            if i % 3 == 0:
                await client.get_face_detection(JobId="missing-job")
            elif i % 3 == 1:
                await client.get_face_search(JobId=SEARCH.job_id, MaxResults=5)
            else:
                await client.get_face_detection(JobId=DET.job_id, MaxResults=5)
        except ClientError:
            pass

    await asyncio.gather(*(one(i) for i in range(60)))
    stats = emu.stats()
    assert (stats["requests"], stats["succeeded"], stats["errors"]) == (60, 40, 20)
    assert stats["by_operation"]["GetFaceSearch"]["succeeded"] == 20
    assert stats["by_operation"]["GetFaceDetection"]["requests"] == 40
    assert len(stats["calls"]) == 60


async def test_latency_is_applied_to_every_answer(emu: RekognitionEmulator, client: Any) -> None:
    emu.configure(latency_s=0.15)
    started = time.perf_counter()
    await client.get_face_detection(JobId=DET_OTHER.job_id, MaxResults=1)
    await _error_of(client.get_face_detection(JobId="missing-job"))
    assert time.perf_counter() - started >= 0.3


# --- job state ---------------------------------------------------------------------------------------------


async def test_complete_after_answers_in_progress_then_succeeded(
    emu: RekognitionEmulator, client: Any
) -> None:
    emu.complete_after(DET.job_id, 2)
    statuses = []
    for _ in range(3):
        page = await client.get_face_detection(JobId=DET.job_id, MaxResults=10)
        statuses.append((page["JobStatus"], len(page["Faces"]), "NextToken" in page))
    assert statuses == [("IN_PROGRESS", 0, False), ("IN_PROGRESS", 0, False), ("SUCCEEDED", 10, True)]
    stats = emu.stats()
    assert (stats["succeeded"], stats["in_progress"]) == (3, 2)


async def test_set_status_and_fixed_statuses(emu: RekognitionEmulator, client: Any) -> None:
    running = await client.get_face_detection(JobId=RUNNING.job_id)
    assert (running["JobStatus"], running["Faces"]) == ("IN_PROGRESS", [])
    failed = await client.get_face_search(JobId=FAILED.job_id)
    assert (failed["JobStatus"], failed["StatusMessage"], failed["Persons"]) == (
        "FAILED",
        "Unsupported codec",
        [],
    )
    emu.set_status(DET.job_id, "FAILED", "Video decode error")
    page = await client.get_face_detection(JobId=DET.job_id)
    assert (page["JobStatus"], page.get("StatusMessage"), page["Faces"]) == (
        "FAILED",
        "Video decode error",
        [],
    )
    emu.set_status(DET.job_id, "SUCCEEDED")
    page = await client.get_face_detection(JobId=DET.job_id, MaxResults=3)
    assert (page["JobStatus"], "StatusMessage" in page, page["Faces"]) == (
        "SUCCEEDED",
        False,
        DET.results[:3],
    )


async def test_expire_tokens_once_forces_a_restart(emu: RekognitionEmulator, client: Any) -> None:
    first = await client.get_face_detection(JobId=DET.job_id, MaxResults=100)
    emu.expire_tokens_once(DET.job_id)
    err = await _error_of(client.get_face_detection(JobId=DET.job_id, NextToken=first["NextToken"]))
    assert _code(err) == "InvalidPaginationTokenException"
    # Only once: a restart from the first page paginates normally again.
    again = await client.get_face_detection(JobId=DET.job_id, MaxResults=100)
    second = await client.get_face_detection(JobId=DET.job_id, NextToken=again["NextToken"], MaxResults=100)
    assert second["Faces"] == DET.results[100:200]


async def test_rejected_looping_and_later_in_progress_tokens(emu: RekognitionEmulator, client: Any) -> None:
    emu.reject_tokens(DET.job_id)  # every token, however often the job restarts
    for _ in range(3):
        first = await client.get_face_detection(JobId=DET.job_id, MaxResults=100)
        err = await _error_of(client.get_face_detection(JobId=DET.job_id, NextToken=first["NextToken"]))
        assert _code(err) == "InvalidPaginationTokenException"
    emu.reject_tokens(DET.job_id, 0)
    emu.in_progress_on_later_pages(DET.job_id, 1)
    first = await client.get_face_detection(JobId=DET.job_id, MaxResults=100)
    later = await client.get_face_detection(JobId=DET.job_id, NextToken=first["NextToken"], MaxResults=100)
    assert later["JobStatus"] == "IN_PROGRESS" and not later.get("Faces")
    emu.loop_tokens(DET.job_id, 1)  # 3 pages of 100: tokens A, B, A, B, ...
    tokens, token = [], None
    for _ in range(4):
        page = await client.get_face_detection(JobId=DET.job_id, MaxResults=100,
                                               **({"NextToken": token} if token else {}))
        token = page["NextToken"]
        tokens.append(token)
    assert tokens[0] == tokens[2] and tokens[1] == tokens[3] and tokens[0] != tokens[1]


# --- wire details and control endpoints --------------------------------------------------------------------


async def test_unsigned_and_unknown_requests(emu: RekognitionEmulator) -> None:
    headers = {
        "X-Amz-Target": "RekognitionService.GetFaceDetection",
        "Content-Type": "application/x-amz-json-1.1",
    }
    body = orjson.dumps({"JobId": DET.job_id})
    async with aiohttp.ClientSession() as http:
        async with http.post(emu.url + "/", data=body, headers=headers) as resp:
            assert resp.status == 400
            assert resp.headers["Content-Type"] == "application/x-amz-json-1.1"
            assert resp.headers["x-amzn-RequestId"]
            assert orjson.loads(await resp.read())["__type"] == "MissingAuthenticationTokenException"
        unknown = {**headers, **SIGNED, "X-Amz-Target": "RekognitionService.DetectFaces"}
        async with http.post(emu.url + "/", data=body, headers=unknown) as resp:
            assert resp.status == 400
            assert orjson.loads(await resp.read())["__type"] == "UnknownOperationException"
        async with http.post(emu.url + "/", data=b"{not json", headers={**headers, **SIGNED}) as resp:
            assert resp.status == 400
            assert orjson.loads(await resp.read())["__type"] == "SerializationException"
    assert emu.stats()["errors"] == 3


async def test_control_endpoints(emu: RekognitionEmulator, client: Any) -> None:
    uploaded = synth.search_job("t-uploaded", persons_elements=12, seed=5)
    async with aiohttp.ClientSession() as http:
        async with http.post(emu.url + "/_emulator/jobs", data=orjson.dumps(uploaded.to_dict())) as resp:
            assert resp.status == 200
            assert await resp.json() == {"added": ["t-uploaded"]}
        page = await client.get_face_search(JobId="t-uploaded")
        assert page["Persons"] == uploaded.results

        async with http.post(emu.url + "/_emulator/config", data=b'{"latency_s": 0.01}') as resp:
            assert resp.status == 200
            assert (await resp.json())["latency_s"] == 0.01
        assert emu.config.latency_s == 0.01
        async with http.post(emu.url + "/_emulator/config", data=b'{"fault_rate": 2}') as resp:
            assert resp.status == 400
        async with http.post(emu.url + "/_emulator/config", data=b'{"no_such_knob": 1}') as resp:
            assert resp.status == 400

        async with http.get(emu.url + "/_emulator/stats") as resp:
            stats = await resp.json()
        assert (stats["requests"], stats["succeeded"]) == (1, 1)
        assert stats["calls"][0][1] == "succeeded"
        async with http.delete(emu.url + "/_emulator/jobs/t-uploaded") as resp:
            assert resp.status == 200
    err = await _error_of(client.get_face_search(JobId="t-uploaded"))
    assert _code(err) == "ResourceNotFoundException"


async def test_prerender_serves_identical_bytes(emu: RekognitionEmulator, client: Any) -> None:
    pages = emu.prerender(max_results=100)
    assert pages >= 3 + 1 + 11 + 1 + 2  # DET, DET_OTHER, DET_BIG, DET_ALL, SEARCH at least
    page = await client.get_face_detection(JobId=DET.job_id, MaxResults=100)
    assert page["Faces"] == DET.results[:100]


# --- other ways to run it ----------------------------------------------------------------------------------


async def test_emulator_thread_serves_sync_clients() -> None:
    with EmulatorThread(EmulatorConfig(quota_tps=1000.0), jobs=[DET_OTHER]) as emu:
        emu.add_job(RUNNING)  # from this (main) thread while the server runs in its own
        session = botocore.session.get_session()
        sync = session.create_client(
            "rekognition",
            region_name="us-east-1",
            endpoint_url=emu.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(retries={"total_max_attempts": 1}),
        )
        try:
            page = sync.get_face_detection(JobId=DET_OTHER.job_id)
            assert page["Faces"] == DET_OTHER.results
            assert sync.get_face_detection(JobId=RUNNING.job_id)["JobStatus"] == "IN_PROGRESS"
        finally:
            sync.close()
        assert emu.stats()["succeeded"] == 2
        url = emu.url
    assert url.startswith("http://127.0.0.1:")
    with pytest.raises(RuntimeError, match="not started"):
        _ = emu.url


async def test_subprocess_prints_ready_and_serves() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.local.emulator",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--demo-jobs",
        "--quota-tps",
        "100",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=20)).decode()
        match = re.fullmatch(r"READY (http://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        session = aiobotocore.session.get_session()
        async with session.create_client("rekognition", **_client_kwargs(match.group(1))) as c:
            page = await c.get_face_detection(JobId="demo-det-lobby-0001", MaxResults=10)
            assert len(page["Faces"]) == 10 and page["NextToken"]
            running = await c.get_face_detection(JobId="demo-det-running-0005")
            assert running["JobStatus"] == "IN_PROGRESS"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- the generator -----------------------------------------------------------------------------------------


def _member_paths(shape: Any, prefix: str = "") -> set[str]:
    paths: set[str] = set()
    if shape.type_name == "structure":
        for name, member in shape.members.items():
            paths.add(f"{prefix}.{name}")
            paths |= _member_paths(member, f"{prefix}.{name}")
    elif shape.type_name == "list":
        paths |= _member_paths(shape.member, prefix + "[]")
    return paths


def _data_paths(value: Any, prefix: str = "") -> set[str]:
    paths: set[str] = set()
    if isinstance(value, dict):
        for name, member in value.items():
            paths.add(f"{prefix}.{name}")
            paths |= _data_paths(member, f"{prefix}.{name}")
    elif isinstance(value, list):
        for item in value:
            paths |= _data_paths(item, prefix + "[]")
    return paths


def _output_paths(operation: str) -> set[str]:
    model = botocore.session.get_session().get_service_model("rekognition")
    return _member_paths(model.operation_model(operation).output_shape)


@pytest.mark.parametrize(
    "fixture",
    [
        synth.detection_job("all-optional-det", faces=30, all_optional=True),
        synth.search_job("all-optional-search", persons_elements=30, all_optional=True),
    ],
    ids=["detection", "search"],
)
def test_all_optional_fills_every_member_of_the_response(fixture: synth.JobFixture) -> None:
    body = synth.page_body(fixture, 0, 20, "token")
    assert _data_paths(body) == _output_paths(fixture.api)


@pytest.mark.parametrize("fixture", [DET, DET_ALL, SEARCH, RUNNING, FAILED], ids=lambda f: f.job_id)
def test_fixtures_use_only_documented_members(fixture: synth.JobFixture) -> None:
    assert _data_paths(synth.page_body(fixture, 0, 10, "t")) <= _output_paths(fixture.api)


def test_generator_is_deterministic() -> None:
    a = synth.detection_job("det-x", faces=120, seed=4)
    b = synth.detection_job("det-x", faces=120, seed=4)
    assert orjson.dumps(a.to_dict()) == orjson.dumps(b.to_dict())
    assert a.results != synth.detection_job("det-x", faces=120, seed=5).results
    assert a.results != synth.detection_job("det-y", faces=120, seed=4).results
    s1, s2 = synth.search_job("s-x", seed=2), synth.search_job("s-x", seed=2)
    assert orjson.dumps(s1.to_dict()) == orjson.dumps(s2.to_dict())
    assert synth.demo_jobs() == synth.demo_jobs()


def test_detection_shapes_and_ranges() -> None:
    full = synth.detection_job("det-all", faces=200, attributes="ALL", seed=1)
    lean = synth.detection_job("det-default", faces=50, attributes="DEFAULT", seed=1)
    assert len(full.results) == 200
    stamps = [f["Timestamp"] for f in full.results]
    assert stamps == sorted(stamps) and stamps[-1] < full.video_metadata["DurationMillis"]
    assert len(set(stamps)) < len(stamps)  # several faces per sampled frame
    for element in full.results:
        face = element["Face"]
        assert [lm["Type"] for lm in face["Landmarks"]] == list(synth.LANDMARK_TYPES)
        assert len(face["Landmarks"]) == 30
        assert sorted(e["Type"] for e in face["Emotions"]) == sorted(synth.EMOTION_TYPES)
        assert len(face["Emotions"]) == 8
        assert "FaceOccluded" not in face and "EyeDirection" not in face  # always null for this API
        assert face["Gender"]["Value"] in ("Male", "Female")
        assert face["AgeRange"]["Low"] <= face["AgeRange"]["High"]
        box = face["BoundingBox"]
        assert 0 <= box["Left"] <= 1 and 0 <= box["Top"] <= 1 and 0 < box["Width"] <= 1
        assert box["Left"] + box["Width"] <= 1.0 + 1e-6
        assert 0 <= face["Confidence"] <= 100
        assert all(-180 <= face["Pose"][k] <= 180 for k in ("Roll", "Yaw", "Pitch"))
        assert all(0 <= face["Quality"][k] <= 100 for k in ("Brightness", "Sharpness"))
        assert all(isinstance(v, float) for v in box.values())
    for element in lean.results:
        face = element["Face"]
        assert set(face) == {"BoundingBox", "Landmarks", "Pose", "Quality", "Confidence"}
        assert {lm["Type"] for lm in face["Landmarks"]} == set(synth.DEFAULT_LANDMARK_TYPES)


def test_detection_boxes_drift_smoothly() -> None:
    job = synth.search_job("drift", persons_elements=400, persons=4, seed=6)
    last: dict[int, dict[str, float]] = {}
    steps: list[float] = []
    for element in job.results:
        index, box = element["Person"]["Index"], element["Person"]["Face"]["BoundingBox"]
        if index in last:
            steps.append(abs(box["Left"] - last[index]["Left"]) + abs(box["Top"] - last[index]["Top"]))
        last[index] = box
    steps.sort()
    assert steps[int(len(steps) * 0.9)] < 0.03  # re-entries jump; ordinary frames barely move


def test_duration_compresses_timestamps() -> None:
    job = synth.detection_job("short", faces=100, attributes="DEFAULT", duration_ms=4000)
    assert job.video_metadata["DurationMillis"] == 4000
    assert all(0 <= f["Timestamp"] < 4000 for f in job.results)
    with pytest.raises(ValueError, match="do not fit"):
        synth.detection_job("short", faces=5000, attributes="DEFAULT", persons=1, duration_ms=1000)


def test_search_matches() -> None:
    job = synth.search_job("search-shape", persons_elements=300, persons=6, collection_size=8, seed=2)
    assert len(job.results) == 300
    indexes = [p["Person"]["Index"] for p in job.results]
    assert set(indexes) == set(range(6)) and len(indexes) > 6  # indexes recur across timestamps
    match_counts = {p["Person"]["Index"]: len(p["FaceMatches"]) for p in job.results}
    assert 0 in match_counts.values() and 1 in match_counts.values() and 2 in match_counts.values()
    stored: dict[str, dict[str, Any]] = {}
    for element in job.results:
        assert set(element["Person"]["Face"]) == {"BoundingBox", "Landmarks", "Pose", "Quality", "Confidence"}
        sims = [m["Similarity"] for m in element["FaceMatches"]]
        assert sims == sorted(sims, reverse=True) and all(0 <= s <= 100 for s in sims)
        if len(sims) == 2:
            assert sims[0] != sims[1]
            assert element["FaceMatches"][0]["Face"]["FaceId"] != element["FaceMatches"][1]["Face"]["FaceId"]
        for match in element["FaceMatches"]:
            face = match["Face"]
            assert UUID4_RE.match(face["FaceId"]) and UUID4_RE.match(face["ImageId"])
            assert face["IndexFacesModelVersion"] == "7.0"
            assert re.fullmatch(r"employee-\d{2}", face["ExternalImageId"])
            assert stored.setdefault(face["FaceId"], face) == face  # a FaceId's metadata never changes
    # The collection is shared by every search job generated with the same seed.
    other = synth.search_job("search-other", persons_elements=200, seed=2)
    other_ids = {m["Face"]["FaceId"] for p in other.results for m in p["FaceMatches"]}
    assert other_ids <= {f["FaceId"] for f in synth.collection_faces(seed=2)}


def test_demo_jobs_are_realistic() -> None:
    jobs = synth.demo_jobs()
    assert all(re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", j.job_id) for j in jobs)
    statuses = [(j.api, j.job_status) for j in jobs]
    assert statuses.count(("GetFaceDetection", "SUCCEEDED")) == 2
    assert statuses.count(("GetFaceSearch", "SUCCEEDED")) == 2
    assert {s for _, s in statuses} == {"SUCCEEDED", "IN_PROGRESS", "FAILED"}
    assert all(len(j.results) > 2000 for j in jobs if j.api == "GetFaceDetection" and j.results)


def test_fixture_round_trips_and_validates() -> None:
    assert synth.JobFixture.from_dict(SEARCH.to_dict()) == SEARCH
    for bad_id in ("has space", "trailing-newline\n", "x" * 65, ""):
        with pytest.raises(ValueError):
            synth.JobFixture(job_id=bad_id, api="GetFaceDetection")
    with pytest.raises(ValueError):
        synth.JobFixture.from_dict({"job_id": "ok", "api": "GetFaceDetection", "colour": "red"})
