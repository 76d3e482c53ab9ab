"""A turn through every real part: broker, worker process, stub backend, Redis pub/sub, database.

Each test runs once per database (the ``celery_worker`` fixture is parametrized over SQLite and
PostgreSQL).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import RunningWorker, StubControl, answer_of, make_turn
from worker.client import submit_turn


def run_turn_and_wait(turn: dict[str, Any], listen: Any, producer_app: Any,
                      worker: RunningWorker) -> list[dict[str, Any]]:
    listener = listen(turn["message_id"])
    submit_turn(turn, celery_app=producer_app, settings=worker.settings)
    return listener.wait_for_end()


def test_subscriber_receives_every_delta_in_order_then_message_end(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn(query="tell me something")
    stub.plan(turn["message_id"], answer_tokens=60, token_delay=0.001)

    events = run_turn_and_wait(turn, listen, producer_app, celery_worker)

    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    thought, *deltas, end = events
    assert end["event"] == "message_end"
    assert (thought["event"], thought["thought"], thought["position"]) == (
        "agent_thought", "Thinking about it.", 1), "the stub thinks before it answers"
    assert deltas and all(event["event"] == "agent_message" for event in deltas)
    joined = "".join(event["answer"] for event in deltas)
    assert joined == end["answer"]
    assert joined.startswith("[turn 1] You said: tell me something.")
    assert len(deltas) < 60, "sixty tokens should have been coalesced into fewer messages"
    assert end["metadata"]["usage"]["total_tokens"] > 0
    for event in events:
        assert event["message_id"] == turn["message_id"]
        assert event["conversation_id"] == turn["conversation_id"]
        assert isinstance(event["created_at"], int)
    assert len({event["task_id"] for event in events}) == 1

    message = celery_worker.store.get_message(turn["message_id"])
    assert message is not None
    assert message.status == "succeeded"
    assert message.answer == joined
    assert message.usage == end["metadata"]["usage"]
    assert message.run_id == stub.runs(turn["message_id"])[0]["run_id"]
    assert message.attempts == 1


def test_thinking_is_a_step_and_never_reaches_the_answer(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    events = run_turn_and_wait(turn, listen, producer_app, celery_worker)

    assert "Thinking" not in answer_of(events)
    assert answer_of(events) == "[turn 1] You said: hi."
    assert "Thinking" not in events[-1]["answer"]
    [step] = [event for event in events if event["event"] == "agent_thought"]
    assert (step["thought"], step["message_id"]) == ("Thinking about it.", turn["message_id"])
    assert step["id"] != turn["message_id"], "a step has its own id"
    message = celery_worker.store.get_message(turn["message_id"])
    assert "Thinking" not in message.answer
    [row] = celery_worker.store.list_steps(turn["message_id"])
    assert (row.step_id, row.position, row.thought) == (step["id"], 1, "Thinking about it.")


def test_a_turn_that_hides_thinking_has_no_thought_text_on_the_bus_or_in_the_store(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn(agent={"include_thinking": False})
    events = run_turn_and_wait(turn, listen, producer_app, celery_worker)

    assert events[-1]["event"] == "message_end"
    assert "Thinking" not in repr(events)
    assert celery_worker.store.list_steps(turn["message_id"]) == []


def test_every_message_level_event_carries_the_message_id_as_id_as_dify_does(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    events = run_turn_and_wait(turn, listen, producer_app, celery_worker)

    assert {event["id"] for event in events if event["event"] != "agent_thought"} == {
        turn["message_id"]}


def test_second_turn_sends_the_first_turns_snapshot(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    first = make_turn(query="my name is Ada")
    run_turn_and_wait(first, listen, producer_app, celery_worker)
    saved = celery_worker.store.get_snapshot(first["conversation_id"])
    assert saved is not None and saved.version == 1

    second = make_turn(conversation_id=first["conversation_id"], query="what is my name?")
    events = run_turn_and_wait(second, listen, producer_app, celery_worker)

    assert events[-1]["answer"] == "[turn 2] You said: what is my name?."
    [first_run] = stub.runs(first["message_id"])
    [second_run] = stub.runs(second["message_id"])
    assert first_run["request"]["session_snapshot"] is None
    assert second_run["request"]["session_snapshot"] == saved.snapshot
    history = next(layer for layer in saved.snapshot["layers"] if layer["name"] == "history")
    assert history["runtime_state"]["messages"][0] == {"role": "user", "content": "my name is Ada"}
    assert celery_worker.store.get_snapshot(first["conversation_id"]).version == 2


def test_run_request_carries_turn_values_and_a_message_derived_idempotency_key(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn(query="hello", agent={"system_prompt": "Be brief.", "model": "gpt-4o-mini",
                                           "parameters": {"temperature": 0.2}})
    run_turn_and_wait(turn, listen, producer_app, celery_worker)

    [run] = stub.runs(turn["message_id"])
    request = run["request"]
    layers = {layer["name"]: layer for layer in request["composition"]["layers"]}
    assert list(layers) == ["execution_context", "prompt", "history", "llm"]
    assert layers["prompt"]["config"] == {"prefix": "Be brief.", "user": "hello"}
    assert layers["execution_context"]["config"]["conversation_id"] == turn["conversation_id"]
    assert layers["llm"]["config"]["model"] == "gpt-4o-mini"
    assert layers["llm"]["config"]["model_settings"] == {"temperature": 0.2}
    assert request["idempotency_key"] == f"agent-turn:{turn['message_id']}:1"
    assert request["metadata"]["message_id"] == turn["message_id"]


def test_structured_output_replaces_the_streamed_text(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], output={"answer": "Structured answer.", "score": 3})

    events = run_turn_and_wait(turn, listen, producer_app, celery_worker)

    assert [event["event"] for event in events[-2:]] == ["message_replace", "message_end"]
    assert events[-2]["answer"] == "Structured answer."
    assert events[-1]["answer"] == "Structured answer."
    assert answer_of(events) == "Structured answer."
    message = celery_worker.store.get_message(turn["message_id"])
    assert message is not None and message.answer == "Structured answer."


def test_object_output_without_answer_field_becomes_compact_json(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], output={"city": "Zürich", "days": [1, 2]})

    events = run_turn_and_wait(turn, listen, producer_app, celery_worker)

    assert events[-1]["answer"] == '{"city":"Zürich","days":[1,2]}'
    assert answer_of(events) == events[-1]["answer"]


# A question to the user, answered --------------------------------------------------------


def test_a_question_pauses_the_turn_and_the_answer_resumes_it_on_the_same_message(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    from worker.client import submit_human_input
    from worker.errors import HumanInputRefused

    turn = make_turn(query="CALL_TOOL:ask_human when ready")
    listener = listen(turn["message_id"])
    submit_turn(turn, celery_app=producer_app, settings=celery_worker.settings)
    asked = listener.wait_for("human_input_required")

    assert asked["event"] == "human_input_required" and asked["tool_name"] == "ask_human"
    assert asked["args"]["question"] == "Please confirm: CALL_TOOL:ask_human when ready"
    assert celery_worker.store.get_message(turn["message_id"]).status == "awaiting_input"
    owner = {k: turn[k] for k in ("tenant_id", "app_id", "user_id")}
    submit_human_input(turn["message_id"], asked["tool_call_id"], "submit", {"answer": "yes"},
                       celery_app=producer_app, settings=celery_worker.settings, **owner)

    events = listener.wait_for_end()
    end = events[-1]
    assert end["event"] == "message_end"
    assert end["answer"] == ('Tool ask_human said: {"status":"submitted","action":'
                             '{"id":"submit","label":"Submit"},"values":{"answer":"yes"}}')
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert [event["event"] for event in events].count("message_end") == 1
    steps = [event for event in events if event["event"] == "agent_thought"]
    assert {step["id"] for step in steps} == {steps[0]["id"]}, "one ask_human step, completed"
    assert '"answer":"yes"' in steps[-1]["observation"]
    assert len(stub.runs(turn["message_id"])) == 2
    with pytest.raises(HumanInputRefused):
        submit_human_input(turn["message_id"], asked["tool_call_id"], "submit", {},
                           celery_app=producer_app, settings=celery_worker.settings, **owner)
    message = celery_worker.store.get_message(turn["message_id"])
    assert (message.status, message.answer) == ("succeeded", end["answer"])


def test_a_turn_sent_while_its_conversation_awaits_an_answer_is_refused(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    asking = make_turn(query="CALL_TOOL:ask_human now")
    listener = listen(asking["message_id"])
    submit_turn(asking, celery_app=producer_app, settings=celery_worker.settings)
    assert listener.wait_for("human_input_required")["event"] == "human_input_required"

    follow = make_turn(conversation_id=asking["conversation_id"], query="hello?")
    events = run_turn_and_wait(follow, listen, producer_app, celery_worker)

    assert (events[-1]["event"], events[-1]["code"]) == ("error", "conversation_awaiting_input")
    assert stub.create_calls(follow["message_id"]) == 0
