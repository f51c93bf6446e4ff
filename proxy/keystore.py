"""Gateway-issued API keys: generated once, stored only as a hash, looked up from memory.

The key store is a shared resource like the state backend: the ``auth`` plugin reads it on
every request (one SHA-256 and one dict lookup), the admin API and CLI write it. Writes go to a
small JSON file (atomic replace) so keys survive a restart; reads never touch disk.

A revoked (or forgotten) key leaves a tombstone: its hash and the revocation time, never the
user. The file, ``{"keys": [...], "revoked": {sha256: time}}``, is this instance's durable
record of both, so the shared copy in Redis (``proxy.keysync``) can be rebuilt from the
instances' files after Redis lost its data, and a stale copy can never bring a revoked key
back: issued keys are the union of every record seen, minus the union of every tombstone.

A record also carries the key's lifecycle (``proxy.keyspec`` validates it): a name, an expiry,
scopes (the models and features it may use, within its plan's), its own requests per minute,
labels copied into usage rows, and a monthly budget the budget plugin enforces. A change bumps
``updated``, and the newer version of a record wins wherever two meet (a sync, an
announcement). Rotation gives a key a new secret under the same id: the old secret's record
stays, retired (``grace_until``), and is accepted until its grace period ends, then refused as
expired by rotation. Once its grace period has ended a retired secret is of no use to anyone,
so it is pruned (``prune``): when the file is loaded, at the next rotation, every
``PRUNE_EVERY`` seconds (off the request path), and wherever two copies meet (a sync, an
announcement: an expired one is never taken in, nor put back into Redis). No tombstone is
needed: the expiry is in the record itself, so every instance reaches the same verdict. The
``auth`` plugin refuses an expired one by its ``grace_until`` whether or not it was pruned
yet. Files of older versions (no lifecycle fields) load as before.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson

KEY_PREFIX = "tw_"
PRUNE_EVERY = 60.0
"""Seconds between two prunings of retired secrets whose grace period ended."""


def hash_key(key: str) -> str:
    """SHA-256 hex of a key: keys are long random tokens, so a fast unsalted hash is safe."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(slots=True, frozen=True)
