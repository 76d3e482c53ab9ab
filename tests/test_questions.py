"""Questions to the user and their answers (worker/questions.py): pure checks, no services."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from worker.errors import HumanInputRefused, ProtocolViolation
from worker.questions import PendingQuestion, check_answer, question_from_call

CALL = {"tool_call_id": "call_1", "tool_name": "ask_human", "metadata": {},
        "args": {"title": "Confirm", "question": "Ship it?", "markdown": "**sure?**",
                 "fields": [{"name": "answer", "type": "text"}],
                 "actions": [{"id": "approve", "label": "Approve", "style": "primary"},
                             {"id": "reject", "label": "Reject"}],
                 "urgency": "high"}}


def question(**args: Any) -> PendingQuestion:
    return question_from_call({**CALL, "args": {**CALL["args"], **args}}, run_id="r",
                              message_id="m")


def answer(q: PendingQuestion, **overrides: Any) -> Any:
    values: dict[str, Any] = {"tool_call_id": "call_1", "action": "approve",
                              "values": {"answer": "yes"}}
    values.update(overrides)
    return check_answer(q, max_bytes=1024, **values)


def test_a_deferred_call_becomes_a_question_with_its_offered_actions() -> None:
    asked = question()

    fields = asked.event_fields(datetime(2026, 12, 2, tzinfo=UTC))
    assert (fields["tool_call_id"], fields["tool_name"]) == ("call_1", "ask_human")
    assert fields["args"]["question"] == "Ship it?"
    assert [action["id"] for action in fields["actions"]] == ["approve", "reject"]
    assert fields["expires_at"] == int(datetime(2026, 12, 2, tzinfo=UTC).timestamp())


def test_the_record_for_producers_holds_the_question_its_expiry_and_its_owners_ids() -> None:
    asked = question()

    record = asked.record(datetime(2026, 12, 2, tzinfo=UTC), tenant_id="t", app_id="a",
                          user_id="u")

    assert PendingQuestion.from_json(record) == asked
    assert [action["id"] for action in record["actions"]] == ["approve", "reject"]
    assert record["expires_at"] == int(datetime(2026, 12, 2, tzinfo=UTC).timestamp())
    assert record["owner"] == {"tenant_id": "t", "app_id": "a", "user_id": "u"}
    assert json.loads(json.dumps(record)) == record, "it is stored as JSON"


def test_args_given_as_a_json_string_are_read_and_unknown_keys_dropped() -> None:
    asked = question_from_call({**CALL, "args": json.dumps({"question": "Q?", "x": 1})},
                               run_id="r", message_id="m")

    assert asked.args == {"question": "Q?"}
    assert asked.actions == [{"id": "submit", "label": "Submit"}]


@pytest.mark.parametrize("call", [
    "not an object", {**CALL, "tool_call_id": ""}, {**CALL, "tool_name": None},
    {**CALL, "args": "{not json"}, {**CALL, "args": ["a"]},
    {**CALL, "args": {"question": 5}}, {**CALL, "args": {"actions": "approve"}},
    {**CALL, "args": {"actions": [{"label": "no id"}]}},
    {**CALL, "args": {"fields": [{}] * 40}},
])
def test_a_malformed_deferred_call_is_a_protocol_violation(call: Any) -> None:
    with pytest.raises(ProtocolViolation):
        question_from_call(call, run_id="r", message_id="m")


def test_an_answer_that_fits_the_question_is_accepted_with_the_actions_label() -> None:
    accepted = answer(question())

    assert accepted.deferred_tool_results() == {"calls": {"call_1": {
        "status": "submitted", "action": {"id": "approve", "label": "Approve"},
        "values": {"answer": "yes"}}}, "metadata": {}}


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"tool_call_id": "call_2"}, "no open question"),
    ({"action": "maybe"}, "is not one of"),
    ({"values": ["yes"]}, "must be an object"),
    ({"values": {"answer": {"nested": 1}}}, "must be text"),
    ({"values": {"other": "x"}}, "asked for no field"),
    ({"values": {"answer": "y" * 2000}}, "more than 1024"),
])
def test_an_answer_that_does_not_fit_is_refused_saying_why(overrides: dict[str, Any],
                                                           reason: str) -> None:
    with pytest.raises(HumanInputRefused) as refused:
        answer(question(), **overrides)

    assert reason in str(refused.value)
    assert refused.value.code == "human_input_refused"
