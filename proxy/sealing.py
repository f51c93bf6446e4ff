"""Encryption at rest for what plugins keep about users: AES-256-GCM with a key ring.

Stored replies and conversations are user data (prompts, completions), so a plugin that keeps
them (the response cache, the Responses API's stored responses) seals each value before its
backend (process memory or Redis) holds it. A sealed value is::

    version (1 byte = 0x01) | len(key_id) (1 byte) | key_id | nonce (12 bytes) | ciphertext+tag

The associated data is the header plus the value's full storage key (the store's namespace +
its key), so a value copied under another key, a tampered value, or one sealed with a key id
no longer held fails authentication: ``Sealer.open`` returns None and the store treats it as
absent. The first key of the ring seals; all keys open, so rotation is "prepend the new key,
drop the old one after the longest TTL".

Why in the core: two plugins need the same format and key handling, and a plugin never imports
another plugin; a third-party plugin that keeps user data can use it too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT_VERSION = 1
NONCE_LEN = 12
TAG_LEN = 16
KEY_LEN = 32


def parse_key(secret: str, what: str = "cache encryption key") -> bytes:
    """Decode a 32-byte AES key given as 64 hex characters or base64 (standard or URL-safe).

    ``what`` names the key in the error. The message never echoes the secret, only its
    length, since it ends up in logs.
    """
    if not isinstance(secret, str):
        raise ValueError(f"{what} must be a string (64 hex chars or base64)")
    text = secret.strip()
    if len(text) == 2 * KEY_LEN:
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"{what} has 64 characters but is not valid hex") from None
    b64 = text.replace("-", "+").replace("_", "/")
    b64 += "=" * (-len(b64) % 4)
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_LEN:
        raise ValueError(
            f"{what} must be 32 bytes, given as 64 hex characters or base64 "
            f"(e.g. `openssl rand -base64 32`); got {len(text)} characters that are neither"
        )
    return raw


def key_id(key: bytes) -> str:
    """A short public name for a key (written in each sealed value): its hash, not the key."""
    return hashlib.sha256(key).hexdigest()[:8]


class Sealer:
    """Seals and opens values under their storage key with a ring of AES-256-GCM keys."""

    __slots__ = ("_aeads", "_header", "_namespace", "_sealer")

    def __init__(self, keys: list[tuple[str, bytes]], namespace: str = "") -> None:
        self._namespace = namespace
        self.set_keys(keys)

    def set_keys(self, keys: list[tuple[str, bytes]]) -> None:
        """Replace the ring (a policy reload rotating keys): the first seals new values, all
        open; values sealed with a key no longer listed stop opening."""
        if not keys:
            raise ValueError("a sealer needs at least one (key_id, key) pair")
        aeads: dict[bytes, AESGCM] = {}
        for kid_text, key in keys:
            kid = kid_text.encode()
            if not 0 < len(kid) < 256:
                raise ValueError("encryption key ids must be 1..255 bytes of UTF-8")
            if len(key) != KEY_LEN:
                raise ValueError(f"encryption key {kid_text!r} must be 32 bytes (AES-256)")
            if kid in aeads:
                raise ValueError(f"duplicate encryption key id {kid_text!r}")
            aeads[kid] = AESGCM(bytes(key))
        first = keys[0][0].encode()
        self._aeads = aeads
        self._header = bytes([FORMAT_VERSION, len(first)]) + first
        self._sealer = aeads[first]

    def _aad(self, header: bytes, key: str) -> bytes:
        return header + f"{self._namespace}{key}".encode()

    def seal(self, key: str, value: bytes) -> bytes:
        """``value`` encrypted for storage under ``key`` (a fresh random nonce each time)."""
        nonce = os.urandom(NONCE_LEN)
        header = self._header
        return header + nonce + self._sealer.encrypt(nonce, value, self._aad(header, key))

    def open(self, key: str, blob: Any) -> bytes | None:
        """The plaintext of a value stored under ``key``, or None when it is not one of ours,
        was tampered with, was copied from another key, or its key left the ring."""
        if not isinstance(blob, bytes) or len(blob) < 2 or blob[0] != FORMAT_VERSION:
            return None
        end = 2 + blob[1]
        aead = self._aeads.get(blob[2:end])
        if aead is None or len(blob) < end + NONCE_LEN + TAG_LEN:
            return None
        try:
            return aead.decrypt(
                blob[end : end + NONCE_LEN], blob[end + NONCE_LEN :], self._aad(blob[:end], key)
            )
        except InvalidTag:
            return None