class KeyRecord:
    """One secret of a key. Times are Unix seconds; ``None`` means "not set" (no expiry, every
    model of the plan, the plan's rate, no budget)."""

    id: str
    user: str
    tier: str
    sha256: str
    created: float
    source: str = "api"  # "api" (admin API/CLI) or "policy" (declared by hash)
    name: str = ""
    expires_at: float | None = None
    models: tuple[str, ...] | None = None  # scope: the models the key may use
    features: tuple[str, ...] | None = None  # scope: the features (X-Tollway-Feature)
    rpm: int | None = None  # the key's own requests per minute, below its plan's
    labels: dict[str, str] = field(default_factory=dict)  # copied into usage rows
    budget_usd: float | None = None  # a monthly budget of this key (the budget plugin's)
    updated: float = 0.0  # the last change: the newer version of a record wins
    rotated_at: float | None = None  # when this secret replaced the previous one
    grace_until: float | None = None  # set on a retired secret: accepted until then
    attrs: dict[str, Any] = field(init=False, repr=False, compare=False)
    """What ``Principal.attrs`` carries for this key, computed once (read-only)."""

    def __post_init__(self) -> None:
        # JSON gives lists; tuples keep records equal however they were read
        if self.models is not None and not isinstance(self.models, tuple):
            object.__setattr__(self, "models", tuple(self.models))
        if self.features is not None and not isinstance(self.features, tuple):
            object.__setattr__(self, "features", tuple(self.features))
        if self.labels is None:
            object.__setattr__(self, "labels", {})
        attrs: dict[str, Any] = {}
        if self.name:
            attrs["name"] = self.name
        if self.expires_at is not None:
            attrs["expires_at"] = self.expires_at
        if self.models is not None or self.features is not None:
            attrs["scopes"] = self.scopes()
        if self.rpm is not None:
            attrs["rpm"] = self.rpm
        if self.labels:
            attrs["labels"] = self.labels
        if self.budget_usd is not None:
            attrs["budget_usd"] = self.budget_usd
        object.__setattr__(self, "attrs", attrs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KeyRecord:
        """A record from its JSON form; fields this version does not know are ignored (a
        newer instance sharing the same Redis may write more)."""
        known = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (keys.json, Redis): every field but the derived ``attrs``."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        out["labels"] = dict(self.labels)
        return out

    def scopes(self) -> dict[str, list[str] | None]:
        """The scopes as the admin API shows them (null: everything the plan allows)."""
        return {
            "models": list(self.models) if self.models is not None else None,
            "features": list(self.features) if self.features is not None else None,
        }

    @property
    def retired(self) -> bool:
        """A secret replaced by a rotation (accepted until ``grace_until``)."""
        return self.grace_until is not None

    def spent(self, now: float) -> bool:
        """A retired secret whose grace period has ended: refused, and pruned."""
        return self.grace_until is not None and self.grace_until <= now

    def public(self) -> dict[str, object]:
        """What the admin API may show: never the hash."""
        return {
            "id": self.id,
            "user": self.user,
            "tier": self.tier,
            "created": self.created,
            "source": self.source,
            "name": self.name,
            "expires_at": self.expires_at,
            "scopes": self.scopes(),
            "rpm": self.rpm,
            "labels": dict(self.labels),
            "budget_usd": self.budget_usd,
            "updated": self.updated,
            "rotated_at": self.rotated_at,
        }


def _current_first(a: KeyRecord, b: KeyRecord) -> bool:
    """Whether ``a`` is a later secret of the same key than ``b``."""
    return (a.rotated_at or a.created, a.sha256) > (b.rotated_at or b.created, b.sha256)


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
            now = time.time()
            spent = False
            for item in data.get("keys", []):
                if item["sha256"] not in self._revoked:
                    rec = KeyRecord.from_dict(item)
                    if rec.spent(now):
                        spent = True
                    else:
                        self._add(rec)
            if spent:
                self._save()

    def _add(self, rec: KeyRecord) -> None:
        """Index a record: every secret by hash; by id, the key's current secret (a retired
        one only while the secret that replaced it has not arrived)."""
        self._by_hash[rec.sha256] = rec
        cur = self._by_id.get(rec.id)
        if cur is None or cur.sha256 == rec.sha256:
            if rec.retired and cur is not None:
                successor = self._successor(rec)
                self._by_id[rec.id] = successor or rec
            else:
                self._by_id[rec.id] = rec
        elif not rec.retired and (cur.retired or _current_first(rec, cur)):
            self._by_id[rec.id] = rec

    def _successor(self, rec: KeyRecord) -> KeyRecord | None:
        """The current secret of ``rec``'s key other than ``rec``, if this store has it."""
        best = None
        for other in self._by_hash.values():
            if other.id == rec.id and not other.retired and other.sha256 != rec.sha256:
                if best is None or _current_first(other, best):
                    best = other
        return best

    def _remove(self, rec: KeyRecord) -> None:
        self._by_hash.pop(rec.sha256, None)
        cur = self._by_id.get(rec.id)
        if cur is not None and cur.sha256 == rec.sha256:
            del self._by_id[rec.id]
            rest = [r for r in self._by_hash.values() if r.id == rec.id]
            if rest:  # another secret of the same key (not normally: revocation takes all)
                self._by_id[rec.id] = max(
                    rest, key=lambda r: (not r.retired, r.rotated_at or r.created)
                )

    def _newer(self, rec: KeyRecord) -> bool:
        """Whether ``rec`` is a record this store lacks or a later version of one it has."""
        local = self._by_hash.get(rec.sha256)
        return local is None or (local != rec and rec.updated >= local.updated)

    def _bury(self, rec: KeyRecord, when: float | None = None) -> None:
        """Remove a key for good: its tombstone outlives every copy of its record."""
        self._remove(rec)
        if rec.source == "api":
            self._revoked.setdefault(rec.sha256, time.time() if when is None else when)

    def _prune(self, now: float) -> list[KeyRecord]:
        """Drop the retired secrets whose grace period ended (not saved: the caller saves)."""
        spent = [r for r in self._by_hash.values() if r.spent(now)]
        for rec in spent:
            self._remove(rec)
        return spent

    def prune(self, now: float | None = None) -> list[KeyRecord]:
        """Drop the retired secrets whose grace period ended, and save if there were any;
        returns them (``proxy.keysync`` removes them from Redis too)."""
        spent = self._prune(time.time() if now is None else now)
        if spent:
            self._save()
        return spent

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        items = [r.to_dict() for r in self._by_hash.values() if r.source == "api"]
        data = {"keys": items, "revoked": self._revoked}
        tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        os.chmod(tmp, 0o600)
        tmp.replace(self.path)

    def create(self, user: str, tier: str, **lifecycle: Any) -> tuple[KeyRecord, str]:
        """A new key for ``user`` on ``tier``; the secret is returned here and never again.
        ``lifecycle``: the record's other fields (name, expires_at, models, features, rpm,
        labels, budget_usd), already validated (``proxy.keyspec``)."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        rec = KeyRecord(
            id="key_" + secrets.token_hex(6),
            user=user,
            tier=tier,
            sha256=hash_key(key),
            created=now,
            updated=now,
            **lifecycle,
        )
        self._add(rec)
        self._save()
        return rec, key

    def update(self, key_id: str, **changes: Any) -> KeyRecord | None:
        """Change an issued key's attributes (validated fields of ``KeyRecord``); None when
        there is no such key. A secret still in its grace period follows: it authenticates as
        the key's current record."""
        rec = self._by_id.get(key_id)
        if rec is None or rec.source != "api":
            return None
        data = rec.to_dict()
        data.update(changes, updated=max(time.time(), rec.updated + 1e-6))
        new = KeyRecord.from_dict(data)
        self._add(new)
        self._save()
        return new

    def rotate(self, key_id: str, grace: float) -> tuple[KeyRecord, KeyRecord, str] | None:
        """A new secret for a key, same id and attributes; the old secret is retired and
        accepted for ``grace`` more seconds. Returns (new record, retired record, new secret),
        or None when there is no such issued key. The new secret is shown once."""
        rec = self._by_id.get(key_id)
        if rec is None or rec.source != "api" or rec.retired:
            return None
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = max(time.time(), rec.updated + 1e-6)
        data = rec.to_dict()
        data.update(sha256=hash_key(key), updated=now, rotated_at=now)
        new = KeyRecord.from_dict(data)
        old = KeyRecord.from_dict({**rec.to_dict(), "updated": now, "grace_until": now + grace})
        self._prune(time.time())  # earlier rotations' secrets; this one's is refused as
        self._add(new)  # rotated (not unknown) until the next pruning, even with no grace
        self._add(old)
        self._save()
        return new, old, key

    def declare(self, id: str, user: str, tier: str, sha256: str) -> None:
        """A key managed as code (the policy lists its hash); not written to the file."""
        self._add(
            KeyRecord(
                id=id, user=user, tier=tier, sha256=sha256.lower(), created=0.0, source="policy"
            )
        )

    def apply_restore(self, rec: KeyRecord) -> None:
        """Put back a record as it was before a change that could not be shared (the admin
        API undoing an update or rotation when Redis is unreachable)."""
        self._add(rec)
        self._save()

    def forget_secret(self, rec: KeyRecord) -> None:
        """Drop a secret that was never shown nor shared (an undone rotation): no tombstone."""
        self._remove(rec)
        self._save()

    def get(self, key_id: str) -> KeyRecord | None:
        """A key's current record (its latest secret)."""
        return self._by_id.get(key_id)

    def secrets_of(self, key_id: str) -> list[KeyRecord]:
        """Every record of a key: its current secret and the retired ones."""
        return [r for r in self._by_hash.values() if r.id == key_id]

    def grace_of(self, key_id: str, now: float) -> float | None:
        """When the last retired secret of a key still accepted stops being accepted."""
        ends = [
            r.grace_until
            for r in self._by_hash.values()
            if r.id == key_id and r.grace_until is not None and r.grace_until > now
        ]
        return max(ends) if ends else None

    def issued_to(self, user: str) -> list[KeyRecord]:
        """The user's keys issued through the admin API or CLI (not those of the policy),
        every secret of each (retired ones included)."""
        return [r for r in self._by_hash.values() if r.user == user and r.source == "api"]

    def revoke(self, key_id: str) -> KeyRecord | None:
        """Remove a key, every secret of it; returns its record, or None when there is no
        such key."""
        rec = self._by_id.get(key_id)
        if rec is None:
            return None
        for r in self.secrets_of(key_id):
            self._bury(r)
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
        return [r for r in issued if not r.retired], kept

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
        Redis is a lost copy, not a revocation). Of two versions of a record the later
        (``updated``) wins: the records to put back include the copy's stale ones. The file is
        written only on a change."""
        changed = False
        for sha, when in revoked.items():
            if sha not in self._revoked:
                self._revoked[sha] = when
                changed = True
            rec = self._by_hash.get(sha)
            if rec is not None and rec.source == "api":
                self._remove(rec)
                changed = True
        in_copy: dict[str, float] = {}
        now = time.time()
        for rec in records:
            in_copy[rec.sha256] = rec.updated
            if rec.sha256 not in self._revoked and not rec.spent(now) and self._newer(rec):
                self._add(rec)
                changed = True
        if self._prune(now):
            changed = True
        if changed:
            self._save()
        missing = [
            r
            for r in self._by_hash.values()
            if r.source == "api" and (r.sha256 not in in_copy or in_copy[r.sha256] < r.updated)
        ]
        buried = {s: t for s, t in self._revoked.items() if s not in revoked}
        return missing, buried

    def apply_remote(self, rec: KeyRecord) -> None:
        if rec.sha256 not in self._revoked and not rec.spent(time.time()) and self._newer(rec):
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
