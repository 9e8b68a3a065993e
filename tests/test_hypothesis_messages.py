"""Arbitrary SQS bodies: parse_message_body returns a usable JobRef or raises InvalidInput, nothing else;
through a real queue, every unusable body ends in the dead-letter queue and the worker exits 0.
"""

from __future__ import annotations

import json
import random
import string
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability import WorkerProcess, queue_counts, take_all, worker_env
from worker.errors import InvalidInput
from worker.local.sqs import create_queue_with_dlq
from worker.messages import JOB_ID_RE, MAX_BODY_BYTES, Api, JobRef, parse_backfill_line, parse_message_body

API_SPELLINGS = ["GetFaceDetection", "GetFaceSearch", "StartFaceDetection", "StartFaceSearch", "FACE_DETECTION",
                 "FACE_SEARCH", "face_search", " StartFaceSearch "]
STATUSES = ["SUCCEEDED", "FAILED", "ERROR", "IN_PROGRESS"]
FIELDS = ["JobId", "API", "Status", "Timestamp", "JobTag", "Video"]

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
JSON_ANY = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                                   inner, max_size=4),
                        max_leaves=10)
JOB_IDS = st.from_regex(JOB_ID_RE, fullmatch=True)
VALID_TIMESTAMPS = st.integers(1, 253_402_300_799_999)


def dumps(value: Any) -> str:
    # The standard library's encoder: unlike orjson it writes integers of any size, as a hostile sender may.
    return json.dumps(value, ensure_ascii=False)


@st.composite
def valid_notifications(draw: st.DrawFn) -> dict[str, Any]:
    note: dict[str, Any] = {"JobId": draw(JOB_IDS), "API": draw(st.sampled_from(API_SPELLINGS))}
    optional = {"Status": st.sampled_from(STATUSES), "Timestamp": VALID_TIMESTAMPS,
                "JobTag": st.from_regex(r"[a-zA-Z0-9_.\-:+=/]{1,1024}", fullmatch=True),
                "Video": st.fixed_dictionaries({}, optional={"S3Bucket": st.text(min_size=3, max_size=255),
                                                             "S3ObjectName": st.text(min_size=1, max_size=1024)})}
    for name, strategy in optional.items():
        if draw(st.booleans()):
            note[name] = draw(strategy)
    return note


@st.composite
def wrong_typed_notifications(draw: st.DrawFn) -> dict[str, Any]:
    """Every field present or not, each with a value of any JSON type (sometimes the right one)."""
    right = draw(valid_notifications())
    out: dict[str, Any] = {}
    for name in FIELDS:
        choice = draw(st.sampled_from(["absent", "right", "wrong"]))
        if choice == "right" and name in right:
            out[name] = right[name]
        elif choice == "wrong":
            out[name] = draw(JSON_ANY)
    return out


def nested(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


HUGE = st.builds(lambda n, c: c * n, st.integers(MAX_BODY_BYTES - 10, MAX_BODY_BYTES + 10),
                 st.sampled_from(["a", " ", "{", "[", '"']))
DEEP = st.builds(nested, st.integers(1, 3000), st.sampled_from(["list", "dict"]))
DEEP_INSIDE = st.builds(lambda note, depth: dumps({**note, "Video": "@"}).replace('"@"', nested(depth, "dict")),
                        valid_notifications(), st.integers(10, 1200))


def envelope(message: Any) -> str:
    return dumps({"Type": "Notification", "MessageId": "m", "TopicArn": "arn:aws:sns:us-east-1:1:t",
                  "Message": message})


BAD_ENVELOPES = st.one_of(
    JSON_ANY.map(envelope),  # Message of any type
    st.text(max_size=50).map(envelope),  # Message a string that is not a notification
    wrong_typed_notifications().map(lambda n: envelope(dumps(n))),
    valid_notifications().map(lambda n: envelope(envelope(dumps(n)))),  # an envelope inside an envelope
    DEEP.map(envelope),
)

HOSTILE_BODIES: st.SearchStrategy[str | bytes] = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),  # lone surrogates included
    JSON_ANY.map(dumps),
    wrong_typed_notifications().map(dumps),
    HUGE, DEEP, DEEP_INSIDE, BAD_ENVELOPES,
    st.binary(max_size=200).map(lambda b: b'{"JobId": "' + b + b'", "API": "StartFaceSearch"}'),
)


