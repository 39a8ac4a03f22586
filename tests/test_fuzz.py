"""Property-based fuzzing of the signature parser and the whole request path.

Each property runs at two sizes: a quick sample in ``make test`` (QUICK_EXAMPLES: a broken
parser or endpoint fails it on common shapes) and the long hunt, marked slow, in
``make test-faults``. The hunt's count is HRFLOW_FUZZ_EXAMPLES (default 20,000 for the
verifier, a quarter of that for the flipped byte, half for each request-path property);
raise it for a longer hunt: ``HRFLOW_FUZZ_EXAMPLES=100000 pytest -m slow tests/test_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from hrflow_webhooks.signatures import SignatureError, verify_signature
from receiver.app import create_app
from tests.redis_server import RedisServer
from tests.service import WEBHOOK_SECRET, make_settings

QUICK_EXAMPLES = 200
HUNT_EXAMPLES = int(os.environ.get("HRFLOW_FUZZ_EXAMPLES", "20000"))
SIZES = [
    pytest.param(QUICK_EXAMPLES, id="quick"),
    pytest.param(HUNT_EXAMPLES, id="hunt", marks=pytest.mark.slow),
]
SECRET = WEBHOOK_SECRET.encode()


def fuzz(examples: int, share: float = 1.0) -> settings:
    """Hypothesis settings for ``share`` of ``examples`` cases (at least one). No deadline:
    loopback Redis calls vary; no database: each run draws afresh."""
    return settings(
        max_examples=max(1, int(examples * share)),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


b64ish = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/=.", max_size=200
)
headers = st.one_of(st.binary(max_size=300), b64ish.map(str.encode))


def sdk_header(payload: bytes, secret: bytes = SECRET) -> bytes:
    digest = hmac.new(secret, payload, hashlib.sha256).hexdigest().encode()
    return base64.urlsafe_b64encode(digest) + b"." + base64.urlsafe_b64encode(payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@pytest.mark.parametrize("examples", SIZES)
def test_garbage_never_verifies_and_only_signature_errors_escape(examples: int) -> None:
    @fuzz(examples)
    @given(header=headers, body=st.binary(max_size=200))
    def garbage_never_verifies(header: bytes, body: bytes) -> None:
        with pytest.raises(SignatureError):
            verify_signature(header, body, [SECRET])

    garbage_never_verifies()


@pytest.mark.parametrize("examples", SIZES)
def test_a_flipped_byte_never_verifies_as_another_payload(examples: int) -> None:
    @fuzz(examples, share=1 / 4)
    @given(payload=json_values, position=st.integers(min_value=0), flip=st.integers(1, 255))
    def flipped_byte_never_verifies(payload: Any, position: int, flip: int) -> None:
        raw = json.dumps(payload).encode()
        header = bytearray(sdk_header(raw))
        header[position % len(header)] ^= flip
        try:
            verified = verify_signature(bytes(header), b"", [SECRET])
        except SignatureError:
            return
        assert verified.payload == raw  # only harmless changes (e.g. padding) may still verify

    flipped_byte_never_verifies()


class AsgiCall:
    """One request through the real ASGI app (and the real Redis), without a socket."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def post(self, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/webhook", "raw_path": b"/webhook", "query_string": b"",
            "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
            "root_path": "", "state": {},
        }  # fmt: skip
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await self.app(scope, receive, send)
        return statuses[0]


@pytest.fixture(scope="module")
def asgi(redis_server: RedisServer) -> Any:
    """The app with its lifespan entered, on a dedicated event loop for hypothesis' sync tests."""
    loop = asyncio.new_event_loop()
    app = create_app(make_settings(redis_server.url, max_body_bytes=4096), own_logging=False)
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    redis = Redis.from_url(redis_server.url)
    loop.run_until_complete(redis.flushall())
    yield loop, AsgiCall(app), redis
    loop.run_until_complete(lifespan.__aexit__(None, None, None))
    loop.run_until_complete(redis.aclose())
    loop.close()


def queue_length(asgi: Any) -> int:
    loop, _, redis = asgi
    return int(loop.run_until_complete(redis.zcard("hrflow:queue")))


@pytest.mark.parametrize("examples", SIZES)
def test_unsigned_requests_get_4xx_and_queue_nothing(asgi: Any, examples: int) -> None:
    loop, call, _ = asgi

    @fuzz(examples)
    @given(
        header_name=st.sampled_from(
            [b"http-hrflow-signature", b"http-riminder-signature", b"x-other"]
        ),
        header=headers,
        body=st.binary(max_size=600),
    )
    def unsigned_gets_4xx(header_name: bytes, header: bytes, body: bytes) -> None:
        before = queue_length(asgi)
        status = loop.run_until_complete(call.post([(header_name, header)], body))
        assert status in (401, 413)
        assert queue_length(asgi) == before

    unsigned_gets_4xx()


@pytest.mark.parametrize("examples", SIZES)
def test_signed_payloads_of_any_shape_get_202_or_400_never_5xx(asgi: Any, examples: int) -> None:
    loop, call, _ = asgi

    @fuzz(examples, share=1 / 2)
    @given(payload=json_values)
    def signed_gets_202_or_400(payload: Any) -> None:
        raw = json.dumps(payload).encode()
        before = queue_length(asgi)
        signature = [(b"http-hrflow-signature", sdk_header(raw))]
        status = loop.run_until_complete(call.post(signature, b""))
        event_type = payload.get("type") if isinstance(payload, dict) else None
        valid = (
            isinstance(event_type, str)
            and event_type.strip()
            and len(event_type) <= 128
            and event_type.isascii()
            and event_type.isprintable()
        )
        # The longest signature header whose payload fits in max_body_bytes (4,096): base64
        # of the payload (4 bytes per 3) and python-sdk's 88-character digest part with its dot.
        if len(sdk_header(raw)) > 4 * -(-4096 // 3) + 89:
            assert status == 413
        elif valid:
            assert status == 202
        else:
            assert status in (202, 400)  # arrays of valid events are 202, anything else 400
        if status != 202:
            assert queue_length(asgi) == before

    signed_gets_202_or_400()
