"""Event validation of the backend client (worker/backend.py ``parse_event``, ``answer_delta_of``).

Pure tests: each event is the ``data`` line of an SSE frame, as ../shared/agent-protocol.md shows
them; no server is involved.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.backend import RunEvent, answer_delta_of, parse_event
from worker.errors import PermanentAgentError, ProtocolViolation

RUN_ID = "1d68c0de-5a1b-4f7e-9c1d-2e3f4a5b6c7d"

# The first frame of the protocol document, unabridged.
REAL_PART_START = (
    '{"id":"1795534212038-0","run_id":"1d68c0de-5a1b-4f7e-9c1d-2e3f4a5b6c7d",'
    '"created_at":"2026-11-24T15:30:12.037576Z","type":"pydantic_ai_event",'
    '"data":{"index":0,"part":{"content":"[turn","id":null,"provider_details":null,'
    '"part_kind":"text"},"previous_part_kind":null,"event_kind":"part_start"},'
    '"agent_message_delta":"[turn"}'
)
REAL_RUN_SUCCEEDED = (
    '{"id":"1795534212144-0","run_id":"1d68c0de-5a1b-4f7e-9c1d-2e3f4a5b6c7d",'
    '"created_at":"2026-11-24T15:30:12.144000Z","type":"run_succeeded",'
    '"data":{"session_snapshot":{"schema_version":1,"layers":[{"name":"execution_context",'
    '"lifecycle_state":"suspended","runtime_state":{}},{"name":"history",'
    '"lifecycle_state":"suspended","runtime_state":{"messages":[]}}]},'
    '"output":"[turn 1] You said: hi.","usage":{"prompt_tokens":10,"completion_tokens":7,'
    '"total_tokens":17,"total_price":"0.0001","currency":"USD"}}}'
)


def frame(event_type: str = "pydantic_ai_event", data: Any = None, *,
          event_id: str = "1-0", **extra: Any) -> str:
    envelope: dict[str, Any] = {
        "id": event_id, "run_id": RUN_ID, "created_at": "2026-11-24T15:30:12Z",
        "type": event_type, "data": {} if data is None else data,
    }
    envelope.update(extra)
    return json.dumps(envelope)


def text_part_start(content: str) -> dict[str, Any]:
    return {"event_kind": "part_start", "index": 0,
            "part": {"part_kind": "text", "content": content}}


def text_part_delta(content: str) -> dict[str, Any]:
    return {"event_kind": "part_delta", "index": 0,
            "delta": {"part_delta_kind": "text", "content_delta": content}}


def violation(raw: str) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as caught:
        parse_event(raw, RUN_ID)
    return caught.value


# Valid events ------------------------------------------------------------------------------


def test_real_part_start_frame_parses_with_its_delta() -> None:
    event = parse_event(REAL_PART_START, RUN_ID)

    assert event == RunEvent(
        event_id="1795534212038-0",
        type="pydantic_ai_event",
        data={"index": 0, "part": {"content": "[turn", "id": None, "provider_details": None,
                                   "part_kind": "text"},
              "previous_part_kind": None, "event_kind": "part_start"},
        answer_delta="[turn",
    )
    assert event.terminal is False


def test_real_run_succeeded_frame_parses_as_terminal() -> None:
    event = parse_event(REAL_RUN_SUCCEEDED, RUN_ID)

    assert event is not None
    assert event.type == "run_succeeded"
    assert event.terminal is True
    assert event.answer_delta is None
    assert event.data["output"] == "[turn 1] You said: hi."
    assert event.data["session_snapshot"]["layers"][1]["name"] == "history"


def test_run_started_parses_without_delta() -> None:
    event = parse_event(frame("run_started", event_id="0-1"), RUN_ID)

    assert event == RunEvent("0-1", "run_started", {}, None)
    assert event.terminal is False


def test_event_without_run_id_is_accepted() -> None:
    raw = json.dumps({"id": "1-0", "type": "run_started", "data": {}})

    assert parse_event(raw, RUN_ID) == RunEvent("1-0", "run_started", {}, None)


def test_run_succeeded_with_a_deferred_tool_call_instead_of_output_parses() -> None:
    data = {"session_snapshot": {"layers": []},
            "deferred_tool_call": {"tool_call_id": "c1", "tool_name": "ask", "args": {},
                                   "metadata": {}}}

    event = parse_event(frame("run_succeeded", data), RUN_ID)

    assert event is not None and event.terminal
    assert event.data["deferred_tool_call"]["tool_name"] == "ask"


@pytest.mark.parametrize("output", [None, "", {"answer": "x"}, [1, 2]])
def test_run_succeeded_output_may_be_any_json(output: Any) -> None:
    event = parse_event(frame("run_succeeded", {"session_snapshot": None, "output": output}),
                        RUN_ID)

    assert event is not None and event.data["output"] == output


@pytest.mark.parametrize("data", [
    {"error": "rate limited", "reason": "InvokeRateLimitError"},
    {"error": "boom"},
])
def test_run_failed_with_an_error_parses_as_terminal(data: dict[str, Any]) -> None:
    event = parse_event(frame("run_failed", data), RUN_ID)

    assert event is not None and event.terminal and event.data == data


def test_run_cancelled_parses_as_terminal() -> None:
    event = parse_event(frame("run_cancelled", {"reason": "user_stop", "message": None}), RUN_ID)

    assert event is not None and event.terminal


def test_terminal_events_carry_no_answer_delta_even_if_the_envelope_has_one() -> None:
    event = parse_event(frame("run_succeeded", {"output": "x"}, agent_message_delta="x"), RUN_ID)

    assert event is not None and event.answer_delta is None


@pytest.mark.parametrize("event_type", ["run_progress", "heartbeat", "tool_approval"])
def test_unknown_event_type_is_skipped(event_type: str) -> None:
    assert parse_event(frame(event_type, {"anything": 1}), RUN_ID) is None


# Answer deltas -----------------------------------------------------------------------------


def test_null_agent_message_delta_means_no_delta() -> None:
    data = {"tool_name": None, "tool_call_id": None, "event_kind": "final_result"}

    event = parse_event(frame(data=data, agent_message_delta=None), RUN_ID)

    assert event is not None and event.answer_delta is None


def test_null_agent_message_delta_wins_over_text_in_the_part() -> None:
    # part_end repeats the whole text: the server marks it null, and it must not be re-read.
    data = {"event_kind": "part_end", "index": 0,
            "part": {"part_kind": "text", "content": "[turn 1] You said: hi."}}

    assert answer_delta_of({"data": data, "agent_message_delta": None}) is None
    assert answer_delta_of({"data": text_part_start("hi"), "agent_message_delta": None}) is None


def test_empty_agent_message_delta_means_no_delta() -> None:
    event = parse_event(frame(data=text_part_delta(""), agent_message_delta=""), RUN_ID)

    assert event is not None and event.answer_delta is None


def test_agent_message_delta_is_taken_as_given() -> None:
    event = parse_event(frame(data=text_part_delta("ignored"), agent_message_delta=" 1]"), RUN_ID)

    assert event is not None and event.answer_delta == " 1]"


def test_thinking_part_start_without_the_field_is_no_delta() -> None:
    data = {"event_kind": "part_start", "index": 0,
            "part": {"part_kind": "thinking", "content": "Let me think"}}

    assert answer_delta_of({"data": data}) is None
    event = parse_event(frame(data=data), RUN_ID)
    assert event is not None and event.answer_delta is None


def test_thinking_part_delta_without_the_field_is_no_delta() -> None:
    data = {"event_kind": "part_delta", "index": 0,
            "delta": {"part_delta_kind": "thinking", "content_delta": "hmm"}}

    assert answer_delta_of({"data": data}) is None


def test_text_part_start_without_the_field_is_the_text() -> None:
    assert answer_delta_of({"data": text_part_start("[turn")}) == "[turn"
    event = parse_event(frame(data=text_part_start("[turn")), RUN_ID)
    assert event is not None and event.answer_delta == "[turn"


def test_text_part_delta_without_the_field_is_the_text() -> None:
    assert answer_delta_of({"data": text_part_delta(" 1]")}) == " 1]"
    event = parse_event(frame(data=text_part_delta(" 1]")), RUN_ID)
    assert event is not None and event.answer_delta == " 1]"


@pytest.mark.parametrize("data", [
    {"event_kind": "part_end", "index": 0, "part": {"part_kind": "text", "content": "all"}},
    {"event_kind": "part_start", "index": 1,
     "part": {"part_kind": "tool-call", "tool_name": "search", "args": "{}"}},
    {"event_kind": "part_delta", "index": 1,
     "delta": {"part_delta_kind": "tool_call", "args_delta": '{"q":'}},
    {"event_kind": "function_tool_call", "part": {"tool_name": "search"}},
    {"event_kind": "final_result", "tool_name": None, "tool_call_id": None},
    text_part_start(""),
    text_part_delta(""),
    {"event_kind": "part_start", "part": {"part_kind": "text", "content": 5}},
    {},
])
def test_events_without_the_field_that_add_no_answer_text(data: dict[str, Any]) -> None:
    assert answer_delta_of({"data": data}) is None


def test_envelope_without_data_has_no_delta() -> None:
    assert answer_delta_of({}) is None
    assert answer_delta_of({"data": None}) is None


# Protocol violations -----------------------------------------------------------------------


def test_undecodable_json_is_a_protocol_violation() -> None:
    error = violation('{"id": "1-0", "type": ')

    assert error.message.startswith("undecodable event frame: ")


@pytest.mark.parametrize("raw", [
    frame(data=text_part_delta("x"), agent_message_delta="\ud800"),
    '{"id":"1-0","type":"pydantic_ai_event","data":{},"agent_message_delta":"a\\udc80b"}',
    '{"id":"1-0","type":"pydantic_ai_event","data":{"n":NaN}}',
    '{"id":"1-0","type":"run_succeeded","data":{"output":"x","usage":{"n":Infinity}}}',
])
def test_a_frame_that_is_not_json_of_unicode_text_is_a_protocol_violation(raw: str) -> None:
    # A lone surrogate escape decodes to no Unicode character, and NaN and Infinity are not
    # JSON: refused here instead of failing later wherever the text is written out.
    assert violation(raw).message.startswith("undecodable event frame: ")


def test_the_terminal_events_snapshot_keeps_integers_beyond_64_bits_exactly() -> None:
    big = 2**70 + 1
    data = {"output": "x", "session_snapshot": {"schema_version": 1, "counter": big}}

    event = parse_event(frame("run_succeeded", data), RUN_ID)

    assert event is not None
    assert event.data["session_snapshot"]["counter"] == big


@pytest.mark.parametrize("raw", ["[]", '"run_started"', "42", "null", "true"])
def test_non_object_frame_is_a_protocol_violation(raw: str) -> None:
    assert violation(raw).message == "event frame is not a JSON object"


@pytest.mark.parametrize("event_id", [None, "", 17])
def test_event_without_an_id_is_a_protocol_violation(event_id: Any) -> None:
    raw = json.dumps({"id": event_id, "run_id": RUN_ID, "type": "run_started", "data": {}})

    assert violation(raw).message == "event without an id"


def test_event_missing_the_id_key_is_a_protocol_violation() -> None:
    raw = json.dumps({"run_id": RUN_ID, "type": "run_started", "data": {}})

    assert violation(raw).message == "event without an id"


@pytest.mark.parametrize("event_type", [None, 3, ["run_started"]])
def test_event_without_a_type_is_a_protocol_violation(event_type: Any) -> None:
    raw = json.dumps({"id": "5-0", "run_id": RUN_ID, "type": event_type, "data": {}})

    assert violation(raw).message == "event 5-0 has no type"


def test_event_missing_the_type_key_is_a_protocol_violation() -> None:
    raw = json.dumps({"id": "5-0", "run_id": RUN_ID, "data": {}})

    assert violation(raw).message == "event 5-0 has no type"


@pytest.mark.parametrize("data", [None, [], "text", 1])
def test_event_whose_data_is_not_an_object_is_a_protocol_violation(data: Any) -> None:
    raw = json.dumps({"id": "6-0", "run_id": RUN_ID, "type": "run_started", "data": data})

    assert violation(raw).message == "event 6-0 (run_started) has no data object"


def test_event_missing_data_is_a_protocol_violation() -> None:
    raw = json.dumps({"id": "6-0", "run_id": RUN_ID, "type": "run_started"})

    assert "has no data object" in violation(raw).message


def test_event_of_another_run_is_a_protocol_violation() -> None:
    error = violation(frame("run_started", event_id="7-0", run_id="someone-elses-run"))

    assert error.message == "event 7-0 belongs to another run"


def test_event_of_another_run_is_refused_even_with_an_unknown_type() -> None:
    error = violation(frame("run_progress", event_id="7-1", run_id="someone-elses-run"))

    assert error.message == "event 7-1 belongs to another run"


@pytest.mark.parametrize("delta", [5, ["a"], {"text": "a"}, True])
def test_non_string_delta_is_a_protocol_violation(delta: Any) -> None:
    error = violation(frame(data=text_part_delta("a"), event_id="8-0",
                            agent_message_delta=delta))

    assert error.message == "event 8-0: agent_message_delta is not text"


@pytest.mark.parametrize("data", [{}, {"session_snapshot": {"layers": []}},
                                  {"usage": {"total_tokens": 1}}])
def test_run_succeeded_without_output_or_deferred_call_is_a_protocol_violation(
        data: dict[str, Any]) -> None:
    error = violation(frame("run_succeeded", data, event_id="9-0"))

    assert error.message == "event 9-0: run_succeeded carries no output"


@pytest.mark.parametrize("snapshot", ["opaque", [], 1])
def test_run_succeeded_with_a_non_object_snapshot_is_a_protocol_violation(
        snapshot: Any) -> None:
    error = violation(frame("run_succeeded", {"session_snapshot": snapshot, "output": "x"},
                            event_id="9-1"))

    assert error.message == "event 9-1: session_snapshot is not an object"


def test_run_succeeded_with_non_object_usage_is_a_protocol_violation() -> None:
    error = violation(frame("run_succeeded", {"output": "x", "usage": [1]}, event_id="9-2"))

    assert error.message == "event 9-2: usage is not an object"


@pytest.mark.parametrize("data", [{}, {"reason": "InvokeRateLimitError"}, {"error": None},
                                  {"error": {"message": "boom"}}])
def test_run_failed_without_an_error_is_a_protocol_violation(data: dict[str, Any]) -> None:
    error = violation(frame("run_failed", data, event_id="10-0"))

    assert error.message == "event 10-0: run_failed without an error"


@pytest.mark.parametrize("raw", [
    "not json",
    "[]",
    json.dumps({"type": "run_started", "data": {}}),
    json.dumps({"id": "1-0", "data": {}}),
    json.dumps({"id": "1-0", "type": "run_started", "data": None}),
    json.dumps({"id": "1-0", "run_id": "other", "type": "run_started", "data": {}}),
    json.dumps({"id": "1-0", "type": "run_failed", "data": {}}),
])
def test_every_protocol_violation_is_permanent_and_carries_the_run_id(raw: str) -> None:
    error = violation(raw)

    assert isinstance(error, PermanentAgentError)
    assert error.retryable is False
    assert error.run_id == RUN_ID
    assert f"run_id={RUN_ID}" in str(error)