def assert_usable(ref: JobRef) -> None:
    """A JobRef the worker can act on and store: nothing in it can fail a database write."""
    assert JOB_ID_RE.fullmatch(ref.job_id)
    assert isinstance(ref.api, Api)
    assert ref.notified_status in (None, *STATUSES)
    if ref.notified_at_ms is not None:
        assert type(ref.notified_at_ms) is int
        datetime.fromtimestamp(ref.notified_at_ms / 1000, tz=UTC)  # what the store does with it
    for text in (ref.job_tag, ref.video_bucket, ref.video_name):
        assert text is None or (type(text) is str and "\x00" not in text and 0 < len(text) <= 1024)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(HOSTILE_BODIES)
def test_any_body_gives_a_usable_job_ref_or_invalid_input(body: str | bytes) -> None:
    try:
        ref = parse_message_body(body)
    except InvalidInput as exc:
        assert str(exc) and len(str(exc)) < 400
        return
    assert_usable(ref)


@settings(max_examples=200, deadline=None)
@given(valid_notifications(), st.booleans(), st.booleans())
def test_valid_notifications_parse_in_every_form(note: dict[str, Any], wrap: bool, as_bytes: bool) -> None:
    text = envelope(dumps(note)) if wrap else dumps(note)
    body: str | bytes = text.encode() if as_bytes else text
    ref = parse_message_body(body)
    assert_usable(ref)
    assert ref.job_id == note["JobId"]
    assert ref.api is (Api.FACE_SEARCH if "search" in note["API"].lower() else Api.FACE_DETECTION)
    assert ref.notified_status == note.get("Status")
    assert ref.notified_at_ms == note.get("Timestamp")
    assert ref.job_tag == note.get("JobTag")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.sampled_from([None, Api.FACE_DETECTION, Api.FACE_SEARCH]))
def test_any_backfill_line_gives_a_job_ref_none_or_invalid_input(line: str, default: Api | None) -> None:
    try:
        ref = parse_backfill_line(line, default)
    except InvalidInput:
        return
    assert ref is None or (JOB_ID_RE.fullmatch(ref.job_id) and isinstance(ref.api, Api))


@pytest.mark.parametrize(("field", "value"), [
    ("Timestamp", 2**62), ("Timestamp", 10**30), ("Timestamp", -5), ("Timestamp", True), ("JobTag", "a\x00b"),
    ("JobTag", "t" * 5000), ("Video", {"S3Bucket": "b\x00", "S3ObjectName": ["x"]}),
])
def test_unstorable_optional_members_are_dropped_not_fatal(field: str, value: Any) -> None:
    """A FAILED notification is recorded from these members; none may break that write."""
    ref = parse_message_body(dumps({"JobId": "j-1", "API": "StartFaceSearch", "Status": "FAILED", field: value}))
    assert_usable(ref)
    assert ref.notified_status == "FAILED"


# --- through moto's SQS into a real worker process -----------------------------------------------

# SQS refuses bodies with characters outside this set (and over 256 KiB): those cannot be sent at all.
_SQS_CHARS = [chr(c) for c in (0x9, 0xA, 0xD, *range(0x20, 0x7F), 0xA0, 0xE9, 0x4E2D, 0xFFFD, 0x1F600)]


