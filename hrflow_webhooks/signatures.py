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


def _b64decode(part: bytes, urlsafe: bool) -> bytes | None:
    """Base64 (or base64url) with optional padding; None when it is not.

    binascii's strict mode checks the alphabet in C as it decodes: a regular expression
    over a megabyte-long header cost more than the HMAC (docs/benchmarks.md, rejection).
    """
    unpadded = part.rstrip(b"=")
    if urlsafe:
        unpadded = unpadded.translate(_URLSAFE_TO_STANDARD)
    try:
        return binascii.a2b_base64(unpadded + b"=" * (-len(unpadded) % 4), strict_mode=True)
    except binascii.Error:
        return None


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


# The signature part's length without padding tells the variants apart before any work:
# base64 of a 64-character hex digest (python-sdk) or of a raw 32-byte digest (the others).
_HEX_DIGEST_B64_CHARS = 86
_RAW_DIGEST_B64_CHARS = 43


def _signed_request_form(signature_part: bytes, scheme: SchemeChoice) -> Scheme:
    """The variant a ``<signature>.<payload>`` header can be, from its signature part alone.

    js-sdk and docs sign the same bytes with the same key and differ only in the digest's
    alphabet, so one HMAC decides both; a digest with neither ``+/`` nor ``-_`` is read as
    docs (the name reported; the check is the same).
    """
    chars = len(signature_part.rstrip(b"="))
    if chars == _HEX_DIGEST_B64_CHARS and scheme in ("auto", "python-sdk"):
        return "python-sdk"
    if chars == _RAW_DIGEST_B64_CHARS and scheme in ("auto", "js-sdk", "docs"):
        standard = b"+" in signature_part or b"/" in signature_part
        urlsafe = b"-" in signature_part or b"_" in signature_part
        if scheme == "auto":
            return "js-sdk" if standard else "docs"
        if (scheme == "docs" and not standard) or (scheme == "js-sdk" and not urlsafe):
            return scheme
    raise SignatureError(f"signature part has the form of no accepted variant (scheme {scheme})")


def _split_signed_request(header: bytes) -> tuple[bytes, bytes]:
    signature_part, dot, payload_part = header.partition(b".")
    if not dot or not signature_part or not payload_part or b"." in payload_part:
        raise SignatureError("signature header is not '<signature>.<payload>'")
    return signature_part, payload_part


def _decoded_payload(payload_part: bytes) -> bytes:
    payload = _b64decode(
        payload_part, urlsafe=b"+" not in payload_part and b"/" not in payload_part
    )
    if not payload:
        raise SignatureError("payload part of the signature header is not valid base64url")
    return payload


def _mismatch(scheme: SchemeChoice) -> SignatureError:
    return SignatureError(
        f"signature does not match the payload for any configured secret (scheme {scheme})"
    )


def _verify_signed_request(
    header: bytes, scheme: SchemeChoice, secrets: Sequence[bytes]
) -> Verified:
    """One HMAC per secret, chosen by the header's form; the payload is decoded only when
    the variant signs the decoded payload (python-sdk) or once the signature matched."""
    signature_part, payload_part = _split_signed_request(header)
    form = _signed_request_form(signature_part, scheme)
    if form == "python-sdk":
        hex_digest = _b64decode(signature_part, urlsafe=True)
        if hex_digest is None or not _HEX_DIGEST.fullmatch(hex_digest):
            raise SignatureError("signature part of the signature header is not a hex digest")
        payload = _decoded_payload(payload_part)
        if not _any_secret_matches(bytes.fromhex(hex_digest.decode()), payload, secrets):
            raise _mismatch(scheme)
        return Verified(form, payload)
    digest = _b64decode(signature_part, urlsafe=form == "docs")
    if digest is None or len(digest) != hashlib.sha256().digest_size:
        raise SignatureError("signature part of the signature header is not valid base64")
    if not _any_secret_matches(digest, payload_part, secrets):
        raise _mismatch(scheme)
    return Verified(form, _decoded_payload(payload_part))


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
