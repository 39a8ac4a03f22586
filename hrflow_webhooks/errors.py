"""One exception tree for everything a handler can raise, and how the worker treats it.

::

    HandlerError                 carries the event and handler it belongs to
    ├── TransientError           retry later (with backoff, honouring retry_after_s)
    │   └── SubjectNotReadableError  the event's own subject is 404 inside the grace
    │                                period: waited for, without using up a try
    └── PermanentError           dead-letter now: retrying cannot help
        └── SubjectGoneError     the subject is still 404 after the grace period: one
                                 recorded skip for the run, not a dead letter

The HrFlow client's ``ApiError`` family (``hrflow_client.errors``)
slots under these two, so a 429 is a ``TransientError`` and a 404 a
``PermanentError`` without the worker knowing about HTTP. Anything else a
handler raises is classified by the worker (``workers.failures.is_transient``):
infrastructure hiccups and unknown exceptions are retried up to the try limit;
the worker never swallows an error silently.
"""

from __future__ import annotations


class HandlerError(Exception):
    """Base of the errors a handler raises on purpose."""

    retry_after_s: float | None = None


class TransientError(HandlerError):
    """Try again later; ``retry_after_s`` is a floor for the next delay."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentError(HandlerError):
    """Retrying cannot help (bad input, missing keys, 400/401/404): dead-letter at once."""


class SubjectNotReadableError(TransientError):
    """The event's own subject answered 404, inside ``HRFLOW_NOT_FOUND_GRACE_S``.

    HrFlow sends parsing webhooks after parsing and before indexing, so a profile
    can be unreadable for a while after ``profile.parsing.success``.
    """


class SubjectGoneError(PermanentError):
    """The event's own subject is still 404 after the grace period: deleted, archived or
    never indexed. The run records one skip (``profile not found``) instead of dead letters."""


def retry_after_of(error: BaseException) -> float | None:
    return error.retry_after_s if isinstance(error, HandlerError) else None
