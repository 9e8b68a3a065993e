"""What logs may say about a video or an SQS message body: enough to triage, never the name.

Video object names often name people (``interviews/anna.m4v``), and message bodies carry them too (a
notification's ``Video.S3ObjectName``). Log lines therefore carry the bucket, the extension and a short
SHA-256 of the object key instead of the key, and a message body's size, a short SHA-256 and its top-level
member names instead of its text. The hash is plain, not keyed: whoever can read the database finds the
row it stands for with one SQL statement (docs/privacy.md), and whoever holds the message recomputes it;
a reader of the logs alone cannot read a name, but can confirm a name guessed exactly.

Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson

# 48 bits: collisions are negligible among one deployment's videos, and the value stays short.
HASH_CHARS = 12
# Extensions worth keeping (the container formats Rekognition Video reads, and a few more); any other
# suffix is dropped, since "video.anna" would carry a name.
EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".avi", ".mkv", ".mpg", ".mpeg", ".webm"})
# Member names are shown, values never; this many at most, each cut to this length.
MAX_KEYS = 20
MAX_KEY_CHARS = 40


def short_hash(text: str) -> str:
    """The first HASH_CHARS hex digits of the SHA-256 of `text` (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]


def hashed_key(key: str) -> str:
    """``sha256:3f9a1c2e7b4d.m4v``: an object key hashed, its extension kept."""
    dot = key.rfind(".")
    extension = key[dot:].lower() if dot >= 0 and key[dot:].lower() in EXTENSIONS else ""
    return f"sha256:{short_hash(key)}{extension}"


def video(bucket: str | None, key: str | None) -> str:
    """``s3://bucket/sha256:3f9a1c2e7b4d.m4v``: the bucket as it is, the key hashed."""
    return f"s3://{bucket or ''}/{hashed_key(key) if key is not None else ''}"


def body_fields(body: str) -> dict[str, Any]:
    """Log fields that describe an SQS message body without its text: its size, a short hash to match it
    against the message in the queue or the dead-letter queue, and, when it is a JSON object, its top-level
    member names, which tell an SNS envelope, a Rekognition notification and a stranger apart."""
    fields: dict[str, Any] = {"body_bytes": len(body.encode("utf-8", "surrogatepass")), "body_sha256": short_hash(body)}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        fields["body_json"] = False
        return fields
    fields["body_json"] = True
    if isinstance(doc, dict):
        fields["body_keys"] = [str(key)[:MAX_KEY_CHARS] for key in list(doc)[:MAX_KEYS]]
    return fields


def redacted_body(body: str) -> str:
    """The body with the video's object name hashed (a notification's ``Video.S3ObjectName``, also inside an
    SNS envelope's ``Message``), for showing a dead-lettered message to an operator; a body that is not JSON
    is returned as it is, since nothing in it is known to be a name."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(doc, dict):
        return body
    inner = doc.get("Message")
    if isinstance(inner, str):
        try:
            notification = orjson.loads(inner)
        except orjson.JSONDecodeError:
            return body
        if not isinstance(notification, dict) or not _hash_video(notification):
            return body
        doc["Message"] = json.dumps(notification, ensure_ascii=False)
    elif not _hash_video(doc):
        return body
    return json.dumps(doc, ensure_ascii=False)


def _hash_video(notification: dict[str, Any]) -> bool:
    """Replace the notification's S3ObjectName by its hashed form; whether there was one."""
    video_ref = notification.get("Video")
    if not isinstance(video_ref, dict) or not isinstance(video_ref.get("S3ObjectName"), str):
        return False
    video_ref["S3ObjectName"] = hashed_key(video_ref["S3ObjectName"])
    return True
