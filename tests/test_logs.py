"""Log lines (worker/logs.py): stage lines, and records that no payload value can forge."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from worker.logs import (
    LOG_MESSAGE_CHARS,
    LOG_VALUE_CHARS,
    SafeLogRecord,
    excerpt,
    install_safe_log_records,
    log_stage,
)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """A handler on a logger of its own, with safe records for the test's duration."""
    previous = logging.getLogRecordFactory()
    install_safe_log_records()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("tests.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logging.setLogRecordFactory(previous)


def test_a_value_with_line_breaks_cannot_forge_a_log_line(captured: io.StringIO) -> None:
    logging.getLogger("tests.logs").warning("unknown key %s", "x\nCRITICAL forged\r\n\u2028y")

    lines = captured.getvalue().splitlines()
    assert lines == ["WARNING unknown key x\\x0aCRITICAL forged\\x0d\\x0a\\u2028y"]


def test_a_huge_value_is_cut_with_a_marker_saying_how_much(captured: io.StringIO) -> None:
    logging.getLogger("tests.logs").info("id %s", "m" * 60_000)

    [line] = captured.getvalue().splitlines()
    assert len(line) < LOG_VALUE_CHARS + 50
    assert line.endswith(f"…(+{60_000 - LOG_VALUE_CHARS} chars)")


def test_a_message_built_from_many_values_is_bounded_too(captured: io.StringIO) -> None:
    logging.getLogger("tests.logs").info(" ".join(["%s"] * 40), *(["v" * 400] * 40))

    [line] = captured.getvalue().splitlines()
    assert len(line) < LOG_MESSAGE_CHARS + 50


def test_numbers_keep_their_format_and_mappings_are_escaped(captured: io.StringIO) -> None:
    logger = logging.getLogger("tests.logs")
    logger.info("%d turns in %.1fs", 3, 2.25)
    logger.info("%(name)s done", {"name": "task\nforged"})

    assert captured.getvalue().splitlines() == ["INFO 3 turns in 2.2s", "INFO task\\x0aforged done"]


def test_lone_surrogates_are_escaped_so_the_line_can_be_written() -> None:
    assert excerpt("a\ud800b") == "a\\ud800b"
    assert excerpt("a\ud800b").encode("utf-8")


def test_an_exception_argument_is_escaped_through_its_text() -> None:
    record = SafeLogRecord("x", logging.ERROR, __file__, 1, "failed: %s",
                           (ValueError("bad\nline"),), None)

    assert record.getMessage() == "failed: bad\\x0aline"


def test_stage_lines_are_one_json_object_without_empty_fields(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="agent_turn.stages"):
        log_stage("received", task_id="t-1", message_id="m-1", conversation_id=None)

    [record] = caplog.records
    assert json.loads(record.getMessage()) == {"stage": "received", "task_id": "t-1",
                                               "message_id": "m-1"}
