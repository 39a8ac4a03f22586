"""Typed errors for every non-2xx answer (and every failed call) of the HrFlow API.

::

    HandlerError (hrflow_webhooks.errors)
    ├── PermanentError                 dead-letter now
    │   ├── BadRequest        400      e.g. "Invalid source fields"
    │   ├── Unauthorized      401      bad or missing X-API-KEY / X-USER-EMAIL
    │   ├── NotFound          404      unknown profile
    │   └── RejectedRequest   4xx      any other client error
    └── TransientError                 retry with backoff
        ├── RateLimited       429      retry_after_s from the Retry-After header
        └── UpstreamError     5xx      also timeouts and connection errors (status None)

Each of the six also derives from :class:`ApiError` (itself a ``HandlerError``),
so ``except ApiError`` catches every failed call and ``error.transient`` says
which branch it is on.

Every ``ApiError`` carries ``status``, HrFlow's ``hrflow_message`` and the
``endpoint`` it belongs to (``"GET profile/indexing"``); the dead-letter store
reads ``status``, ``hrflow_message`` and ``transient`` by name. Messages never
include request or answer bodies: they may hold personal data.
"""

from __future__ import annotations

from hrflow_webhooks.errors import HandlerError, PermanentError, TransientError


class ApiError(HandlerError):
    """A call to the HrFlow API failed. Subclasses say whether retrying can help."""

    transient: bool = False

    def __init__(
        self,
        status: int | None,
        hrflow_message: str | None,
        endpoint: str,
        *,
        retry_after_s: float | None = None,
    ) -> None:
        answer = f"HTTP {status}" if status is not None else "no answer"
        detail = f": {hrflow_message}" if hrflow_message else ""
        super().__init__(f"{endpoint} failed with {answer}{detail}")
        self.status = status
        self.hrflow_message = hrflow_message
        self.endpoint = endpoint
        # After super().__init__: TransientError's initialiser resets it to None.
        self.retry_after_s = retry_after_s


class BadRequest(ApiError, PermanentError):
    """400: the body or the parameters break HrFlow's documented shape."""


class Unauthorized(ApiError, PermanentError):
    """401: the API key or user is wrong; retrying with the same ones cannot help."""


class NotFound(ApiError, PermanentError):
    """404: no such profile (or source)."""


class RejectedRequest(ApiError, PermanentError):
    """Any other 4xx: HrFlow refused the request as made."""


class RateLimited(ApiError, TransientError):
    """429: slow down; ``retry_after_s`` is HrFlow's Retry-After, when it sent one."""

    transient = True


class UpstreamError(ApiError, TransientError):
    """5xx, a timeout or a connection failure (``status`` None): try again later."""

    transient = True


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    429: RateLimited,
}


def error_for_status(
    status: int, hrflow_message: str | None, endpoint: str, retry_after_s: float | None = None
) -> ApiError:
    """The typed error for a non-2xx answer."""
    error_type = _BY_STATUS.get(status)
    if error_type is None:
        error_type = UpstreamError if status >= 500 else RejectedRequest
    return error_type(status, hrflow_message, endpoint, retry_after_s=retry_after_s)
