"""HrFlow webhook signatures: a pure function of header bytes, body bytes and secrets.

HrFlow's sources disagree on how the ``HTTP-HRFLOW-SIGNATURE`` header is built
(see shared/hrflow-api/README.md), so we accept all four documented variants:

================ ============================== ====================================
scheme           HMAC-SHA256 over               header
================ ============================== ====================================
``python-sdk``   the decoded payload JSON       b64url(hex digest) "." b64url(payload)
``js-sdk``       the payload part, as sent      b64(raw digest) "." b64url(payload)
``docs``         the payload part, as sent      b64url(raw digest) "." b64url(payload)
``body-hex``     the raw request body           hex digest (the event is the body)
================ ============================== ====================================

Padding is optional everywhere. Every comparison is constant-time, and a
failure raises one :class:`SignatureError` whose ``reason`` says what is wrong
without echoing anything secret.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Scheme = Literal["python-sdk", "js-sdk", "docs", "body-hex"]
SchemeChoice = Literal["auto", "python-sdk", "js-sdk", "docs", "body-hex"]

_HEX_DIGEST = re.compile(rb"[0-9a-fA-F]{64}")
_STANDARD_B64 = re.compile(rb"[A-Za-z0-9+/]+={0,2}")
_URLSAFE_B64 = re.compile(rb"[A-Za-z0-9_-]+={0,2}")
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


class SignatureError(Exception):
    """The request is not signed by any of our secrets; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Verified:
    scheme: Scheme
    payload: bytes  # the signed event JSON: the only bytes worth trusting


def _b64decode(part: bytes, alphabet: re.Pattern[bytes]) -> bytes | None:
    if not alphabet.fullmatch(part):
        return None
    unpadded = part.rstrip(b"=")
    if alphabet is _URLSAFE_B64:
        unpadded = unpadded.translate(_URLSAFE_TO_STANDARD)
    try:  # binascii itself: the base64 module's wrappers cost more than the decoding
        return binascii.a2b_base64(unpadded + b"=" * (-len(unpadded) % 4))
    except binascii.Error:
        return None


def _b64decode_any(part: bytes) -> bytes | None:
    decoded = _b64decode(part, _URLSAFE_B64)
    return decoded if decoded is not None else _b64decode(part, _STANDARD_B64)


@functools.lru_cache(maxsize=64)  # a few secrets (rotation); keyed once, not per delivery
def _keyed_hmac(secret: bytes) -> hmac.HMAC:
    return hmac.new(secret, digestmod=hashlib.sha256)


def _hmac(secret: bytes, message: bytes) -> bytes:
    # Copying a keyed HMAC skips the key schedule that hmac.new() redoes on every call.
    mac = _keyed_hmac(secret).copy()
    mac.update(message)
    return mac.digest()


def _any_secret_matches(expected: bytes, message: bytes, secrets: Sequence[bytes]) -> bool:
    # Check every secret even after a match, so timing does not tell which one matched.
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(_hmac(secret, message), expected)
    return matched


def _verify_body_hex(header: bytes, body: bytes, secrets: Sequence[bytes]) -> Verified:
    if not _HEX_DIGEST.fullmatch(header):
        raise SignatureError("body-hex signature must be a 64-character hex HMAC-SHA256 digest")
    if not _any_secret_matches(bytes.fromhex(header.decode()), body, secrets):
        raise SignatureError("signature does not match the body for any configured secret")
    return Verified("body-hex", body)


def _split_signed_request(header: bytes) -> tuple[bytes, bytes, bytes]:
    """``<signature>.<payload>`` → (signature part, payload part, decoded payload)."""
    signature_part, dot, payload_part = header.partition(b".")
    if not dot or not signature_part or not payload_part or b"." in payload_part:
        raise SignatureError("signature header is not '<signature>.<payload>'")
    payload = _b64decode(payload_part, _URLSAFE_B64)
    if payload is None:
        payload = _b64decode(payload_part, _STANDARD_B64)
    if not payload:
        raise SignatureError("payload part of the signature header is not valid base64url")
    return signature_part, payload_part, payload


def _python_sdk_matches(signature: bytes, payload: bytes, secrets: Sequence[bytes]) -> bool:
    # The SDK compares hex digests; decoding ours first keeps the comparison on raw bytes.
    if not _HEX_DIGEST.fullmatch(signature):
        return False
    return _any_secret_matches(bytes.fromhex(signature.decode()), payload, secrets)


def _raw_digest_matches(
    signature_part: bytes,
    payload_part: bytes,
    alphabet: re.Pattern[bytes],
    secrets: Sequence[bytes],
) -> bool:
    digest = _b64decode(signature_part, alphabet)
    if digest is None or len(digest) != hashlib.sha256().digest_size:
        return False
    return _any_secret_matches(digest, payload_part, secrets)


def _verify_signed_request(
    header: bytes, scheme: SchemeChoice, secrets: Sequence[bytes]
) -> Verified:
    signature_part, payload_part, payload = _split_signed_request(header)
    signature = _b64decode_any(signature_part)
    if signature is None:
        raise SignatureError("signature part of the signature header is not valid base64")
    candidates: tuple[Scheme, ...] = (
        ("python-sdk", "docs", "js-sdk") if scheme == "auto" else (scheme,)
    )
    for candidate in candidates:
        if candidate == "python-sdk" and _python_sdk_matches(signature, payload, secrets):
            return Verified("python-sdk", payload)
        alphabet = _URLSAFE_B64 if candidate == "docs" else _STANDARD_B64
        if candidate in ("docs", "js-sdk") and _raw_digest_matches(
            signature_part, payload_part, alphabet, secrets
        ):
            return Verified(candidate, payload)
    raise SignatureError(
        f"signature does not match the payload for any configured secret (scheme {scheme})"
    )


def verify_signature(
    header: bytes | None,
    body: bytes,
    secrets: Sequence[bytes],
    scheme: SchemeChoice = "auto",
) -> Verified:
    """Verify one delivery and return the signed payload, or raise :class:`SignatureError`."""
    if not secrets:
        raise SignatureError("no webhook secret is configured")
    if header is None:
        raise SignatureError("missing HTTP-HRFLOW-SIGNATURE header")
    header = header.strip()
    if not header:
        raise SignatureError("HTTP-HRFLOW-SIGNATURE header is empty")
    if scheme == "body-hex" or (scheme == "auto" and b"." not in header):
        return _verify_body_hex(header, body, secrets)
    return _verify_signed_request(header, scheme, secrets)


# --- signing: what HrFlow does, for the `send` command and the sandbox -------------------------


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data)


def sign(payload: bytes, secret: bytes, scheme: Scheme = "python-sdk") -> str:
    """The header value HrFlow would send for ``payload`` (for ``body-hex``, the body)."""
    if scheme == "body-hex":
        return hmac.new(secret, payload, hashlib.sha256).hexdigest()
    if scheme == "python-sdk":
        hex_digest = hmac.new(secret, payload, hashlib.sha256).hexdigest().encode()
        return (_b64url(hex_digest) + b"." + _b64url(payload)).decode()
    payload_part = _b64url(payload).rstrip(b"=")
    digest = _hmac(secret, payload_part)
    signature_part = base64.b64encode(digest) if scheme == "js-sdk" else _b64url(digest)
    return (signature_part + b"." + payload_part).decode()