def hostile_corpus(seed: int) -> tuple[list[str], list[str]]:
    """(unusable bodies that must end in the DLQ, parseable but hostile ones that must be handled)."""
    rng = random.Random(seed)

    def junk(n: int) -> str:
        return "".join(rng.choice(_SQS_CHARS) for _ in range(n))

    unusable = [
        "", " ", "null", "[]", "{}", "0", '"just a string"', junk(50), junk(2000),
        "{" * 5000, nested(17, "list"), nested(600, "dict"), nested(20, "dict"),
        "x" * (MAX_BODY_BYTES - 100),  # as large as SQS allows
        dumps({"JobId": "x" * 65, "API": "StartFaceSearch"}),
        dumps({"JobId": "../../etc/passwd", "API": "StartFaceSearch"}),
        dumps({"JobId": "j'; DROP TABLE jobs; --", "API": "StartFaceSearch"}),
        dumps({"JobId": ["j-1"], "API": "StartFaceSearch"}),
        dumps({"JobId": "j-1", "API": "StartLabelDetection"}),
        dumps({"JobId": "j-1", "API": {"$gt": ""}}),
        dumps({"JobId": "j-1", "API": "StartFaceSearch", "Status": "DONE"}),
        dumps({"JobId": "j-1", "API": "StartFaceSearch", "Status": ["SUCCEEDED"]}),
        envelope({"JobId": "j-1", "API": "StartFaceSearch"}),
        envelope("{not json"),
        envelope(envelope(dumps({"JobId": "j-1", "API": "StartFaceSearch"}))),
        envelope(nested(40, "list")),
    ]
    for _ in range(10):  # notifications with random wrong types in random fields
        note: dict[str, Any] = {"JobId": junk(rng.randint(0, 70)), "API": rng.choice([junk(8), 7, None, [], {}])}
        for name in rng.sample(FIELDS[2:], rng.randint(0, 4)):
            note[name] = rng.choice([junk(10), -1, 1.5, [junk(3)], {"k": junk(3)}, None, True])
        unusable.append(dumps(note))
    suffix = "".join(rng.choice(string.ascii_lowercase) for _ in range(12))
    parseable = [
        dumps({"JobId": f"hostile-tag-{suffix}", "API": "StartFaceSearch", "Status": "FAILED", "JobTag": "a\x00b",
               "Timestamp": 10**30, "Video": {"S3Bucket": "b" * 5000, "S3ObjectName": 1}}),
        dumps({"JobId": f"hostile-gone-{suffix}", "API": "FACE_DETECTION", "Status": "SUCCEEDED",
               "Timestamp": 2**62, "Extra": json.loads(nested(10, "dict"))}),
    ]
    for body in unusable:
        with pytest.raises(InvalidInput):
            parse_message_body(body)
    return unusable, parseable


async def test_hostile_bodies_through_sqs_end_in_the_dlq_and_the_worker_exits_0(
    sqs: Any, moto_url: str, db_url: str, db: asyncpg.Connection, rekognition_endpoint: Any,
) -> None:
    unusable, parseable = hostile_corpus(seed=8)
    # maxReceiveCount 1: an unusable message released once is moved to the DLQ on its next receive.
    queue_url, dlq_url = await create_queue_with_dlq(sqs, f"hostile-{random.randrange(10**9)}",
                                                     visibility_timeout_s=5, max_receive_count=1)
    for body in [*unusable, *parseable]:
        await sqs.send_message(QueueUrl=queue_url, MessageBody=body)
    proc = WorkerProcess(["run", "--exit-when-idle"], worker_env(
        DATABASE_URL=db_url, QUEUE_URL=queue_url, AWS_ENDPOINT_URL_SQS=moto_url,
        AWS_ENDPOINT_URL_REKOGNITION=rekognition_endpoint.url))
    assert proc.wait(120) == 0, proc.output()[-3000:]
    assert "Traceback" not in proc.output()
    assert await queue_counts(sqs, queue_url) == (0, 0, 0)
    dead = [m["Body"] for m in await take_all(sqs, dlq_url)]
    assert sorted(dead) == sorted(unusable)
    # The parseable ones were acted on: recorded failed (from the notification, or ResourceNotFound).
    for body in parseable:
        job_id = orjson.loads(body)["JobId"]
        row = await db.fetchrow("SELECT ingest_state, job_tag, video_bucket FROM jobs WHERE job_id = $1", job_id)
        assert row is not None and row["ingest_state"] == "failed", (job_id, row)
        assert row["job_tag"] is None and row["video_bucket"] is None
