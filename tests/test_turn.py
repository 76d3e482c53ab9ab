"""One attempt at a turn, run in-process against real Redis, SQLite and the stub backend.

These cover what the worker-process tests cannot steer precisely: races between turns of one
conversation, limits, cancellation and what a retry attempt tells the client.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stub_backend import StubServer
from tests.conftest import (
    StubControl,
    TurnListener,
    answer_of,
    base_settings,
    make_turn,
    sqlite_url,
    wait_until,
)
from worker.errors import ConversationBusy, ProtocolViolation, RunCancelled, TurnTakenOver
from worker.ownership import owner_fingerprint, owner_key
from worker.payload import parse_turn
from worker.supervisor import stop_key
from worker.turn import TurnServices, end_stopped_before_running, run_turn

ServicesFactory = Callable[..., TurnServices]


@pytest.fixture
def make_services(stub_server: StubServer, tmp_path: Path) -> Iterator[ServicesFactory]:
    made: list[TurnServices] = []

    def make(**overrides: Any) -> TurnServices:
        settings = base_settings(database_url=sqlite_url(tmp_path), backend_url=stub_server.url,
                                 **overrides)
        services = TurnServices.from_settings(settings)
        made.append(services)
        return services

    yield make
    for services in made:
        services.backend.close()
        services.store.engine.dispose()


def attempt(services: TurnServices, turn: dict[str, Any]) -> Any:
    return run_turn(parse_turn(turn, services.settings), task_id="task-1", services=services)


def test_a_successful_attempt_returns_a_summary_without_the_answer_text(
    make_services: ServicesFactory, stub: StubControl
) -> None:
    outcome = attempt(make_services(), make_turn())

    summary = outcome.summary()
    assert summary["status"] == "succeeded"
    assert summary["answer_chars"] == len("[turn 1] You said: hi.")
    assert "answer" not in summary
    assert summary["run_id"] == stub.runs()[0]["run_id"]


def test_an_oversize_answer_is_refused_and_nothing_is_saved(
    make_services: ServicesFactory, stub: StubControl, listen: Callable[[str], TurnListener]
) -> None:
    services = make_services(max_answer_chars=50)
    turn = make_turn()
    stub.plan(turn["message_id"], answer_tokens=40)

    with pytest.raises(ProtocolViolation, match="exceeds 50 characters") as raised:
        attempt(services, turn)

    assert raised.value.run_id == stub.runs(turn["message_id"])[0]["run_id"]
    assert services.store.get_snapshot(turn["conversation_id"]) is None
    message = services.store.get_message(turn["message_id"])
    assert message is not None and message.status == "running" and message.answer is None


def test_a_second_turn_waits_while_its_conversation_is_busy(
    make_services: ServicesFactory, stub: StubControl
) -> None:
    services = make_services()
    first = make_turn(query="first")
    second = make_turn(conversation_id=first["conversation_id"], query="second")
    stub.plan(first["message_id"], token_delay=0.02, answer_tokens=20)
    failures: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(failures, attempt, services, first))
    thread.start()
    wait_until(lambda: bool(stub.runs(first["message_id"])))

    with pytest.raises(ConversationBusy) as busy:
        attempt(services, second)

    assert busy.value.retryable and busy.value.queued_since is not None
    waiting = services.store.get_message(second["message_id"])
    assert waiting is not None and (waiting.status, waiting.attempts) == ("queued", 0)
    assert stub.runs(second["message_id"]) == []
    thread.join(timeout=20)
    assert not thread.is_alive() and failures == []

    outcome = attempt(services, second)

    assert outcome.answer == "[turn 2] You said: second."
    [second_run] = stub.runs(second["message_id"])
    first_snapshot = stub.runs(first["message_id"])[0]
    assert second_run["request"]["session_snapshot"] is not None
    assert first_snapshot["status"] == "succeeded"


def test_a_turn_whose_lease_another_took_stops_and_cannot_overwrite_a_newer_snapshot(
    make_services: ServicesFactory, stub: StubControl, redis_client: Any
) -> None:
    services = make_services()
    slow = make_turn(query="slow")
    fast = make_turn(conversation_id=slow["conversation_id"], query="fast")
    stub.plan(slow["message_id"], token_delay=0.05, answer_tokens=20)
    failures: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(failures, attempt, services, slow))
    thread.start()
    wait_until(lambda: bool(stub.runs(slow["message_id"])))
    # The slow turn's worker "paused" past its lease: the lease is gone, a newer turn runs.
    redis_client.delete(services.locks.key_for(slow["conversation_id"]))
    attempt(services, fast)
    thread.join(timeout=20)

    assert not thread.is_alive()
    assert [type(exc) for exc in failures] == [TurnTakenOver], (
        "its events are fenced by the lease the newer turn holds now")
    saved = services.store.get_snapshot(slow["conversation_id"])
    assert saved is not None and saved.version == 1 and saved.last_message_id == fast["message_id"]
    slow_message = services.store.get_message(slow["message_id"])
    assert slow_message is not None and slow_message.status != "succeeded"


def test_a_snapshot_from_another_composition_is_not_sent_back(
    make_services: ServicesFactory, stub: StubControl, tmp_path: Path
) -> None:
    services = make_services()
    first = make_turn()
    attempt(services, first)
    template = tmp_path / "three-layers.json"
    template.write_text(
        '{"schema_version": 1, "layers": ['
        '{"name": "prompt", "type": "plain.prompt", "config": {"user": "{{query}}"}},'
        '{"name": "history", "type": "pydantic_ai.history"},'
        '{"name": "llm", "type": "dify.plugin.llm", "config": {"model": "{{model}}"}}]}'
    )
    changed = make_services(composition_template=template)
    second = make_turn(conversation_id=first["conversation_id"])

    attempt(changed, second)

    [run] = stub.runs(second["message_id"])
    assert run["request"]["session_snapshot"] is None
    assert [layer["name"] for layer in run["request"]["composition"]["layers"]] == [
        "prompt", "history", "llm"]
    assert changed.store.get_snapshot(first["conversation_id"]).version == 2


def test_a_retry_after_published_text_first_tells_the_client_to_reset(
    make_services: ServicesFactory, stub: StubControl, listen: Callable[[str], TurnListener]
) -> None:
    services = make_services()
    turn = make_turn()
    stub.plan(turn["message_id"], fail={"reason": "InvokeRateLimitError", "after_tokens": 3,
                                        "times": 1})
    listener = listen(turn["message_id"])

    with pytest.raises(Exception, match="InvokeRateLimitError"):
        attempt(services, turn)
    attempt(services, turn)
    events = listener.wait_for_end()

    kinds = [event["event"] for event in events]
    first_replace = kinds.index("message_replace")
    assert events[first_replace]["answer"] == ""
    assert "agent_message" in kinds[:first_replace], "the failed attempt had published text"
    assert answer_of(events) == "[turn 1] You said: hi."
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))


def test_a_run_cancelled_by_the_backend_ends_the_attempt(
    make_services: ServicesFactory, stub: StubControl
) -> None:
    services = make_services()
    turn = make_turn()
    stub.plan(turn["message_id"], token_delay=0.05, answer_tokens=100)
    failures: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(failures, attempt, services, turn))
    thread.start()
    wait_until(lambda: bool(stub.runs(turn["message_id"])))

    assert services.backend.cancel_run(stub.runs(turn["message_id"])[0]["run_id"])
    thread.join(timeout=20)

    assert [type(exc) for exc in failures] == [RunCancelled]
    assert services.store.get_snapshot(turn["conversation_id"]) is None


def _capture(failures: list[BaseException], function: Callable[..., Any], *args: Any) -> None:
    try:
        function(*args)
    except BaseException as exc:
        failures.append(exc)


def test_a_revoke_announced_after_the_turn_ended_publishes_no_second_end(
    make_services: ServicesFactory, listen: Callable[[str], TurnListener]
) -> None:
    """A revoke can reach a task whose turn has already ended (a finished turn's message
    redelivered, then revoked): ending it "before it ran" would be a second ``message_end``."""
    services = make_services()
    turn = make_turn()
    listener = listen(turn["message_id"])
    attempt(services, turn)
    first = listener.wait_for_end()

    again = end_stopped_before_running(parse_turn(turn, services.settings), task_id="task-1",
                                       services=services)

    listener.drain_quietly(0.3)
    assert again is None
    assert [event["event"] for event in listener.events] == [e["event"] for e in first]
    assert [event["event"] for event in first].count("message_end") == 1


def test_a_finished_turn_delivered_again_with_its_stop_flag_set_publishes_no_second_end(
    make_services: ServicesFactory, listen: Callable[[str], TurnListener],
    redis_client: Any,
) -> None:
    services = make_services()
    turn = make_turn()
    listener = listen(turn["message_id"])
    attempt(services, turn)
    first = listener.wait_for_end()
    owner = owner_fingerprint(turn["tenant_id"], turn["app_id"], turn["user_id"])
    redis_client.set(stop_key(turn["message_id"], owner), "1", ex=60)  # a stop that came late

    again = attempt(services, turn)

    listener.drain_quietly(0.3)
    assert again.status == "succeeded" and again.replayed
    assert listener.events == first, "nothing after the one end"


def test_a_turn_its_owner_stopped_before_it_ran_ends_stopped_and_frees_its_conversation(
    make_services: ServicesFactory, listen: Callable[[str], TurnListener],
    redis_client: Any, stub: StubControl
) -> None:
    # The start reads the stop flag and tries the lease in one round trip: a turn that is to
    # stop may have taken the lease, and must give it back.
    services = make_services()
    turn = make_turn()
    owner = owner_fingerprint(turn["tenant_id"], turn["app_id"], turn["user_id"])
    redis_client.set(stop_key(turn["message_id"], owner), "1", ex=60)
    listener = listen(turn["message_id"])

    outcome = attempt(services, turn)

    events = listener.wait_for_end()
    assert outcome.status == "stopped"
    assert [(event["event"], event["status"]) for event in events] == [("message_end",
                                                                        "stopped")]
    assert stub.runs(turn["message_id"]) == []
    assert services.locks.holding_message(turn["conversation_id"]) is None
    assert redis_client.get(owner_key(turn["message_id"])) == owner.encode()
    next_turn = make_turn(conversation_id=turn["conversation_id"])
    assert attempt(services, next_turn).status == "succeeded", "the conversation is free"


def test_a_turn_revoked_before_it_ran_ends_stopped_once(
    make_services: ServicesFactory, listen: Callable[[str], TurnListener]
) -> None:
    services = make_services()
    turn = make_turn()
    listener = listen(turn["message_id"])

    outcome = end_stopped_before_running(parse_turn(turn, services.settings),
                                         task_id="task-1", services=services)

    events = listener.wait_for_end()
    assert outcome is not None and outcome.status == "stopped"
    assert [(event["event"], event["status"]) for event in events] == [("message_end",
                                                                        "stopped")]
