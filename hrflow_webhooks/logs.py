"""Logging as one JSON object per line, with the stdlib only.

The stdlib's ``logging`` already carries structured fields (``extra=``), and
arq and uvicorn log through it, so a small formatter gives every line of the
process one shape without adding structlog. Only allow-listed fields are
written: a caller cannot leak a profile by passing it in ``extra``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from typing import IO, Any

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
    "note",
    "lease",
    "lease_s",
    "runs",
    "held_s",
)
_LOGGED = frozenset(LOGGED_FIELDS)
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


class BatchedLineHandler(logging.StreamHandler[IO[str]]):
    """Lines written in batches: one write per ``interval_s`` (or per ``max_chars``), not one
    per line, and at once for a warning or worse (with the lines before it, in order).

    Where system calls are dear (containers, sandboxed kernels) the write per line was the
    largest cost of the receiver's one INFO line per delivery (docs/benchmarks.md). What is
    lost on SIGKILL is at most ``interval_s`` of INFO lines.

    Once :meth:`write_at_once` is called (the receiver's lifespan does at shutdown: uvicorn
    then ends the process by re-raising SIGTERM, so no exit hook runs) or the handler is
    closed (``logging.config.dictConfig`` closes it, as arq's command line does), each line
    is written as it comes. A forked child drops the parent's pending lines (the parent
    writes them) and starts its own flusher.
    """

    def __init__(
        self, stream: IO[str], interval_s: float = 0.2, max_chars: int = 64 * 1024
    ) -> None:
        super().__init__(stream)
        self.interval_s = interval_s
        self.max_chars = max_chars
        self._lines: list[str] = []
        self._chars = 0
        self._stopping = threading.Event()
        self._flusher = self._start_flusher()
        _BATCHED.add(self)

    def _start_flusher(self) -> threading.Thread:
        flusher = threading.Thread(target=self._flush_now_and_then, daemon=True)
        flusher.start()
        return flusher

    def write_at_once(self) -> None:
        """Write what is pending, then each line as it comes: the process may end any time."""
        self._stopping.set()
        self.flush()

    def _after_fork_in_child(self) -> None:
        self._lines, self._chars = [], 0
        if not self._stopping.is_set():
            self._flusher = self._start_flusher()

    def emit(self, record: logging.LogRecord) -> None:  # called under self.lock
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._add(line, record.levelno)

    def add_line(self, line: str, level: int) -> None:
        """A line formatted by :func:`log_line`, queued like a record's."""
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._add(line, level)

    def _add(self, line: str, level: int) -> None:
        self._lines.append(line)
        self._chars += len(line)
        if level >= logging.WARNING or self._chars >= self.max_chars or self._stopping.is_set():
            self._write()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._write()

    def close(self) -> None:
        # Still on the root logger after dictConfig closed it: lines keep going out, at once.
        self.write_at_once()
        super().close()

    def _write(self) -> None:
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines, self._chars = [], 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # a closed or full stream must not take the service down
            self.handleError(logging.makeLogRecord({"msg": "log write failed"}))

    def _flush_now_and_then(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self.flush()


_BATCHED: weakref.WeakSet[BatchedLineHandler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for handler in list(_BATCHED):
        handler._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def write_logs_at_once() -> None:
    """The process is about to end: write pending lines, and each later one at once."""
    for handler in list(_BATCHED):
        handler.write_at_once()


# The handler configure_logging installed for JSON lines, for log_line's direct path.
_json_handler: BatchedLineHandler | None = None


def log_line(logger: logging.Logger, level: int, message: str, fields: dict[str, Any]) -> None:
    """What ``logger.log(level, message, extra=fields)`` writes under the service's JSON
    logging, the same line, without a LogRecord: for the receiver's line per delivery,
    where the record's machinery cost a fifth of the receiver's CPU (docs/benchmarks.md).
    Any other set-up (text lines, a host's own handlers or filters) takes the normal path."""
    if not logger.isEnabledFor(level):
        return
    handler = _json_handler
    if handler is None or not _only_to(handler, logger):
        logger.log(level, message, extra=fields)
        return
    line: dict[str, Any] = {
        "ts": round(time.time(), 3),
        "level": logging.getLevelName(level).lower(),
        "logger": logger.name,
        "message": message[:MAX_MESSAGE_CHARS],
    }
    for name, value in fields.items():
        if value is not None and name in _LOGGED:
            line[name] = _bounded(value)
    handler.add_line(orjson.dumps(line, default=str).decode(), level)


def _only_to(handler: BatchedLineHandler, logger: logging.Logger) -> bool:
    """Whether a record of ``logger`` would reach ``handler`` alone, unfiltered: the loggers
    up to the root add no handler or filter and propagate, and the root has only it."""
    current: logging.Logger | None = logger
    while current is not None and current is not logging.root:
        if current.handlers or current.filters or not current.propagate:
            return False
        current = current.parent
    root = logging.root
    return root.handlers == [handler] and not root.filters and not handler.filters


def configure_logging(
    level: str = "INFO", fmt: str = "json", stream: IO[str] | None = None
) -> None:
    """Route every logger of the process (ours, arq's, uvicorn's) to stderr in one format.

    For the service's own processes: it sets process-wide logging flags too (see below)."""
    global _json_handler
    # What no formatter here writes, a record need not gather: the caller's file and line
    # (a walk up the stack), and the thread and process (os.getpid() is a system call).
    logging._srcfile = None  # the logging HOWTO's advice
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchedLineHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, BatchedLineHandler):
            old.close()  # its flusher thread stops; its lines are written first
    root.handlers[:] = [handler]
    _json_handler = handler if fmt == "json" else None
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
