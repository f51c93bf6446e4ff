"""Gateway-issued API keys: generated once, stored only as a hash, looked up from memory.

The key store is a shared resource like the state backend: the ``auth`` plugin reads it on
every request (one SHA-256 and one dict lookup), the admin API and CLI write it. Writes go to a
small JSON file (atomic replace) so keys survive a restart; reads never touch disk.

A revoked (or forgotten) key leaves a tombstone: its hash and the revocation time, never the
user. The file, ``{"keys": [...], "revoked": {sha256: time}}``, is this instance's durable
record of both, so the shared copy in Redis (``proxy.keysync``) can be rebuilt from the
instances' files after Redis lost its data, and a stale copy can never bring a revoked key
back: issued keys are the union of every record seen, minus the union of every tombstone.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

KEY_PREFIX = "tw_"


def hash_key(key: str) -> str:
    """SHA-256 hex of a key: keys are long random tokens, so a fast unsalted hash is safe."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(slots=True, frozen=True)
class KeyRecord:
    id: str
    user: str
    tier: str
    sha256: str
    created: float
    source: str = "api"  # "api" (admin API/CLI) or "policy" (declared by hash)

    def public(self) -> dict[str, object]:
        """What the admin API may show: never the hash."""
        return {
            "id": self.id,
            "user": self.user,
            "tier": self.tier,
            "created": self.created,
            "source": self.source,
        }


class KeyStore:
    """Keys by hash, in memory, persisted to ``path`` (None keeps them in memory only)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._by_hash: dict[str, KeyRecord] = {}
        self._by_id: dict[str, KeyRecord] = {}
        self._revoked: dict[str, float] = {}  # tombstones: sha256 -> revocation time
        if path is not None and path.exists():
            data = orjson.loads(path.read_bytes())
            if isinstance(data, list):  # the format before tombstones: a list of records
                data = {"keys": data}
            self._revoked = {str(s): float(t) for s, t in data.get("revoked", {}).items()}
            for item in data.get("keys", []):
                if item["sha256"] not in self._revoked:
                    self._add(KeyRecord(**item))

    def _add(self, rec: KeyRecord) -> None:
        self._by_hash[rec.sha256] = rec
        self._by_id[rec.id] = rec

    def _remove(self, rec: KeyRecord) -> None:
        self._by_id.pop(rec.id, None)
        self._by_hash.pop(rec.sha256, None)

    def _bury(self, rec: KeyRecord, when: float | None = None) -> None:
        """Remove a key for good: its tombstone outlives every copy of its record."""
        self._remove(rec)
        if rec.source == "api":
            self._revoked.setdefault(rec.sha256, time.time() if when is None else when)

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        items = [asdict(r) for r in self._by_id.values() if r.source == "api"]
        data = {"keys": items, "revoked": self._revoked}
        tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        os.chmod(tmp, 0o600)
        tmp.replace(self.path)

    def create(self, user: str, tier: str) -> tuple[KeyRecord, str]:
        """A new key for ``user`` on ``tier``; the secret is returned here and never again."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        rec = KeyRecord(
            id="key_" + secrets.token_hex(6),
            user=user,
            tier=tier,
            sha256=hash_key(key),
            created=time.time(),
        )
        self._add(rec)
        self._save()
        return rec, key

    def declare(self, id: str, user: str, tier: str, sha256: str) -> None:
        """A key managed as code (the policy lists its hash); not written to the file."""
        self._add(
            KeyRecord(
                id=id, user=user, tier=tier, sha256=sha256.lower(), created=0.0, source="policy"
            )
        )

    def get(self, key_id: str) -> KeyRecord | None:
        return self._by_id.get(key_id)

    def issued_to(self, user: str) -> list[KeyRecord]:
        """The user's keys issued through the admin API or CLI (not those of the policy)."""
        return [r for r in self._by_id.values() if r.user == user and r.source == "api"]

    def revoke(self, key_id: str) -> KeyRecord | None:
        """Remove a key; returns its record, or None when there is no such key."""
        rec = self._by_id.get(key_id)
        if rec is None:
            return None
        self._bury(rec)
        self._save()
        return rec

    def forget_user(self, user: str) -> tuple[list[KeyRecord], int]:
        """Delete the user's issued keys; returns (deleted, kept): keys declared in the policy
        are managed there and stay until the policy drops them."""
        issued = self.issued_to(user)
        for rec in issued:
            self._bury(rec)
        if issued:
            self._save()
        kept = sum(1 for r in self._by_id.values() if r.user == user)  # the policy's
        return issued, kept

    # ---- changes made by other instances (proxy.keysync) --------------------------------

    @property
    def revoked(self) -> dict[str, float]:
        """The tombstones (sha256 -> revocation time); read-only."""
        return dict(self._revoked)

    def merge(
        self, records: Iterable[KeyRecord], revoked: dict[str, float]
    ) -> tuple[list[KeyRecord], dict[str, float]]:
        """Take in the shared copy (its records and tombstones) and return what the copy
        lacks: (records, tombstones) to put back. A tombstone from either side wins over a
        record from either side; nothing is dropped only because the copy lacks it (an empty
        Redis is a lost copy, not a revocation). The file is written only on a change."""
        changed = False
        for sha, when in revoked.items():
            if sha not in self._revoked:
                self._revoked[sha] = when
                changed = True
            rec = self._by_hash.get(sha)
            if rec is not None and rec.source == "api":
                self._remove(rec)
                changed = True
        in_copy = set()
        for rec in records:
            in_copy.add(rec.sha256)
            if rec.sha256 not in self._revoked and self._by_hash.get(rec.sha256) != rec:
                self._add(rec)
                changed = True
        if changed:
            self._save()
        missing = [r for r in self._by_id.values() if r.source == "api" and r.sha256 not in in_copy]
        buried = {s: t for s, t in self._revoked.items() if s not in revoked}
        return missing, buried

    def apply_remote(self, rec: KeyRecord) -> None:
        if rec.sha256 not in self._revoked and self._by_hash.get(rec.sha256) != rec:
            self._add(rec)
            self._save()

    def drop_remote(self, sha256: str) -> None:
        rec = self._by_hash.get(sha256)
        if rec is not None and rec.source == "api":
            self._bury(rec)
            self._save()
        elif rec is None and sha256 not in self._revoked:
            self._revoked[sha256] = time.time()  # announced before its record reached us
            self._save()

    def lookup(self, key: str) -> KeyRecord | None:
        """The record of a presented key; the digest is compared in constant time."""
        digest = hash_key(key)
        rec = self._by_hash.get(digest)
        if rec is None or not hmac.compare_digest(rec.sha256, digest):
            return None
        return rec

    def set_declared(self, records: list[tuple[str, str, str, str]]) -> None:
        """Replace the policy-declared keys (id, user, tier, sha256) after a policy load."""
        for rec in [r for r in self._by_id.values() if r.source == "policy"]:
            self._remove(rec)
        for id, user, tier, sha256 in records:
            self.declare(id, user, tier, sha256)

    def list(self) -> list[KeyRecord]:
        return sorted(self._by_id.values(), key=lambda r: (r.created, r.id))
