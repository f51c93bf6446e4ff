"""The signature a receiver checks: ``Tollway-Signature: t=<unix seconds>,v1=<hex>``.

``v1`` is HMAC-SHA256, keyed with the endpoint's secret, of ``"<t>.<raw body>"`` (Stripe's
scheme): the timestamp is signed with the body, so a receiver that refuses old timestamps also
refuses a recorded delivery played again later. Each attempt is signed afresh (a retry an hour
later carries that hour's timestamp); the body, and so ``Tollway-Event-Id``, stays the same.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "Tollway-Signature"
EVENT_ID_HEADER = "Tollway-Event-Id"


def sign(secret: bytes, body: bytes, t: int) -> str:
    """The header value for ``body`` sent at UNIX time ``t``."""
    mac = hmac.new(secret, str(t).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, tolerance: float = 300.0) -> bool:
    """What a receiver does (docs/plugins.md shows the same in a few lines): the signature
    matches the raw body, and its timestamp is at most ``tolerance`` seconds old."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        t = int(fields["t"])
    except (ValueError, KeyError):
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    fresh = abs(time.time() - t) <= tolerance
    return fresh and hmac.compare_digest(expected, fields.get("v1", ""))
