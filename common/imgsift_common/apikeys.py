"""API keys: created once, shown once, stored only as a hash.

A key is ``isk_`` plus 256 random bits (``secrets.token_urlsafe(32)``). Redis keeps the
SHA-256 of the whole key, never the key: a leaked Redis dump holds nothing a client can
send. A fast hash is enough here (unlike passwords) because a key is random with 256 bits
of entropy: there is no dictionary to try. A request's key is found by hashing what it
sent and reading that one record, so lookups are one GET and no key is compared in a loop.

Layout: ``imgsift:apikey:{sha256}`` -> the :class:`ApiKey` record as JSON;
``imgsift:apikeys`` -> hash of key id -> sha256 (listing and revoking by id).

Every job records the id of the key that created it (``Job.owner``); the API shows and
changes a job only for that key. Admin keys also manage keys and see operator views
(dead letters), but see no other key's jobs either.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from imgsift_common.messages import utcnow

KEY_PREFIX = "isk_"
RATE_LIMIT_PATTERN = r"^\d+\s*(/|per)\s*\d*\s*(second|minute|hour|day)s?$"


class ApiKey(BaseModel):
    """What the API knows about a key: never the key itself."""

    id: str = Field(pattern=r"^[0-9a-f]{16}$", description="public id: names the key in listings and job owners")
    name: str = Field(max_length=200, description="who or what the key is for")
    admin: bool = Field(False, description="may create and revoke keys and read operator views")
    rate_limit: str | None = Field(
        None,
        pattern=RATE_LIMIT_PATTERN,
        description="requests allowed, e.g. '600/minute'; None: the API's default (IMGSIFT_API_RATE_LIMIT)",
    )
    created_at: datetime = Field(default_factory=utcnow)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def looks_like_key(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9_\-]{16,200}", value))


class ApiKeyStore:
    """Keys in Redis (a redis-py client with ``decode_responses=True``)."""

    def __init__(self, client: Any, prefix: str = "imgsift") -> None:
        self.r = client
        self.prefix = prefix

    def _record(self, digest: str) -> str:
        return f"{self.prefix}:apikey:{digest}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}:apikeys"

    def create(self, name: str, *, admin: bool = False, rate_limit: str | None = None) -> tuple[ApiKey, str]:
        """A new key: its record and the key itself, which is not stored and cannot be shown again."""
        key = new_key()
        return self.add(key, name, admin=admin, rate_limit=rate_limit), key

    def add(self, key: str, name: str, *, admin: bool = False, rate_limit: str | None = None) -> ApiKey:
        """Register ``key`` (a key made elsewhere, e.g. the operator's bootstrap key); idempotent.

        The id is derived from the hash, so registering the same key again (every API start
        does it for the bootstrap key) finds the same record and owner.
        """
        if not looks_like_key(key):
            raise ValueError("an API key is 16 to 200 characters of letters, digits, '_' and '-'")
        digest = hash_key(key)
        record = ApiKey(id=digest[:16], name=name, admin=admin, rate_limit=rate_limit)
        if self.r.set(self._record(digest), record.model_dump_json(), nx=True):
            self.r.hset(self._index, record.id, digest)
            return record
        existing = self.r.get(self._record(digest))
        return ApiKey.model_validate_json(existing) if existing else record

    def lookup(self, key: str) -> ApiKey | None:
        """The record of the key a request sent, or None for an unknown or revoked key."""
        if not looks_like_key(key):
            return None
        raw = self.r.get(self._record(hash_key(key)))
        return ApiKey.model_validate_json(raw) if raw else None

    def list(self) -> list[ApiKey]:
        digests = self.r.hvals(self._index)
        raws = self.r.mget([self._record(d) for d in digests]) if digests else []
        found = [ApiKey.model_validate_json(raw) for raw in raws if raw]
        return sorted(found, key=lambda k: k.created_at)

    def revoke(self, key_id: str) -> bool:
        digest = self.r.hget(self._index, key_id)
        if digest is None:
            return False
        self.r.delete(self._record(digest))
        self.r.hdel(self._index, key_id)
        return True
