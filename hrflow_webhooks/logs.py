"""Logging as one JSON object per line, with the stdlib only.

The stdlib's ``logging`` already carries structured fields (``extra=``), and
arq and uvicorn log through it, so a small formatter gives every line of the
process one shape without adding structlog. Only allow-listed fields are
written: a caller cannot leak a profile by passing it in ``extra``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

# Fields a log call may attach. Keys and ids only, never profile contents or secrets.
LOGGED_FIELDS = (
    "event_id",
    "run_id",
    "event_type",
    "canonical_type",
    "handler",
    "job_try",
    "outcome",
    "duration_ms",
    "request_id",
    "status",
    "reason",
    "queued",
    "coalesced",
    "duplicates",
    "blocked_s",
    "dead_letter_id",
    "retry_in_s",
    "profile_key",
    "source_key",
    "endpoint",
    "error_type",
    "rejected",
    "interval_s",
    "risk",
    "events_at_risk",
)
# Values are cut to this many characters: a field may hold what a signed sender wrote.
MAX_FIELD_CHARS = 200


MAX_MESSAGE_CHARS = 1_000


def _bounded(value: Any) -> Any:
    return value[:MAX_FIELD_CHARS] if isinstance(value, str) else value


def _bounded_message(record: logging.LogRecord) -> str:
    """The message, cut: a library's line may quote what a client sent (a path, a header)."""
    return record.getMessage()[:MAX_MESSAGE_CHARS]


class OncePerInterval(logging.Filter):
    """Lets a given warning through once per ``interval_s``: uvicorn logs one per bad
    request ("Invalid HTTP request received."), which a flood would turn into gigabytes."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key, now = str(record.msg), time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            return False
        if len(self._last) > 1_000:
            self._last.clear()
        self._last[key] = now
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _bounded_message(record),
        }
        for name in LOGGED_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = _bounded(value)
        if record.exc_info and record.exc_info[0] is not None:
            line["error_type"] = record.exc_info[0].__name__
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # repr() for strings: quotes, and escapes for control characters (no forged lines).
        fields = " ".join(
            f"{name}={_text_value(record.__dict__[name])}"
            for name in LOGGED_FIELDS
            if record.__dict__.get(name) is not None
        )
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        message = _text_value(_bounded_message(record))
        return f"{stamp} {record.levelname:<7} {record.name}: {message} {fields}".rstrip()


def _text_value(value: Any) -> str:
    value = _bounded(value)
    return repr(value) if isinstance(value, str) and not value.isprintable() else str(value)


class DropJobArguments(logging.Filter):
    """arq logs each job's arguments when it starts; ours are events: keep them out of logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        # arq's start line is '%6.2fs → %s(%s)%s'; only arq's own lines are judged by it.
        return not (record.name.startswith("arq") and "→" in str(record.msg))


# For ``arq --custom-log-dict hrflow_webhooks.logs.ARQ_LOG_CONFIG``: arq's command line
# imports the worker settings (which call configure_logging) and then applies its own
# logging config, which adds a plain-text handler to the "arq" logger and so prints arq's
# lines twice, once not as JSON. An incremental config that names nothing changes nothing.
ARQ_LOG_CONFIG: dict[str, Any] = {"version": 1, "incremental": True}


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger of the process (ours, arq's, uvicorn's) to stderr in one format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's --no-access-log leaves its access logger with no handler and not propagating;
    # rerouting it would switch the access log back on (one more line per delivery).
    access = logging.getLogger("uvicorn.access")
    access_log_off = not access.handlers and not access.propagate
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "arq", "arq.worker"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = not (name == "uvicorn.access" and access_log_off)
        # uvicorn pins its loggers at INFO: unpinned, HRFLOW_LOG_LEVEL governs them like ours
        # (else each delivery is logged twice, access line included, even at WARNING).
        logger.setLevel(logging.NOTSET)
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, OncePerInterval) for f in uvicorn_errors.filters):
        uvicorn_errors.addFilter(OncePerInterval())
    # On the logger, not a handler: it then holds whatever handlers arq's own CLI adds later.
    arq_worker = logging.getLogger("arq.worker")
    if not any(isinstance(f, DropJobArguments) for f in arq_worker.filters):
        arq_worker.addFilter(DropJobArguments())
