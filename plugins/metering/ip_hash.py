"""The client address in usage rows: a keyed hash, useless without the key.

A plain SHA-256 of an IP address can be reversed by hashing every address (all of IPv4 takes
minutes). HMAC-SHA256 with a secret key keeps what the column is for (equal addresses hash
alike: distinct clients, traffic per address) while a leaked database or export tells nothing
about who called. The key is metering's ``ip_hash_key`` or, by default, a random key created
once per installation in a file beside the usage database, so hashes stay stable across
restarts (and change if that file is deleted).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_BYTES = 32
"""Length of a generated key (the SHA-256 block size would allow up to 64)."""

MEMO_SIZE = 10_000
"""Distinct addresses whose hash is kept; the memo is emptied when it fills up."""


def key_file(database: str) -> Path:
    """Where the generated key of the usage database ``database`` is kept."""
    return Path(database).with_suffix(".ip_hash_key")


def load_or_create_key(path: Path) -> bytes:
    """The key kept at ``path``: created (random, owner-only) on first use, then read.

    Written under a temporary name and linked into place, so two processes starting together
    agree on one key and none ever reads a half-written file.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(KEY_BYTES) + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another process was first: its key
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ValueError(
            f"{path} does not hold an IP hash key (hex digits): restore it, or delete it to "
            "start a new key (client_ip_hash values then change)"
        )
    return key


class IpHasher:
    """``hasher(ip)`` -> the first 16 hex digits of HMAC-SHA256(key, ip), memoised per address."""

    __slots__ = ("_base", "_memo")

    def __init__(self, key: bytes) -> None:
        self._base = hmac.new(key, digestmod=hashlib.sha256)  # copied per address: key set once
        self._memo: dict[str, str] = {}

    def __call__(self, ip: str) -> str:
        h = self._memo.get(ip)
        if h is None:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            mac = self._base.copy()
            # surrogateescape: an address taken from a header never makes the row fail
            mac.update(ip.encode("utf-8", "surrogateescape"))
            h = self._memo[ip] = mac.hexdigest()[:16]
        return h
