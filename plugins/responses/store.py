"""Stored responses: one sealed record per response id, with its owner, kind and content.

A record (JSON, then sealed with ``proxy.sealing`` under its id, so a record copied under
another id does not open)::

    {"id", "owner", "created_at", "model", "kind": "native" | "gateway", "provider",
     "items": [...], "response": {...}}

``native``: the provider keeps the Response (an OpenAI provider serving the Responses API);
the record only says whose it is and which provider to ask. ``gateway``: the gateway made the
Response by translation, so it keeps ``items`` (the whole conversation that went in, earlier
turns first: what ``input_items`` lists and what a next turn is expanded from) and
``response`` (the Response object as the client got it).

Reads raise ``StoreUnavailable`` when the backend fails: a request naming a previous response
must not be answered as if it did not exist. Writes fail open (counted, logged once per
interval): the reply already went out and a record is not worth failing it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from plugins.responses.backend import ResponsesBackend, open_backend
from proxy.failurelog import FailureLog
from proxy.sealing import Sealer

log = logging.getLogger("tollway.responses")

NAMESPACE = "tollway:responses:"


_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")
"""What a response id looks like (``resp_`` + hex, from a provider or the gateway). Any other
string names no record: it never reaches the backend, so an id cannot address the store's
own keys (the owner index, ``owner:USER``)."""


def valid_id(response_id: object) -> bool:
    return isinstance(response_id, str) and _ID.fullmatch(response_id) is not None


class StoreUnavailable(Exception):
    """The backend could not be read (Redis unreachable): a record's existence is unknown."""


@dataclass
class StoreStats:
    """Counters for ``/metrics``."""

    stored: int = 0
    oversize: int = 0
    exists: int = 0  # a record with that id was already there (it stays as it was)
    decrypt_failures: int = 0
    errors: int = 0


class ResponseStore:
    """Sealed records in a backend; see the module docstring."""

    def __init__(
        self,
        *,
        url: str = "memory://",
        keys: list[tuple[str, bytes]],
        max_bytes: int = 64 * 2**20,
        max_record_bytes: int = 4 * 2**20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sealer = Sealer(keys, NAMESPACE)
        self.max_record_bytes = max_record_bytes
        self.stats = StoreStats()
        self._failures = FailureLog(log, "stored responses")
        self.backend: ResponsesBackend = open_backend(url, NAMESPACE, max_bytes, clock)
        """Where the sealed records live (tests read the raw bytes through this)."""

    def set_keys(self, keys: list[tuple[str, bytes]]) -> None:
        """Rotate the key ring (a policy reload): records sealed with a dropped key are gone."""
        self._sealer.set_keys(keys)

    def _failed(self, op: str, exc: Exception) -> None:
        self.stats.errors += 1
        self._failures.failed(op, self.backend.kind, exc)

    async def get(self, response_id: str) -> dict[str, Any] | None:
        """The record of ``response_id``, or None (absent, expired, or not ours to open).

        Raises ``StoreUnavailable`` when the backend fails."""
        if not valid_id(response_id):
            return None
        try:
            blob = await self.backend.get(response_id)
        except Exception as exc:
            self._failed("get", exc)
            raise StoreUnavailable(type(exc).__name__) from exc
        if blob is None:
            return None
        raw = self._sealer.open(response_id, blob)
        if raw is None:
            self.stats.decrypt_failures += 1
            return None
        record: dict[str, Any] = orjson.loads(raw)
        return record

    async def get_owned(self, response_id: str, owner: str) -> dict[str, Any] | None:
        """The record if ``owner`` owns it, else None: another tenant's id is as unknown as an
        id that never existed."""
        record = await self.get(response_id)
        if record is None or record.get("owner") != owner:
            return None
        return record

    async def put(self, record: dict[str, Any], ttl: float) -> bool:
        """Seal and store ``record`` under its id unless one is there; never raises."""
        rid = record["id"]
        if not valid_id(rid):
            return False
        raw = orjson.dumps(record)
        if len(raw) > self.max_record_bytes:
            self.stats.oversize += 1
            log.warning(
                "a stored response was not kept: %d bytes, over max_record_bytes (%d)",
                len(raw),
                self.max_record_bytes,
            )
            return False
        try:
            stored = await self.backend.put(
                rid, self._sealer.seal(rid, raw), ttl, str(record["owner"])
            )
        except Exception as exc:
            self._failed("put", exc)
            return False
        if stored:
            self.stats.stored += 1
        else:
            self.stats.exists += 1
        return stored

    async def delete(self, response_id: str, owner: str) -> bool:
        """Delete a record (the caller checked the owner); raises when the backend fails,
        so a deletion is never reported done when it was not."""
        return bool(await self.backend.delete(response_id, owner))

    async def records_of(self, owner: str) -> list[dict[str, Any]]:
        """Every live record of ``owner`` (erasure asks the providers to delete theirs)."""
        found = []
        for rid in await self.backend.owned(owner):
            record = await self.get(rid)
            if record is not None and record.get("owner") == owner:
                found.append(record)
        return found

    async def forget_owner(self, owner: str) -> int:
        """Delete every record of ``owner``; raises when the backend fails."""
        return await self.backend.forget_owner(owner)

    async def close(self) -> None:
        try:
            await self.backend.close()
        except Exception as exc:
            self._failed("close", exc)
