"""Erasure that stays erased: the keyed hashes of erased identifiers, applied at every write that makes an
ingest visible.

`erase` keeps HMAC-SHA256(ERASURE_HASH_KEY, ``kind:value``) of the identifier it removes (and, for an
ExternalImageId or UserId, of the FaceIds found for it) in ``erased_identifiers`` (migration 0013), never the
identifier. Rekognition keeps a job's results for 7 days, and the archive keeps them as long as the rows,
so any later ingest (a duplicate or re-sent notification, a DLQ redrive, `jobs retry`, `backfill`) or a
`reprocess` would store an erased identity again. Each of them goes through the store's switch (one new
ingest key made visible), and just before it, under the job's lock, :func:`apply_to_key` hashes the
identifiers the new key's rows name (collection faces and matches; the raw pages too for a quarantine,
which has no rows) and, for any erased one, removes from that key exactly what `erase` removes (the
erasing logic of worker/lifecycle.py, restricted to the key), its raw pages rewritten. With no erasure
recorded it costs one indexed query; the decoder is not involved.

Without the key nothing can be checked: once erasures exist, a write from Rekognition without
ERASURE_HASH_KEY refuses (ErasureKeyMissing, an infrastructure error: the job is retried, never failed, and
nothing is shown). A `reprocess` rebuilds from the archive, which `erase` rewrote and every write checked
before storing it, so it runs without the key (and checks again with it).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

import asyncpg
import orjson

from worker.archive import ArchivedPage
from worker.errors import ErasureKeyMissing

# One indexed probe (the primary key): is anything erased at all?
_ANY_SQL = "SELECT EXISTS (SELECT 1 FROM erased_identifiers)"
_HITS_SQL = "SELECT selector_hash FROM erased_identifiers WHERE selector_hash = ANY($1::text[])"
_REMEMBER_SQL = ("INSERT INTO erased_identifiers (selector_hash, selector_kind) VALUES ($1, $2) "
                 "ON CONFLICT (selector_hash) DO NOTHING")
# The identifiers a key's rows name: collection faces carry all three; a match names its FaceId.
_FACES_SQL = "SELECT face_id, external_image_id, user_id FROM collection_faces WHERE ingest_id = $1"
_MATCHED_SQL = "SELECT DISTINCT face_id FROM face_matches WHERE ingest_id = $1"
_PAGE_MEMBERS = (("face_id", "FaceId"), ("external_image_id", "ExternalImageId"), ("user_id", "UserId"))

Identity = tuple[str | None, str | None, str | None]  # FaceId, ExternalImageId, UserId


def selector_hash(key: str, kind: str, value: str) -> str:
    """The audit's keyed hash of an identifier: HMAC-SHA256(key, kind:value), hex."""
    return hmac.new(key.encode(), f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


async def remember(conn: asyncpg.Connection, key: str, identifiers: Iterable[tuple[str, str]]) -> None:
    """Keep the hashes of erased ``(kind, value)`` identifiers (idempotent)."""
    rows = [(selector_hash(key, kind, value), kind) for kind, value in identifiers if value]
    if rows:
        await conn.executemany(_REMEMBER_SQL, rows)


async def any_erased(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval(_ANY_SQL))


def missing_key_error() -> ErasureKeyMissing:
    return ErasureKeyMissing("identities have been erased (table erased_identifiers) but ERASURE_HASH_KEY is not "
                             "set: the job's rows cannot be checked against them, so it is not stored; set the "
                             "key the erasures were made with")


def _faces_on_page(body: Any) -> list[Identity]:
    out: list[Identity] = []
    for element in body.get("Persons") or () if isinstance(body, dict) else ():
        for match in (element.get("FaceMatches") or ()) if isinstance(element, dict) else ():
            face = match.get("Face") if isinstance(match, dict) else None
            if isinstance(face, dict):
                values = tuple(v if isinstance(v, str) else None for v in (face.get(m) for _, m in _PAGE_MEMBERS))
                out.append(values)  # type: ignore[arg-type]
    return out


class _Hasher:
    """Keyed hashes of identifiers, each computed once."""

    def __init__(self, key: str) -> None:
        self._key = key
        self._memo: dict[tuple[str, str], str] = {}

    def __call__(self, kind: str, value: str | None) -> str | None:
        if value is None:
            return None
        h = self._memo.get((kind, value))
        if h is None:
            h = self._memo[(kind, value)] = selector_hash(self._key, kind, value)
        return h


async def apply_to_key(conn: asyncpg.Connection, key: int, hash_key: str | None, *, pages_key: int | None = None,
                       scan_pages: bool = False, from_archive: bool = False) -> dict[str, int] | None:
    """Remove every erased identity from ingest key ``key`` before it is made visible; None when none is there.

    The caller holds the job's lock and runs this in a transaction. ``pages_key`` names the key whose raw
    pages become the job's (a reprocess carries its archive over at the switch); ``scan_pages`` reads the
    identifiers from the pages as well (a quarantine has pages and no rows). Returns what was removed, as
    :func:`worker.lifecycle.erase_in_key` counts it. Raises ErasureKeyMissing when erasures exist and
    ``hash_key`` is not set, except ``from_archive`` (a reprocess): the archive it reads was rewritten by
    `erase` and checked by the write that stored it, so without the key it is rebuilt unchecked.
    """
    if not await any_erased(conn):
        return None
    if not hash_key:
        if from_archive:
            return None
        raise missing_key_error()
    faces: list[Identity] = [(r["face_id"], r["external_image_id"], r["user_id"])
                             for r in await conn.fetch(_FACES_SQL, key)]
    faces += [(r["face_id"], None, None) for r in await conn.fetch(_MATCHED_SQL, key)]
    pages_of = key if pages_key is None else pages_key
    if scan_pages:
        for r in await conn.fetch("SELECT encoding, body, body_bytes FROM raw_pages WHERE ingest_id = $1", pages_of):
            page = ArchivedPage(bytes(r["body"]), r["body_bytes"], r["encoding"])
            faces += _faces_on_page(orjson.loads(page.decompress()))
    hashed = _Hasher(hash_key)
    wanted = {h for face in faces for (kind, _), value in zip(_PAGE_MEMBERS, face, strict=True)
              if (h := hashed(kind, value)) is not None}
    if not wanted:
        return None
    hits = {r["selector_hash"] for r in await conn.fetch(_HITS_SQL, list(wanted))}
    if not hits:
        return None

    def erased_face(face: dict[str, Any]) -> bool:
        return any(isinstance(v := face.get(member), str) and hashed(kind, v) in hits
                   for kind, member in _PAGE_MEMBERS)

    face_ids = {face[0] for face in faces if face[0] is not None
                and any(hashed(kind, value) in hits for (kind, _), value in zip(_PAGE_MEMBERS, face, strict=True))}
    # Imported here: lifecycle imports the store, which imports this module.
    from worker.lifecycle import erase_in_key

    return await erase_in_key(conn, key, face_ids, erased_face, pages_key=pages_of)
