"""Signature verification. Expected headers are built here, independently of the product,
from each source's description (shared/hrflow-api/README.md)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from hrflow import Hrflow

from hrflow_webhooks.signatures import SignatureError, sign, verify_signature

SECRET = b"whsec-current"
OLD_SECRET = b"whsec-previous"
EVENT = {
    "type": "profile.parsing.success",
    "origin": "api",
    "message": "profile parsed",
    "profile": {"key": "pk-1", "reference": None, "source": {"key": "sk-1"}},
}
PAYLOAD = json.dumps(EVENT).encode()


def python_sdk_header(payload: bytes, secret: bytes, padding: bool = True) -> bytes:
    hex_digest = hmac.new(secret, payload, hashlib.sha256).hexdigest().encode()
    sig, body = base64.urlsafe_b64encode(hex_digest), base64.urlsafe_b64encode(payload)
    if not padding:
        sig, body = sig.rstrip(b"="), body.rstrip(b"=")
    return sig + b"." + body


def js_sdk_header(payload: bytes, secret: bytes) -> bytes:
    payload_part = base64.urlsafe_b64encode(payload)
    digest = hmac.new(secret, payload_part, hashlib.sha256).digest()
    return base64.b64encode(digest) + b"." + payload_part


def docs_header(payload: bytes, secret: bytes) -> bytes:
    payload_part = base64.urlsafe_b64encode(payload).rstrip(b"=")
    digest = hmac.new(secret, payload_part, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=") + b"." + payload_part


def body_hex_header(body: bytes, secret: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).hexdigest().encode()


SIGNED_REQUEST_VARIANTS = {
    "python-sdk": python_sdk_header,
    "js-sdk": js_sdk_header,
    "docs": docs_header,
}


@pytest.mark.parametrize("scheme", sorted(SIGNED_REQUEST_VARIANTS))
def test_each_signed_request_variant_is_accepted_in_auto_and_its_own_scheme(scheme: str) -> None:
    header = SIGNED_REQUEST_VARIANTS[scheme](PAYLOAD, SECRET)
    for choice in ("auto", scheme):
        verified = verify_signature(header, b"", [SECRET], choice)  # type: ignore[arg-type]
        assert verified.payload == PAYLOAD
    assert verify_signature(header, b"", [SECRET]).scheme in (scheme, "docs", "js-sdk")


def test_js_sdk_signature_with_standard_alphabet_is_recognised_as_js_sdk() -> None:
    # Find a payload whose standard-base64 digest has '+' or '/', so the alphabets differ.
    for n in range(200):
        payload = json.dumps({**EVENT, "message": f"m{n}"}).encode()
        header = js_sdk_header(payload, SECRET)
        if b"+" in header.split(b".")[0] or b"/" in header.split(b".")[0]:
            assert verify_signature(header, b"", [SECRET]).scheme == "js-sdk"
            with pytest.raises(SignatureError):
                verify_signature(header, b"", [SECRET], "docs")
            return
    pytest.fail("no payload produced a '+' or '/' in 200 tries")


def test_body_hex_signs_the_raw_body() -> None:
    verified = verify_signature(body_hex_header(PAYLOAD, SECRET), PAYLOAD, [SECRET])
    assert (verified.scheme, verified.payload) == ("body-hex", PAYLOAD)
    upper = body_hex_header(PAYLOAD, SECRET).upper()
    assert verify_signature(upper, PAYLOAD, [SECRET], "body-hex").payload == PAYLOAD


def test_padding_may_be_absent() -> None:
    header = python_sdk_header(PAYLOAD, SECRET, padding=False)
    assert verify_signature(header, b"", [SECRET]).payload == PAYLOAD


def test_rotation_accepts_old_and_new_secret_and_nothing_else() -> None:
    secrets = [SECRET, OLD_SECRET]
    for secret in secrets:
        assert verify_signature(python_sdk_header(PAYLOAD, secret), b"", secrets).payload == PAYLOAD
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature(python_sdk_header(PAYLOAD, b"someone-else"), b"", secrets)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        (b"", "empty"),
        (b"   ", "empty"),
        (b"no-dot-and-not-hex", "64-character hex"),
        (b"a.b.c", "not '<signature>.<payload>'"),
        (b".payload", "not '<signature>.<payload>'"),
        (b"sig.", "not '<signature>.<payload>'"),
        (base64.urlsafe_b64encode(b"0" * 64) + b".%%%not-base64%%%", "payload part"),
        (b"sig.eyJ0eXBlIjoieCJ9", "form of no accepted variant"),
        (b"%%%.eyJ0eXBlIjoieCJ9", "signature part"),
    ],
)
def test_garbled_headers_are_rejected_with_a_reason(header: bytes | None, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason.replace(".", r"\.").replace("(", r"\(")):
        verify_signature(header, PAYLOAD, [SECRET])


def test_wrong_secret_truncated_and_swapped_parts_are_rejected() -> None:
    good = python_sdk_header(PAYLOAD, SECRET)
    sig, payload_part = good.split(b".")
    tampered_payload = base64.urlsafe_b64encode(PAYLOAD.replace(b"pk-1", b"pk-2"))
    for bad in (
        python_sdk_header(PAYLOAD, b"wrong"),
        good[:-8],
        sig[:-4] + b"." + payload_part,
        payload_part + b"." + sig,
        sig + b"." + tampered_payload,
    ):
        with pytest.raises(SignatureError):
            verify_signature(bad, b"", [SECRET])


def test_body_hex_rejects_a_changed_body() -> None:
    header = body_hex_header(PAYLOAD, SECRET)
    with pytest.raises(SignatureError, match="does not match the body"):
        verify_signature(header, PAYLOAD + b" ", [SECRET])


def test_an_explicit_scheme_rejects_the_other_variants() -> None:
    with pytest.raises(SignatureError):
        verify_signature(docs_header(PAYLOAD, SECRET), b"", [SECRET], "python-sdk")
    with pytest.raises(SignatureError):
        verify_signature(python_sdk_header(PAYLOAD, SECRET), b"", [SECRET], "docs")
    with pytest.raises(SignatureError):
        verify_signature(python_sdk_header(PAYLOAD, SECRET), PAYLOAD, [SECRET], "body-hex")


def test_no_secret_configured_rejects_everything() -> None:
    with pytest.raises(SignatureError, match="no webhook secret"):
        verify_signature(python_sdk_header(PAYLOAD, SECRET), b"", [])


@pytest.mark.parametrize("scheme", ["python-sdk", "js-sdk", "docs", "body-hex"])
def test_sign_round_trips_through_verify(scheme: str) -> None:
    header = sign(PAYLOAD, SECRET, scheme)  # type: ignore[arg-type]
    verified = verify_signature(header.encode(), PAYLOAD, [SECRET])
    assert verified.payload == PAYLOAD


def test_the_official_sdk_accepts_what_we_sign_and_we_accept_what_it_checks() -> None:
    """The exact scheme of the HrFlow Python SDK's `webhooks.handle` (v4, legacy event names)."""
    event = {**EVENT, "type": "profile.parse.success"}
    payload = json.dumps(event).encode()
    client = Hrflow(api_secret="unused", api_user="unused", webhook_secret=SECRET.decode())
    seen: list[dict[str, object]] = []
    client.webhooks.setHandler("profile.parse.success", lambda data, kind: seen.append(data))
    header = sign(payload, SECRET, "python-sdk")
    client.webhooks.handle(request_headers={"HTTP-HRFLOW-SIGNATURE": header})
    assert seen == [event]
    assert verify_signature(header.encode(), b"", [SECRET], "python-sdk").payload == payload
