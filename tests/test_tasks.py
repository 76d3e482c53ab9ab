"""How the task ends a turn: retried to success, or one ``error`` event with nothing saved.

Faults are injected by the stub backend on a real socket; the worker is a real process. The
worker's settings (tests/conftest.py) allow 2 retries and 2 stream reconnects, with short delays.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery.concurrency.base import BasePool
from celery.concurrency.prefork import TaskPool as PreforkPool
from kombu import Message
from kombu.utils.json import dumps

from config.settings import Settings
from stub_backend import StubServer
from tests.conftest import (
    ROOT,
    RunningWorker,
    StubControl,
    answer_of,
    assert_nothing_saved,
    assert_single_end,
    base_settings,
    final_state,
    make_turn,
    send_raw_and_wait,
    settings_env,
    start_worker,
    stop_worker,
    submit_and_wait,
)
from worker.app import app
from worker.client import submit_turn
from worker.publisher import replay_log_key
from worker.tasks import TURN_TASK_NAME, TurnRequest, _receipt_writes, retry_delay

EXPECTED_ANSWER = "[turn 1] You said: hi."


# Retried to success ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 500, 429])
def test_create_answering_5xx_or_429_is_retried_to_success(
    status: int, celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], create=[{"status": status}])

    events = submit_and_wait(turn, listen, producer_app, celery_worker)

    assert assert_single_end(events, "message_end")["answer"] == EXPECTED_ANSWER
    assert answer_of(events) == EXPECTED_ANSWER
    assert stub.create_calls(turn["message_id"]) == 2
    assert len(stub.runs(turn["message_id"])) == 1
    message = celery_worker.store.get_message(turn["message_id"])
    assert message is not None and message.status == "succeeded" and message.attempts == 2


def test_dropped_stream_resumes_from_last_event_id_without_a_second_run(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], stream=[{"drop_after": 4}, {"drop_after": 2}])

    events = submit_and_wait(turn, listen, producer_app, celery_worker)

    assert assert_single_end(events, "message_end")["answer"] == EXPECTED_ANSWER
    assert [event["event"] for event in events].count("message_replace") == 0
    assert "".join(e["answer"] for e in events if e["event"] == "agent_message") == EXPECTED_ANSWER
    [run] = stub.runs(turn["message_id"])
    assert run["sse_connections"] == 3
    message = celery_worker.store.get_message(turn["message_id"])
    assert message is not None and message.attempts == 1


def test_stalled_stream_is_resumed_after_the_read_timeout(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], stream=[{"stall_after": 3, "stall_seconds": 30}])

    events = submit_and_wait(turn, listen, producer_app, celery_worker)

    assert assert_single_end(events, "message_end")["answer"] == EXPECTED_ANSWER
    assert len(stub.runs(turn["message_id"])) == 1


def test_stream_lost_beyond_reconnects_is_retried_by_reattaching_to_the_same_run(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], stream=[{"drop_after": 4}] + [{"drop_after": 0}] * 2)

    events = submit_and_wait(turn, listen, producer_app, celery_worker)

    end = assert_single_end(events, "message_end")
    assert end["answer"] == EXPECTED_ANSWER
    assert "message_replace" not in [event["event"] for event in events], (
        "the same run replays the same text: the client keeps what it has"
    )
    deltas = "".join(e["answer"] for e in events if e["event"] == "agent_message")
    assert deltas == EXPECTED_ANSWER, "each character reaches the client exactly once"
    assert len(stub.runs(turn["message_id"])) == 1
    assert stub.create_calls(turn["message_id"]) == 1
    message = celery_worker.store.get_message(turn["message_id"])
    assert message is not None and message.attempts == 2 and message.status == "succeeded"


def test_transient_run_failure_is_retried_with_a_new_run(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"],
              fail={"reason": "InvokeRateLimitError", "error": "slow down", "after_tokens": 2,
                    "times": 1})

    events = submit_and_wait(turn, listen, producer_app, celery_worker)

    assert assert_single_end(events, "message_end")["answer"] == EXPECTED_ANSWER
    assert answer_of(events) == EXPECTED_ANSWER
    runs = stub.runs(turn["message_id"])
    assert len(runs) == 2
    assert [run["request"]["idempotency_key"] for run in runs] == [
        f"agent-turn:{turn['message_id']}:1", f"agent-turn:{turn['message_id']}:2"]


# Failed for good ---------------------------------------------------------------------------


def test_transient_failures_past_the_retry_budget_end_in_one_error_event(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], fail={"reason": "InvokeServerUnavailableError",
                                        "error": "overloaded"})

    events = submit_and_wait(turn, listen, producer_app, celery_worker)

    error = assert_single_end(events, "error")
    assert error["code"] == "model_temporarily_unavailable"
    assert error["status"] == 503
    assert "overloaded" in error["message"]
    assert len(stub.runs(turn["message_id"])) == celery_worker.settings.max_retries + 1
    assert_nothing_saved(celery_worker, turn)


@pytest.mark.parametrize("reason", ["InvokeBadRequestError", "InvokeAuthorizationError",
                                    "CredentialsValidateFailedError", None])
def test_permanent_run_failure_is_not_retried(
    reason: str | None, celery_worker: RunningWorker, stub: StubControl, listen: Any,
    producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], fail={"reason": reason, "error": "no such model"})

    events = submit_and_wait(turn, listen, producer_app, celery_worker)

    error = assert_single_end(events, "error")
    assert error["code"] == "model_error"
    assert len(stub.runs(turn["message_id"])) == 1
    assert_nothing_saved(celery_worker, turn)


@pytest.mark.parametrize("status", [422, 401, 400])
def test_create_rejected_with_4xx_fails_at_once(
    status: int, celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], create=[{"status": status, "body": {"detail": "nope"}}])

    events = submit_and_wait(turn, listen, producer_app, celery_worker)

    error = assert_single_end(events, "error")
    assert error["code"] == "run_rejected"
    assert str(status) in error["message"]
    assert stub.create_calls(turn["message_id"]) == 1
    assert_nothing_saved(celery_worker, turn)


def test_undecodable_frame_fails_at_once_without_saving(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], stream=[{"garbage_after": 3}])

    events = submit_and_wait(turn, listen, producer_app, celery_worker)

    error = assert_single_end(events, "error")
    assert error["code"] == "backend_protocol_error"
    assert [run["sse_connections"] for run in stub.runs(turn["message_id"])] == [1]
    assert_nothing_saved(celery_worker, turn)


def test_error_event_names_the_run_and_message(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], fail={"reason": "InvokeBadRequestError", "error": "bad"})

    events = submit_and_wait(turn, listen, producer_app, celery_worker)

    [run] = stub.runs(turn["message_id"])
    message = events[-1]["message"]
    assert run["run_id"] in message and turn["message_id"] in message


# Bad payloads ------------------------------------------------------------------------------


def test_payload_with_unknown_field_gets_an_error_event_and_no_backend_call(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn(surprise=True)
    result, events = send_raw_and_wait({"turn": turn}, turn["message_id"], listen,
                                       producer_app, celery_worker)

    error = assert_single_end(events, "error")
    assert error["code"] == "invalid_param"
    assert error["status"] == 400
    assert "surprise" in error["message"]
    assert stub.create_calls(turn["message_id"]) == 0
    assert celery_worker.store.get_message(turn["message_id"]) is None
    assert final_state(result) == "FAILURE"


@pytest.mark.parametrize("kwargs", [
    {"turn": make_turn(query="")},
    {"turn": make_turn(query=42)},
    {"turn": make_turn(query="x" * 40_000)},
    {"turn": make_turn(), "extra": 1},
])
def test_invalid_payloads_are_rejected_with_an_error_event(
    kwargs: dict[str, Any], celery_worker: RunningWorker, stub: StubControl, listen: Any,
    producer_app: Any
) -> None:
    message_id = kwargs["turn"]["message_id"]
    result, events = send_raw_and_wait(kwargs, message_id, listen, producer_app, celery_worker)

    assert assert_single_end(events, "error")["code"] == "invalid_param"
    assert stub.create_calls(message_id) == 0
    assert final_state(result) == "FAILURE"


def test_payload_without_a_usable_message_id_fails_the_task_without_retry(
    celery_worker: RunningWorker, stub: StubControl, producer_app: Any
) -> None:
    result, _ = send_raw_and_wait({"turn": make_turn(message_id="not a valid id!")}, None, None,
                                  producer_app, celery_worker)

    assert final_state(result) == "FAILURE"
    assert "message_id" in str(result.result)
    assert result.retries in (0, None)
    assert stub.runs() == []


def test_a_redelivered_finished_turn_whose_end_is_on_its_log_publishes_nothing(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    submit_and_wait(turn, listen, producer_app, celery_worker)
    listener = listen(turn["message_id"])

    again = submit_turn(turn, celery_app=producer_app, settings=celery_worker.settings)

    assert final_state(producer_app.AsyncResult(again.task_id)) == "SUCCESS"
    listener.drain_quietly(0.5)
    assert listener.events == [], "its one end is on the log already: a second would contradict"
    assert len(stub.runs(turn["message_id"])) == 1


def test_a_redelivered_finished_turn_whose_end_never_went_out_re_emits_it(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any,
    redis_client: Any,
) -> None:
    turn = make_turn()
    end = submit_and_wait(turn, listen, producer_app, celery_worker)[-1]
    # As if publishing the end had failed after the answer was saved.
    redis_client.xdel(replay_log_key(turn["message_id"]), f"{end['seq']}-0")

    events = submit_and_wait(turn, listen, producer_app, celery_worker)

    assert [event["event"] for event in events] == ["message_end"]
    assert events[0]["answer"] == EXPECTED_ANSWER
    assert len(stub.runs(turn["message_id"])) == 1


def test_a_turn_whose_database_stays_down_through_its_retries_ends_in_one_error_event(
    stub_server: StubServer, stub: StubControl, listen: Any, producer_app: Any, tmp_path: Path,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on: the database is down
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    settings = base_settings(
        database_url=f"postgresql+psycopg://postgres@127.0.0.1:{dead_port}/test",
        backend_url=stub_server.url, queue=f"no-db-{uuid.uuid4().hex[:8]}",
    )
    worker = start_worker(settings, tmp_path / "worker.log", f"no-db-{os.getpid()}@%h")
    try:
        turn = make_turn()
        listener = listen(turn["message_id"])
        submit_turn(turn, celery_app=producer_app, settings=settings)

        error = assert_single_end(listener.wait_for_end(timeout=30), "error")
    finally:
        stop_worker(worker)

    assert error["code"] == "store_unavailable" and error["status"] == 503
    assert error["seq"] == 1 and error["conversation_id"] == turn["conversation_id"]
    assert stub.runs(turn["message_id"]) == [], "no run without a store to record it in"
    assert (tmp_path / "worker.log").read_text().count("cannot reach its services") == 3, (
        "the first try and both retries")


def test_retry_delay_grows_exponentially_within_its_cap() -> None:
    settings = Settings(retry_backoff_base=1.0, retry_backoff_max=8.0)
    for retries_done, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (10, 8.0)]:
        delays = [retry_delay(retries_done, settings) for _ in range(200)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert max(delays) - min(delays) > ceiling / 4, "the jitter should spread the delays"


def test_worker_refuses_to_start_with_a_broken_composition_template(tmp_path: Path) -> None:
    template = tmp_path / "composition.json"
    template.write_text('{"schema_version": 1, "layers": [{"name": "llm", "type": "x"}]}')
    settings = base_settings(composition_template=template, queue=f"unused-{tmp_path.name}")
    env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)}

    finished = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--loglevel", "WARNING",
         "--without-mingle", "--without-gossip"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )

    assert finished.returncode != 0
    assert "no layer carries {{query}}" in finished.stderr
    assert str(template) in finished.stderr


# Where a turn waits for its receipt --------------------------------------------------------


class _HandOff:
    """Notes whether the receipt was written when the pool took the turn."""

    def __init__(self, written: threading.Event) -> None:
        self.written = written
        self.written_at_hand_off: bool | None = None

    def apply_async(self, *_: Any, **__: Any) -> None:
        self.written_at_hand_off = self.written.is_set()


class _RecordingPrefork(_HandOff, PreforkPool):
    def __init__(self, written: threading.Event) -> None:
        PreforkPool.__init__(self, limit=1)  # not started: the hand-off is all this test runs
        _HandOff.__init__(self, written)


class _RecordingInProcess(_HandOff, BasePool):
    def __init__(self, written: threading.Event) -> None:
        BasePool.__init__(self, limit=1)
        _HandOff.__init__(self, written)


def _turn_request() -> TurnRequest:
    task = app.tasks[TURN_TASK_NAME]
    task_message = app.amqp.as_task_v2(str(uuid.uuid4()), task.name, args=(), kwargs={})
    message = Message(body=dumps(task_message.body), headers=task_message.headers,
                      content_type="application/json", content_encoding="utf-8",
                      delivery_info={"exchange": "", "routing_key": "turns"})
    return TurnRequest(message, app=app, task=task)


@pytest.mark.parametrize(("pool_type", "waits"), [(_RecordingPrefork, True),
                                                   (_RecordingInProcess, False)])
def test_a_child_process_pool_gets_a_turn_only_once_its_receipt_is_written(
    pool_type: type[_HandOff], waits: bool
) -> None:
    """A prefork child cannot wait on its parent's writes, so the parent waits before the
    hand-off; a pool in this process hands on at once and the turn waits as it starts."""
    request = _turn_request()
    written = threading.Event()
    _receipt_writes[request.id] = [written]
    writer = threading.Timer(0.1, written.set)
    writer.start()
    try:
        pool = pool_type(written)
        request.execute_using_pool(pool)
        assert pool.written_at_hand_off is waits
    finally:
        writer.join(5)
        _receipt_writes.pop(request.id, None)
