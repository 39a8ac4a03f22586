"""An async HrFlow API client over a session it is given, with typed errors.

The calls are named after the official SDK (``client.profile.indexing.get`` →
:meth:`HrflowClient.profile_indexing_get`) so SDK users recognise them. Every
answer is HrFlow's envelope ``{"code", "message", "data"}``; methods return
``data``, and every failure raises an :class:`~hrflow_client.errors.ApiError`.
Logs carry the endpoint, status and keys only: never a body.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import yarl

from hrflow_client import metrics as client_metrics
from hrflow_client.errors import ApiError, UpstreamError, error_for_status
from hrflow_client.profiles import ProfileWrite
from hrflow_client.rate import RateBudget

logger = logging.getLogger(__name__)

PROFILE_INDEXING = "profile/indexing"
PROFILE_PARSING = "profile/parsing"
PROFILE_ARCHIVE = "profile/indexing/archive"
STORING_PROFILES = "storing/profiles"


@dataclass(frozen=True, slots=True)
class ProfilePage:
    """One page of ``GET /storing/profiles`` and its ``meta``: items in the listing's shape
    (keys, reference, source and dates; whole profiles with ``return_profile``)."""

    profiles: list[Mapping[str, Any]]
    page: int
    max_page: int
    total: int


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def _identifiers(
    source_key: str, key: str | None, reference: str | None, endpoint: str
) -> dict[str, str]:
    if not key and not reference:
        # Our bug, not HrFlow's answer: no status, and permanent (retrying cannot help).
        raise ValueError(f"{endpoint}: pass a profile key or a reference")
    params = {"source_key": source_key}
    if key:
        params["key"] = key
    if reference:
        params["reference"] = reference
    return params


def _envelope(body: bytes) -> Mapping[str, Any] | None:
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return decoded if isinstance(decoded, dict) else None


class HrflowClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        api_user: str,
        rate_budget: RateBudget | None = None,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.rate_budget = rate_budget
        self._url_path = yarl.URL(self.base_url).path.rstrip("/")  # metrics label: "/v1"
        self._headers = {"X-API-KEY": api_key, "X-USER-EMAIL": api_user}

    # --- the SDK's calls ----------------------------------------------------------------------

    async def profile_parsing_get(
        self, source_key: str, key: str | None = None, reference: str | None = None
    ) -> Any:
        """The Resume Parsing object of a profile (``GET /profile/parsing``)."""
        params = _identifiers(source_key, key, reference, PROFILE_PARSING)
        return await self._request("GET", PROFILE_PARSING, params=params)

    async def profile_indexing_get(
        self, source_key: str, key: str | None = None, reference: str | None = None
    ) -> Any:
        """A profile as indexed in a source (``GET /profile/indexing``), GET shape."""
        params = _identifiers(source_key, key, reference, PROFILE_INDEXING)
        return await self._request("GET", PROFILE_INDEXING, params=params)

    async def profile_indexing_add_json(
        self, source_key: str, profile: ProfileWrite | Mapping[str, Any]
    ) -> Any:
        """Index a new profile (``POST /profile/indexing``); the body is the write shape."""
        body = {**_body(profile), "source_key": source_key}
        return await self._request("POST", PROFILE_INDEXING, json=body)

    async def profile_indexing_edit(
        self,
        source_key: str,
        profile: ProfileWrite | Mapping[str, Any],
        key: str | None = None,
        reference: str | None = None,
    ) -> Any:
        """Edit an indexed profile (``PUT /profile/indexing``): the fields sent replace theirs."""
        body = {**_body(profile), "source_key": source_key}
        if key:
            body["key"] = key
        if reference:
            body["reference"] = reference
        if not body.get("key") and not body.get("reference"):
            raise ValueError(f"{PROFILE_INDEXING}: pass a profile key or a reference to edit")
        return await self._request("PUT", PROFILE_INDEXING, json=body)

    async def storing_profiles_list(
        self,
        source_keys: Sequence[str],
        *,
        page: int = 1,
        limit: int = 30,
        sort_by: str = "updated_at",
        order_by: str = "desc",
        return_profile: bool = False,
    ) -> ProfilePage:
        """One page of the sources' profiles (``GET /storing/profiles``); by default the most
        recently changed first, which is what reconciliation pages through."""
        params = {
            "source_keys": orjson.dumps(list(source_keys)).decode(),
            "page": str(page),
            "limit": str(limit),
            "sort_by": sort_by,
            "order_by": order_by,
            "return_profile": "true" if return_profile else "false",
        }
        envelope = await self._envelope_of("GET", STORING_PROFILES, params=params)
        raw_meta, data = envelope.get("meta"), envelope.get("data")
        meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
        profiles: list[Mapping[str, Any]] = (
            [p for p in data if isinstance(p, dict)] if isinstance(data, list) else []
        )
        return ProfilePage(
            profiles=profiles,
            page=int(meta.get("page") or page),
            max_page=int(meta.get("maxPage") or 0),
            total=int(meta.get("total") or 0),
        )

    async def profile_storing_archive(
        self,
        source_key: str,
        key: str | None = None,
        reference: str | None = None,
        *,
        archive: bool = True,
    ) -> Any:
        """Archive (or, with ``archive=False``, unarchive) a profile
        (``PATCH /profile/indexing/archive``)."""
        body: dict[str, Any] = dict(_identifiers(source_key, key, reference, PROFILE_ARCHIVE))
        body["is_archive"] = 1 if archive else 0
        return await self._request("PATCH", PROFILE_ARCHIVE, json=body)

    # --- transport ----------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Mapping[str, Any] | None = None,
    ) -> Any:
        """The answer's ``data``."""
        return (await self._envelope_of(method, path, params=params, json=json)).get("data")

    async def _envelope_of(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Mapping[str, Any] | None = None,
    ) -> Mapping[str, Any]:
        """The whole envelope of a 2xx answer (``code``, ``message``, ``data``, ``meta``)."""
        endpoint = f"{method} {path}"
        await self._wait_for_budget()
        started = time.perf_counter()
        status: int | None = None
        try:
            status, headers, body = await self._send(method, path, endpoint, params, json)
        finally:
            elapsed = time.perf_counter() - started
            client_metrics.record_api_call(f"{method} {self._url_path}/{path}", status, elapsed)
            logger.debug(
                "hrflow api call",
                extra={
                    "endpoint": endpoint,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 1),
                },
            )
        return _answer(status, headers, body, endpoint)

    async def _wait_for_budget(self) -> None:
        if self.rate_budget is None:
            return
        started = time.perf_counter()
        await self.rate_budget.acquire()
        client_metrics.record_rate_wait(time.perf_counter() - started)

    async def _send(
        self,
        method: str,
        path: str,
        endpoint: str,
        params: Mapping[str, str] | None,
        json: Mapping[str, Any] | None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        data = None if json is None else orjson.dumps(json)
        headers = dict(self._headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        url = f"{self.base_url}/{path}"
        try:
            async with self.session.request(
                method, url, params=params, data=data, headers=headers
            ) as response:
                return response.status, response.headers, await response.read()
        except TimeoutError as error:
            raise UpstreamError(None, "timed out", endpoint) from error
        except aiohttp.ClientError as error:
            raise UpstreamError(
                None, f"connection failed ({type(error).__name__})", endpoint
            ) from error


def _body(profile: ProfileWrite | Mapping[str, Any]) -> dict[str, Any]:
    return profile.to_json() if isinstance(profile, ProfileWrite) else dict(profile)


def _answer(
    status: int, headers: Mapping[str, str], body: bytes, endpoint: str
) -> Mapping[str, Any]:
    envelope = _envelope(body)
    message = None
    if envelope is not None and isinstance(envelope.get("message"), str):
        message = envelope["message"]
    # HrFlow's envelope repeats the status; trust an error code there even under HTTP 200.
    code = envelope.get("code") if envelope is not None else None
    if isinstance(code, int) and code >= 400 and 200 <= status < 300:
        status = code
    if not 200 <= status < 300:
        raise _error(status, message, endpoint, headers)
    if envelope is None:
        raise UpstreamError(status, "answer is not a JSON envelope", endpoint)
    return envelope


def _error(status: int, message: str | None, endpoint: str, headers: Mapping[str, str]) -> ApiError:
    return error_for_status(
        status, message, endpoint, parse_retry_after(headers.get("Retry-After"))
    )
