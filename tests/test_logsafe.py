"""worker/logsafe.py: what logs say about videos and message bodies carries no name, and stays useful for
triage (the bucket, the extension, a hash that the database or the message itself reproduces)."""

from __future__ import annotations

import hashlib
import json

import asyncpg

from worker import logsafe

ANNA = "interviews/2024/anna-kowalski.M4V"


def test_a_video_is_its_bucket_extension_and_a_short_hash_of_its_key() -> None:
    shown = logsafe.video("media", ANNA)
    assert shown == f"s3://media/sha256:{hashlib.sha256(ANNA.encode()).hexdigest()[:12]}.m4v"
    assert "anna" not in shown.lower() and "interviews" not in shown
    assert logsafe.video("media", "no-extension") == f"s3://media/sha256:{logsafe.short_hash('no-extension')}"
    # A suffix that is not a video extension could carry a name: dropped.
    assert logsafe.video("m", "clip.anna") == f"s3://m/sha256:{logsafe.short_hash('clip.anna')}"
    assert logsafe.video("m", None) == "s3://m/"


def test_a_body_is_described_by_size_hash_and_member_names_only() -> None:
    inner = {"JobId": "j-1", "Status": "SUCCEEDED", "API": "StartFaceSearch",
             "Video": {"S3ObjectName": ANNA, "S3Bucket": "media"}}
    envelope = json.dumps({"Type": "Notification", "TopicArn": "arn:aws:sns:us-east-1:1:t",
                           "Message": json.dumps(inner)})
    fields = logsafe.body_fields(envelope)
    assert fields == {"body_bytes": len(envelope), "body_sha256": hashlib.sha256(envelope.encode()).hexdigest()[:12],
                      "body_json": True, "body_keys": ["Type", "TopicArn", "Message"]}
    assert "anna" not in json.dumps(fields).lower()
    assert logsafe.body_fields("anna kowalski's video")["body_json"] is False
    assert "anna" not in json.dumps(logsafe.body_fields("anna kowalski's video"))
    hostile = json.dumps({f"k{i}" + "x" * 100: i for i in range(50)})
    keys = logsafe.body_fields(hostile)["body_keys"]
    assert len(keys) == logsafe.MAX_KEYS and all(len(k) == logsafe.MAX_KEY_CHARS for k in keys)


def test_a_dead_lettered_body_is_shown_with_its_video_name_hashed() -> None:
    inner = {"JobId": "j-1", "API": "StartFaceSearch", "Video": {"S3ObjectName": ANNA, "S3Bucket": "media"}}
    for body in (json.dumps(inner), json.dumps({"Type": "Notification", "Message": json.dumps(inner)})):
        shown = logsafe.redacted_body(body)
        assert "anna" not in shown.lower() and "j-1" in shown and "media" in shown
        assert f"sha256:{logsafe.short_hash(ANNA)}.m4v" in shown
    # Nothing known to be a name: shown as sent (the operator needs it to find the producer).
    for body in ("not json", "[1, 2]", '{"JobId": "x"}', '{"Type": "Notification", "Message": "oops"}'):
        assert logsafe.redacted_body(body) == body


async def test_the_database_finds_the_row_a_logged_hash_stands_for(db: asyncpg.Connection) -> None:
    """The SQL docs/privacy.md gives the operator: PostgreSQL's sha256() reproduces the logged hash."""
    found = await db.fetchval("SELECT left(encode(sha256(convert_to($1::text, 'UTF8')), 'hex'), 12)", ANNA)
    assert found == logsafe.short_hash(ANNA)
