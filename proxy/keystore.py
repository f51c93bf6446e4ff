"""Gateway-issued API keys: generated once, stored only as a hash, looked up from memory.

The key store is a shared resource like the state backend: the ``auth`` plugin reads it on
every request (one SHA-256 and one dict lookup), the admin API and CLI write it. Writes go to a
small JSON file (atomic replace) so keys survive a restart; reads never touch disk.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
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
        if path is not None and path.exists():
            for item in orjson.loads(path.read_bytes()):
                self._add(KeyRecord(**item))

    def _add(self, rec: KeyRecord) -> None:
        self._by_hash[rec.sha256] = rec
        self._by_id[rec.id] = rec

    def _remove(self, rec: KeyRecord) -> None:
        self._by_id.pop(rec.id, None)
        self._by_hash.pop(rec.sha256, None)

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        items = [asdict(r) for r in self._by_id.values() if r.source == "api"]
        tmp.write_bytes(orjson.dumps(items, option=orjson.OPT_INDENT_2))
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
        self._remove(rec)
        self._save()
        return rec

    def forget_user(self, user: str) -> tuple[list[KeyRecord], int]:
        """Delete the user's issued keys; returns (deleted, kept): keys declared in the policy
        are managed there and stay until the policy drops them."""
        issued = self.issued_to(user)
        for rec in issued:
            self._remove(rec)
        if issued:
            self._save()
        kept = sum(1 for r in self._by_id.values() if r.user == user)  # the policy's
        return issued, kept

    # ---- changes made by other instances (proxy.keysync) --------------------------------

    def replace_issued(self, records: list[KeyRecord]) -> None:
        """Make the issued keys exactly ``records`` (policy-declared keys stay); the file is
        written only when that changed something (a periodic resync usually does not)."""
        current = [r for r in self._by_id.values() if r.source == "api"]
        if set(current) == set(records):
            return
        for rec in current:
            self._remove(rec)
        for rec in records:
            self._add(rec)
        self._save()

    def apply_remote(self, rec: KeyRecord) -> None:
        if self._by_hash.get(rec.sha256) != rec:
            self._add(rec)
            self._save()

    def drop_remote(self, sha256: str) -> None:
        rec = self._by_hash.get(sha256)
        if rec is not None and rec.source == "api":
            self._remove(rec)
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
