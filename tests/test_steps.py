"""Run events to agent steps (worker/steps.py), on streams captured from the reference server.

Pure tests: the translation reads ``../shared/agent-protocol-frames/`` as the worker's backend
client would parse them, with no service involved.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from worker.backend import RunEvent, parse_event
from worker.steps import CUT_MARKER, AgentStep, StepExposure, StepTracker

FRAMES = ROOT.parent / "shared" / "agent-protocol-frames"


def captured(name: str) -> list[RunEvent]:
    text = (FRAMES / f"{name}.sse").read_text()
    events = []
    for data in re.findall(r"^data: (.*)$", text, re.MULTILINE):
        event = parse_event(data, json.loads(data)["run_id"])
        if event is not None:
            events.append(event)
    return events


def feed_all(tracker: StepTracker, events: list[RunEvent]) -> list[AgentStep]:
    return [step for event in events if (step := tracker.feed(event)) is not None]


def _event(data: dict[str, Any]) -> RunEvent:
    return RunEvent("1-0", "pydantic_ai_event", data, None)


def thinking(index: int, text: str, kind: str = "part_delta") -> RunEvent:
    if kind == "part_delta":
        return _event({"index": index, "event_kind": "part_delta",
                       "delta": {"part_delta_kind": "thinking", "content_delta": text}})
    return _event({"index": index, "event_kind": kind,
                   "part": {"part_kind": "thinking", "content": text}})


def tool_call(call_id: str, name: str = "lookup", args: str = '{"q": 1}') -> RunEvent:
    return _event({"index": 0, "event_kind": "part_start",
                   "part": {"part_kind": "tool-call", "tool_name": name, "args": args,
                            "tool_call_id": call_id}})


def tool_result(call_id: str, content: Any, kind: str = "tool-return") -> RunEvent:
    return _event({"event_kind": "function_tool_result",
                   "part": {"part_kind": kind, "tool_call_id": call_id, "content": content,
                            "tool_name": "lookup"}})


def test_thinking_deltas_grow_one_step_whose_part_end_is_authoritative() -> None:
    tracker = StepTracker("msg-1")

    updates = feed_all(tracker, captured("thinking"))

    assert {step.id for step in updates} == {updates[0].id}
    assert [step.thought for step in updates] == [
        "\nCounting user messages: ", "\nCounting user messages: 1.",
        "\nCounting user messages: 1.\n"]
    [final] = tracker.steps()
    assert (final.position, final.tool, final.tool_input, final.observation) == (1, "", "", "")


def test_thinking_never_reaches_the_answer_deltas() -> None:
    answer = "".join(event.answer_delta or "" for event in captured("thinking"))

    assert "Counting" not in answer
    assert answer.endswith("You said: THINK first")


def test_a_refused_tool_call_is_one_step_with_its_input_and_the_refusal() -> None:
    tracker = StepTracker("msg-1")

    feed_all(tracker, captured("tool_unknown"))

    [step] = tracker.steps()
    assert step.tool == "lookup"
    assert json.loads(step.tool_input) == {"question": "Please confirm: CALL_TOOL:lookup please"}
    assert step.observation == "Unknown tool name: 'lookup'. No tools available."
    assert step.thought == ""


def test_a_resumed_run_finishes_the_ask_human_step_with_the_answer() -> None:
    tracker = StepTracker("msg-1")
    feed_all(tracker, captured("ask_human"))
    [asked] = tracker.steps()
    assert (asked.tool, asked.observation) == ("ask_human", "")

    feed_all(tracker, captured("ask_human_resumed"))

    [answered] = tracker.steps()
    assert answered.id == asked.id
    assert json.loads(answered.observation) == {
        "status": "submitted", "action": {"id": "submit", "label": "Submit"},
        "values": {"answer": "yes"}}


def test_two_rounds_give_two_steps_in_order_each_with_its_own_result() -> None:
    tracker = StepTracker("msg-1")
    feed_all(tracker, [thinking(0, "first I look", "part_start"), tool_call("call-1"),
                       tool_result("call-1", "one"), thinking(0, "then again", "part_start"),
                       tool_call("call-2", args='{"q": 2}'),
                       tool_result("call-2", {"n": 2})])

    first, second = tracker.steps()
    assert (first.position, first.thought, first.observation) == (1, "first I look", "one")
    assert (second.position, second.thought, second.observation) == (2, "then again",
                                                                     '{"n":2}')
    assert first.id != second.id


def test_hidden_thinking_leaves_no_thought_text_and_no_thinking_only_step() -> None:
    tracker = StepTracker("msg-1", StepExposure(thinking=False))

    updates = feed_all(tracker, [*captured("thinking"), thinking(5, "secret plan", "part_start"),
                                 tool_call("call-1"), tool_result("call-1", "done")])

    assert "Counting" not in repr(updates) and "secret plan" not in repr(updates)
    [step] = tracker.steps()
    assert (step.position, step.thought, step.tool, step.observation) == (1, "", "lookup",
                                                                         "done")


def test_hidden_tool_calls_leave_only_thinking_steps() -> None:
    tracker = StepTracker("msg-1", StepExposure(tool_calls=False))

    updates = feed_all(tracker, [*captured("tool_unknown"), *captured("thinking")])

    assert "lookup" not in repr(updates) and "Unknown tool" not in repr(updates)
    [step] = tracker.steps()
    assert step.thought.startswith("\nCounting")


def test_fields_past_their_bound_are_cut_with_the_marker() -> None:
    tracker = StepTracker("msg-1", StepExposure(max_field_chars=10))

    feed_all(tracker, [thinking(0, "t" * 50, "part_start"), tool_call("c", args="a" * 50),
                       tool_result("c", "o" * 50)])

    [step] = tracker.steps()
    assert step.thought == "t" * 10 + CUT_MARKER
    assert step.tool_input == "a" * 10 + CUT_MARKER
    assert step.observation == "o" * 10 + CUT_MARKER


def test_steps_past_the_maximum_are_counted_not_shown() -> None:
    tracker = StepTracker("msg-1", StepExposure(max_steps=2))

    for n in range(5):
        feed_all(tracker, [tool_call(f"call-{n}"), tool_result(f"call-{n}", str(n))])

    assert [step.observation for step in tracker.steps()] == ["0", "1"]
    assert tracker.dropped > 0


def test_step_ids_are_stable_for_one_run_and_new_for_another() -> None:
    events = captured("tool_unknown")
    first, again, other = (StepTracker("msg-1", run_key="run-a"),
                           StepTracker("msg-1", run_key="run-a"),
                           StepTracker("msg-1", run_key="run-b"))
    for tracker in (first, again, other):
        feed_all(tracker, events)

    assert first.steps() == again.steps()
    assert first.steps()[0].id != other.steps()[0].id


def test_an_update_that_changes_nothing_is_not_sent_again() -> None:
    tracker = StepTracker("msg-1")
    assert tracker.feed(thinking(0, "same", "part_start")) is not None

    assert tracker.feed(thinking(0, "same", "part_end")) is None


@pytest.mark.parametrize("data", [
    {"event_kind": "part_delta", "index": 0, "delta": "not an object"},
    {"event_kind": "part_start", "part": ["not", "an", "object"]},
    {"event_kind": "function_tool_result", "part": None},
    {"event_kind": "part_delta", "index": 0,
     "delta": {"part_delta_kind": "thinking", "content_delta": 42}},
])
def test_malformed_process_events_are_ignored_not_fatal(data: dict[str, Any]) -> None:
    tracker = StepTracker("msg-1")

    for event in (_event(data), tool_result("x", None)):
        tracker.feed(event)

    assert all(step.thought == "" for step in tracker.steps())


def test_a_step_event_carries_difys_agent_thought_fields() -> None:
    tracker = StepTracker("msg-1")
    [step] = [s for s in feed_all(tracker, captured("tool_unknown"))][-1:]

    assert set(step.event_fields()) == {"id", "position", "thought", "tool", "tool_labels",
                                        "tool_input", "observation", "message_files"}
    assert step.event_fields()["tool_labels"] == {} and step.event_fields()["message_files"] == []


def test_the_captured_frames_are_where_the_tests_expect_them() -> None:
    assert Path(FRAMES / "thinking.sse").is_file()
