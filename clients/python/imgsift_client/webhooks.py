"""Verifying imgsift's webhook deliveries on the receiving side."""

from __future__ import annotations

import hashlib
import hmac
import time

from imgsift_client.errors import ImgsiftError

SIGNATURE_HEADER = "X-Imgsift-Signature"


class InvalidSignature(ImgsiftError):
    """A delivery whose signature is wrong (a forgery) or too old (a replay)."""


def verify_webhook(
    secret: str, body: bytes, signature: str, *, tolerance: float = 300.0, now: float | None = None
) -> None:
    """Raise :class:`InvalidSignature` unless ``signature`` (the X-Imgsift-Signature header) signs ``body``
    with ``secret`` and is at most ``tolerance`` seconds old."""
    try:
        parts = dict(item.split("=", 1) for item in signature.split(","))
        timestamp = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError):
        raise InvalidSignature(f"malformed {SIGNATURE_HEADER}: {signature!r}") from None
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, given):
        raise InvalidSignature("signature does not match the body: not from imgsift, or altered")
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > tolerance:
        raise InvalidSignature(f"signature is {age:.0f} s old (tolerance {tolerance:.0f} s): a replay?")
