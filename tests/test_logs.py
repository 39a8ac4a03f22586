"""The service's log lines: batched writes, and the receiver's direct line per delivery."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hrflow_webhooks.logs import BatchedLineHandler, configure_logging, log_line


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """configure_logging changes the process's root logger: put it back afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    flags = {name: getattr(logging, name) for name in PROCESS_FLAGS}
    try:
        yield
    finally:
        for handler in root.handlers:
            if isinstance(handler, BatchedLineHandler):
                handler.close()
        root.handlers[:], level = saved
        root.setLevel(level)
        for name, value in flags.items():
            setattr(logging, name, value)


PROCESS_FLAGS = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")


def written(stream: io.StringIO) -> list[dict[str, Any]]:
    logging.getLogger().handlers[0].flush()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


FIELDS = {"request_id": "r-1", "queued": 1, "coalesced": 0, "event_id": "e" * 64}


@pytest.mark.usefixtures("restored_logging")
def test_the_direct_line_has_the_fields_a_record_would_have() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    logger = logging.getLogger("receiver.app")
    logger.info("delivery queued", extra=FIELDS)
    log_line(logger, logging.INFO, "delivery queued", FIELDS)
    by_record, direct = written(stream)
    assert by_record.pop("ts") <= direct.pop("ts")
    assert direct == by_record


@pytest.mark.usefixtures("restored_logging")
def test_the_direct_line_keeps_the_allow_list_and_the_bounds() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    fields = {"reason": "x" * 5_000, "profile": {"name": "Jane"}, "queued": None}
    log_line(logging.getLogger("receiver.app"), logging.INFO, "m" * 5_000, fields)
    [line] = written(stream)
    assert set(line) == {"ts", "level", "logger", "message", "reason"}
    assert (len(line["message"]), len(line["reason"])) == (1_000, 200)


@pytest.mark.usefixtures("restored_logging")
def test_the_direct_line_respects_the_level_and_other_set_ups() -> None:
    stream = io.StringIO()
    configure_logging("WARNING", "json", stream)
    log_line(logging.getLogger("receiver.app"), logging.INFO, "delivery queued", FIELDS)
    assert written(stream) == []
    quiet = logging.getLogger("receiver.quiet")
    quiet.propagate = False  # a record would reach no handler: neither may the direct line
    configure_logging("INFO", "json", stream)
    log_line(quiet, logging.INFO, "delivery queued", FIELDS)
    assert written(stream) == []
    configure_logging("INFO", "text", stream)  # text lines: the record's path
    log_line(logging.getLogger("receiver.app"), logging.INFO, "delivery queued", FIELDS)
    logging.getLogger().handlers[0].flush()
    assert "INFO    receiver.app: delivery queued" in stream.getvalue()


def test_info_lines_wait_for_the_batch_and_a_warning_writes_them_in_order() -> None:
    stream = io.StringIO()
    handler = BatchedLineHandler(stream, interval_s=3_600)  # the flusher never fires here
    logger = logging.Logger("batched")
    logger.addHandler(handler)
    try:
        logger.info("one")
        logger.info("two")
        assert stream.getvalue() == ""  # one write per batch, not per line
        logger.warning("three")
        assert stream.getvalue() == "one\ntwo\nthree\n"
    finally:
        handler.close()


def test_a_lone_line_is_written_by_the_flusher_and_close_stops_it() -> None:
    stream = io.StringIO()
    handler = BatchedLineHandler(stream, interval_s=0.01)
    logger = logging.Logger("batched")
    logger.addHandler(handler)
    logger.info("alone")
    deadline = time.monotonic() + 30
    while stream.getvalue() != "alone\n" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.getvalue() == "alone\n"
    handler.close()
    handler._flusher.join(timeout=30)
    assert not handler._flusher.is_alive()


@pytest.mark.usefixtures("restored_logging")
def test_reconfiguring_closes_the_previous_handler_after_writing_its_lines() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", "json", first)
    old = logging.getLogger().handlers[0]
    assert isinstance(old, BatchedLineHandler)
    logging.getLogger("x").info("before")
    configure_logging("INFO", "json", second)
    assert [line["message"] for line in written(first)] == ["before"]
    old._flusher.join(timeout=30)
    assert not old._flusher.is_alive()


def test_a_closed_handler_writes_each_line_at_once() -> None:
    """logging.config.dictConfig (arq's command line) closes the handlers it finds, and ours
    stays on the root logger: its lines must still go out, now one by one."""
    stream = io.StringIO()
    handler = BatchedLineHandler(stream, interval_s=3_600)
    logger = logging.Logger("batched")
    logger.addHandler(handler)
    handler.close()
    logger.info("after close")
    assert stream.getvalue() == "after close\n"


def test_a_forked_child_starts_its_own_flusher_and_leaves_the_parents_lines_to_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "lines"
    with path.open("w") as stream:
        handler = BatchedLineHandler(stream, interval_s=3_600)
        logger = logging.Logger("batched")
        logger.addHandler(handler)
        logger.info("parent, before the fork")  # pending in both after the fork
        child = os.fork()
        if child == 0:  # the child: report whether it has a flusher, then leave at once
            logger.info(f"child, flusher alive: {handler._flusher.is_alive()}")
            handler.flush()
            os._exit(0)
        os.waitpid(child, 0)
        handler.close()
    assert path.read_text().splitlines() == [
        "child, flusher alive: True",
        "parent, before the fork",  # once: the child dropped its copy
    ]
