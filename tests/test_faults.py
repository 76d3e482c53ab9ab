"""Faults through real processes: bad input of every kind, and a worker killed mid-stream.

Every case must end in a completed turn or exactly one ``error`` event, with no half-written row.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from config.celery import RESUME_TASK_NAME, TURN_TASK_NAME, celery_config
from stub_backend import StubServer
from tests.conftest import (
    RunningWorker,
    StubControl,
    TcpProxy,
    TurnListener,
    answer_of,
    assert_nothing_saved,
    assert_single_end,
    base_settings,
    final_state,
    make_turn,
    new_postgres_schema,
    send_raw_and_wait,
    sqlite_url,
    start_worker,
    stop_worker,
    submit_and_wait,
    wait_until,
)
from worker.client import submit_turn
from worker.errors import InvalidTurnPayload
from worker.ownership import owner_fingerprint
from worker.payload import parse_turn, valid_message_id
from worker.store import SessionStore, make_engine

# Bad task payloads: (case, how to spoil a good turn). Each must be refused before any backend
# call, with an ``invalid_param`` error on the turn's channel and no row written.
BAD_PAYLOADS: list[tuple[str, dict[str, Any]]] = [
    ("unknown top-level field", {"priority": "high"}),
    ("credentials smuggled into agent", {"agent": {"credentials": {"api_key": "k"}}}),
    ("unknown model parameter", {"agent": {"parameters": {"seed": 1}}}),
    ("empty query", {"query": ""}),
    ("blank query", {"query": " \n\t "}),
    ("query is a number", {"query": 42}),
    ("query is a list", {"query": ["hi"]}),
    ("query over the limit", {"query": "x" * 32_001}),
    ("tenant id is a number", {"tenant_id": 7}),
    ("user id with a space", {"user_id": "user 1"}),
    ("conversation id with a slash", {"conversation_id": "a/b"}),
    ("app id too long", {"app_id": "a" * 129}),
    ("user_from not allowed", {"user_from": "robot"}),
    ("invoke_from not allowed", {"invoke_from": "cron"}),
    ("inputs is a list", {"inputs": ["a"]}),
    ("inputs over the limit", {"inputs": {"blob": "y" * 70_000}}),
    ("temperature out of range", {"agent": {"parameters": {"temperature": 3}}}),
    ("temperature as text", {"agent": {"parameters": {"temperature": "hot"}}}),
    ("max_tokens zero", {"agent": {"parameters": {"max_tokens": 0}}}),
    ("too many stop words", {"agent": {"parameters": {"stop": ["a", "b", "c", "d", "e"]}}}),
    ("system prompt over the limit", {"agent": {"system_prompt": "p" * 16_001}}),
    ("model name with spaces", {"agent": {"model": "gpt 4o"}}),
    ("unknown schema version", {"schema_version": 2}),
    ("schema version true", {"schema_version": True}),
    ("lone surrogate in the query", {"query": "hi \ud800 there"}),
    ("NUL in the query", {"query": "a\x00b"}),
    ("escape character in the system prompt", {"agent": {"system_prompt": "\x1b[2J"}}),
    ("lone surrogate in a stop word", {"agent": {"parameters": {"stop": ["\udfff"]}}}),
    ("lone surrogate in an inputs key", {"inputs": {"\udc80": 1}}),
    ("NUL in an inputs value", {"inputs": {"k": ["ok", {"deeper": "\x00"}]}}),
    ("inputs nested 40 deep", {"inputs": {"d": json.loads("[" * 40 + "]" * 40)}}),
]

# Bad backend frames: (case, the raw SSE frame the stub injects after three good frames). Each
# must end the turn at once (no reconnect, no retry) with a ``backend_protocol_error``.
_OK = {"id": "9999999999999-0", "type": "pydantic_ai_event",
       "data": {"event_kind": "final_result"}, "agent_message_delta": None}


def _frame(data: Any, *, raw: str | None = None) -> str:
    body = raw if raw is not None else json.dumps(data)
    return f"id: 9999999999999-0\nevent: pydantic_ai_event\ndata: {body}\n\n"


BAD_FRAMES: list[tuple[str, str]] = [
    ("not JSON", _frame(None, raw="{not json")),
    ("a JSON array", _frame([1, 2, 3])),
    ("a JSON string", _frame("hello")),
    ("no id", _frame({k: v for k, v in _OK.items() if k != "id"})),
    ("empty id", _frame({**_OK, "id": ""})),
    ("no type", _frame({k: v for k, v in _OK.items() if k != "type"})),
    ("type is a number", _frame({**_OK, "type": 5})),
    ("data is not an object", _frame({**_OK, "data": "text"})),
    ("another run's event", _frame({**_OK, "run_id": "somebody-else"})),
    ("delta is a number", _frame({**_OK, "agent_message_delta": 42})),
    ("run_succeeded without output",
     _frame({**_OK, "type": "run_succeeded", "data": {"session_snapshot": {}}})),
    ("run_succeeded with a list snapshot",
     _frame({**_OK, "type": "run_succeeded", "data": {"session_snapshot": [], "output": "x"}})),
    ("run_succeeded with text usage",
     _frame({**_OK, "type": "run_succeeded", "data": {"output": "x", "usage": "lots"}})),
    ("run_failed without error", _frame({**_OK, "type": "run_failed", "data": {"reason": "x"}})),
    ("a frame over the size limit", _frame({**_OK, "agent_message_delta": "z" * 70_000})),
]


def test_the_bad_input_suite_has_at_least_thirty_cases() -> None:
    assert len(BAD_PAYLOADS) + len(BAD_FRAMES) >= 30


@pytest.mark.parametrize(("case", "spoil"), BAD_PAYLOADS, ids=[c for c, _ in BAD_PAYLOADS])
def test_bad_payload_is_refused_with_one_error_and_writes_nothing(
    case: str, spoil: dict[str, Any], celery_worker: RunningWorker, stub: StubControl,
    listen: Any, producer_app: Any
) -> None:
    turn = make_turn(**spoil)
    _, events = send_raw_and_wait({"turn": turn}, turn["message_id"], listen, producer_app,
                                  celery_worker)

    error = assert_single_end(events, "error")
    assert (error["code"], error["status"]) == ("invalid_param", 400)
    assert "invalid turn payload" in error["message"]
    assert stub.create_calls(turn["message_id"]) == 0
    assert celery_worker.store.get_message(turn["message_id"]) is None
    assert celery_worker.store.get_snapshot(turn["conversation_id"]) is None


def test_an_invalid_conversation_id_beside_a_usable_message_id_still_ends_in_one_error(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn(conversation_id="conv-\ud800", query="hi")
    _, events = send_raw_and_wait({"turn": turn}, turn["message_id"], listen, producer_app,
                                  celery_worker)

    error = assert_single_end(events, "error")
    assert error["code"] == "invalid_param"
    assert error["conversation_id"] == "", "an invalid id is not echoed"
    assert stub.create_calls(turn["message_id"]) == 0
    assert celery_worker.store.get_message(turn["message_id"]) is None


def test_a_refusal_echoes_only_a_bounded_escaped_excerpt_of_a_bad_value(
    celery_worker: RunningWorker, listen: Any, producer_app: Any
) -> None:
    forged_key = "x\n2026-12-02 03:04:05 CRITICAL forged line " + "k" * 10_000
    turn = make_turn(query="q" * 40_000, **{forged_key: "v" * 10_000})
    result, events = send_raw_and_wait({"turn": turn}, turn["message_id"], listen, producer_app,
                                       celery_worker)

    error = assert_single_end(events, "error")
    assert error["code"] == "invalid_param"
    assert len(error["message"]) <= 1_200
    assert "\n" not in error["message"] and "CRITICAL forged" in error["message"]
    assert final_state(result) == "FAILURE"
    assert len(str(result.result)) <= 1_200


def test_a_payload_value_cannot_forge_a_line_in_the_worker_log(
    celery_worker: RunningWorker, listen: Any, producer_app: Any
) -> None:
    marker = uuid.uuid4().hex[:8]
    forged = f"CRITICAL forged {marker}"
    turn = make_turn(**{f"\n{forged}\r\n{forged}": 1})
    huge_id_turn = make_turn(message_id="m" * 60_000 + f"\n{forged}")
    send_raw_and_wait({"turn": turn}, turn["message_id"], listen, producer_app, celery_worker)
    huge = producer_app.send_task(TURN_TASK_NAME, kwargs={"turn": huge_id_turn},
                                  queue=celery_worker.settings.queue)
    assert final_state(huge) == "FAILURE"

    lines = celery_worker.log_path.read_text(errors="replace").splitlines()
    assert any(f"\\x0a{forged}" in line for line in lines), "the key is logged, escaped"
    assert not [line for line in lines if line.startswith(forged)]
    assert max(len(line) for line in lines) < 10_000


# Task messages the consumer cannot read: each must end in FAILURE (never PENDING), with one
# bounded log line, and leave the worker serving good turns.
UNREADABLE_BODIES: list[tuple[str, bytes]] = [
    ("not JSON", b"{this is not json"),
    ("kwargs are a list", json.dumps([[], ["turn"], {}]).encode()),
    ("nested 10,000 deep", b'[[], {"turn": {"inputs": {"a": ' + b"[" * 10_000 + b"]" * 10_000
     + b"}}}, {}]"),
]


@pytest.mark.parametrize(("case", "body"), UNREADABLE_BODIES,
                         ids=[c for c, _ in UNREADABLE_BODIES])
def test_a_task_message_that_cannot_be_read_fails_and_is_never_left_pending(
    case: str, body: bytes, celery_worker: RunningWorker, stub: StubControl, listen: Any,
    producer_app: Any
) -> None:
    task_id = str(uuid.uuid4())
    with producer_app.connection_for_write() as connection:
        connection.Producer().publish(
            body, routing_key=celery_worker.settings.queue, exchange="",
            content_type="application/json", content_encoding="utf-8",
            headers={"lang": "py", "task": TURN_TASK_NAME, "id": task_id, "root_id": task_id,
                     "argsrepr": "()", "kwargsrepr": "{}"})

    result = AsyncResult(task_id, app=producer_app)
    assert final_state(result) == "FAILURE"
    assert isinstance(result.result, Exception)
    logged = [line for line in celery_worker.log_path.read_text(errors="replace").splitlines()
              if task_id in line]
    assert logged and all(len(line) < 2_000 for line in logged)
    good = make_turn()
    end = assert_single_end(submit_and_wait(good, listen, producer_app, celery_worker),
                            "message_end")
    assert end["answer"]


@pytest.mark.parametrize(("case", "frame"), BAD_FRAMES, ids=[c for c, _ in BAD_FRAMES])
def test_bad_backend_frame_fails_the_turn_at_once_and_writes_nothing(
    case: str, frame: str, celery_worker: RunningWorker, stub: StubControl, listen: Any,
    producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], stream=[{"inject_after": 3, "frame": frame}])

    events = submit_and_wait(turn, listen, producer_app, celery_worker)

    error = assert_single_end(events, "error")
    assert error["code"] == "backend_protocol_error"
    [run] = stub.runs(turn["message_id"])
    assert run["run_id"] in error["message"]
    assert run["sse_connections"] == 1, "a malformed frame must not be retried by reconnecting"
    assert_nothing_saved(celery_worker, turn)


# A worker killed in the middle of twenty streaming turns ------------------------------------


@pytest.fixture
def crash_settings(stub_server: StubServer, tmp_path: Path) -> Any:
    """Short deadline and visibility timeout, so a killed worker's turns come back quickly."""
    return base_settings(
        database_url=sqlite_url(tmp_path), backend_url=stub_server.url,
        queue=f"crash-{uuid.uuid4().hex[:8]}", worker_concurrency=32,
        turn_deadline_seconds=4.0, visibility_timeout_seconds=5.5,
        unacked_restore_interval_seconds=0.5, conversation_lease_seconds=2.0,
    )


@pytest.fixture
def crash_store(crash_settings: Any) -> Iterator[SessionStore]:
    engine = make_engine(crash_settings.database_url, pool_size=2)
    store = SessionStore(engine)
    store.create_schema()
    yield store
    engine.dispose()


def test_turns_survive_a_worker_killed_mid_stream_with_one_answer_and_one_run_each(
    crash_settings: Any, crash_store: SessionStore, stub: StubControl,
    listen: Any, producer_app: Any, tmp_path: Path,
) -> None:
    first = start_worker(crash_settings, tmp_path / "first.log", f"crash-1-{os.getpid()}@%h")
    turns = [make_turn(query=f"question {n}") for n in range(20)]
    listeners: list[TurnListener] = []
    for turn in turns:
        stub.plan(turn["message_id"], answer_tokens=40, token_delay=0.05)
        listeners.append(listen(turn["message_id"]))
        submit_turn(turn, celery_app=producer_app, settings=crash_settings)
    try:
        _wait_until_all_streaming(listeners)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    assert all(listener.events[-1]["event"] == "agent_message" for listener in listeners), (
        "every turn must have been killed mid-stream"
    )

    second = start_worker(crash_settings, tmp_path / "second.log", f"crash-2-{os.getpid()}@%h")
    try:
        for turn, listener in zip(turns, listeners, strict=True):
            events = listener.wait_for_end(timeout=30)
            end = assert_single_end(events, "message_end")
            expected = stub.runs(turn["message_id"])[0]["request"]
            assert expected["composition"]["layers"][1]["config"]["user"] == turn["query"]
            assert end["answer"].startswith(f"[turn 1] You said: {turn['query']}.")
            assert answer_of(events) == end["answer"]
            assert "message_replace" not in [e["event"] for e in events], (
                "the new worker re-attaches to the same run: the client keeps its text")
            assert "".join(e["answer"] for e in events if e["event"] == "agent_message") == (
                end["answer"]), "each character reaches the client exactly once"
            assert len(stub.runs(turn["message_id"])) == 1, "the model must not be paid twice"
            message = crash_store.get_message(turn["message_id"])
            assert message is not None
            assert (message.status, message.answer) == ("succeeded", end["answer"])
            assert message.attempts == 2
        assert len(crash_store.list_messages(turns[0]["conversation_id"])) == 1
    finally:
        stop_worker(second)


def _wait_until_all_streaming(listeners: list[TurnListener], timeout: float = 20.0) -> None:
    """Until every turn has published at least two chunks: mid-stream, not finished."""
    deadline = time.monotonic() + timeout
    pending = list(listeners)
    while pending:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(pending)} turns never started streaming")
        for listener in list(pending):
            message = listener.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.01)
            if message is not None:
                listener.events.append(json.loads(message["data"]))
            if sum(e["event"] == "agent_message" for e in listener.events) >= 2:
                pending.remove(listener)


# The database out of reach for a moment ----------------------------------------------------


@pytest.fixture
def proxied_postgres() -> Iterator[tuple[str, TcpProxy]]:
    url, drop = new_postgres_schema()
    proxy = TcpProxy(5432)
    yield url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"), proxy
    proxy.close()
    drop()


def test_a_database_blink_at_the_end_of_a_turn_costs_a_retry_not_the_answer(
    proxied_postgres: tuple[str, TcpProxy], stub_server: StubServer, stub: StubControl,
    listen: Any, producer_app: Any, tmp_path: Path,
) -> None:
    url, proxy = proxied_postgres
    settings = base_settings(
        database_url=url, backend_url=stub_server.url, queue=f"blink-{uuid.uuid4().hex[:8]}",
        max_retries=5, retry_backoff_base=0.3, retry_backoff_max=1.0,
    )
    worker = start_worker(settings, tmp_path / "worker.log", f"blink-{os.getpid()}@%h")
    engine = make_engine(settings.database_url.replace(f":{proxy.port}/", ":5432/"), pool_size=1)
    store = SessionStore(engine)
    try:
        turn = make_turn()
        stub.plan(turn["message_id"], answer_tokens=40, token_delay=0.03)
        listener = listen(turn["message_id"])
        submit_turn(turn, celery_app=producer_app, settings=settings)
        _wait_until_all_streaming([listener])

        proxy.cut(2.0)  # longer than the rest of the answer: the save at the end must fail
        events = listener.wait_for_end(timeout=30)

        end = assert_single_end(events, "message_end")
        assert answer_of(events) == end["answer"]
        assert len(stub.runs(turn["message_id"])) == 1
        message = store.get_message(turn["message_id"])
        assert message is not None and message.status == "succeeded"
        assert message.attempts >= 2, "the blink should have cost at least one retry"
        snapshot = store.get_snapshot(turn["conversation_id"])
        assert snapshot is not None and snapshot.version == 1
        assert "store_unavailable" in (tmp_path / "worker.log").read_text() or \
            "session store error" in (tmp_path / "worker.log").read_text()
    finally:
        stop_worker(worker)
        engine.dispose()


def test_a_database_restart_between_turns_costs_the_next_turn_nothing(
    proxied_postgres: tuple[str, TcpProxy], stub_server: StubServer, stub: StubControl,
    listen: Any, producer_app: Any, tmp_path: Path,
) -> None:
    # The worker's pooled connections die between two turns, as in a PostgreSQL restart. The
    # pool does not ping before use; the next turn's first statement finds its connection dead
    # and the store runs that transaction again on a new one: no retry of the turn, no error.
    url, proxy = proxied_postgres
    settings = base_settings(database_url=url, backend_url=stub_server.url,
                             queue=f"restart-{uuid.uuid4().hex[:8]}")
    worker = start_worker(settings, tmp_path / "worker.log", f"restart-{os.getpid()}@%h")
    engine = make_engine(settings.database_url.replace(f":{proxy.port}/", ":5432/"), pool_size=1)
    store = SessionStore(engine)
    try:
        first = make_turn()
        assert_single_end(submit_and_wait_on(first, listen, producer_app, settings),
                          "message_end")
        proxy.cut(0)  # every open connection closes; new ones are let through at once

        second = make_turn(conversation_id=first["conversation_id"])
        events = submit_and_wait_on(second, listen, producer_app, settings)

        end = assert_single_end(events, "message_end")
        assert answer_of(events) == end["answer"] != ""
        message = store.get_message(second["message_id"])
        assert message is not None and (message.status, message.attempts) == ("succeeded", 1)
        snapshot = store.get_snapshot(first["conversation_id"])
        assert snapshot is not None and snapshot.version == 2
        assert "running the transaction again" in (tmp_path / "worker.log").read_text()
    finally:
        stop_worker(worker)
        engine.dispose()


def submit_and_wait_on(turn: dict[str, Any], listen: Any, producer_app: Any,
                       settings: Any) -> list[dict[str, Any]]:
    listener = listen(turn["message_id"])
    submit_turn(turn, celery_app=producer_app, settings=settings)
    return listener.wait_for_end(timeout=30)


def test_a_warm_shutdown_finishes_the_turns_in_flight(
    crash_settings: Any, crash_store: SessionStore, stub: StubControl, listen: Any,
    producer_app: Any, tmp_path: Path,
) -> None:
    worker = start_worker(crash_settings, tmp_path / "worker.log", f"warm-{os.getpid()}@%h")
    turns = [make_turn(query=f"deploy {n}") for n in range(5)]
    listeners = []
    for turn in turns:
        stub.plan(turn["message_id"], answer_tokens=30, token_delay=0.04)
        listeners.append(listen(turn["message_id"]))
        submit_turn(turn, celery_app=producer_app, settings=crash_settings)
    _wait_until_all_streaming(listeners)

    worker.send_signal(signal.SIGTERM)  # what a deploy sends first
    exit_code = worker.wait(timeout=30)

    assert exit_code == 0
    for turn, listener in zip(turns, listeners, strict=True):
        end = assert_single_end(listener.wait_for_end(timeout=5), "message_end")
        assert end["status"] == "succeeded"
        message = crash_store.get_message(turn["message_id"])
        assert message is not None and message.attempts == 1


# Redis restarted mid-turn -----------------------------------------------------------------


@dataclass
class RestartableRedis:
    """A redis-server of the test's own that keeps its data across a restart (AOF), as a
    production Redis does; the shared one on 6379 is left alone."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # SIGTERM: Redis flushes its AOF and exits
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path, _free_port())
    server.start()
    yield server
    server.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_log(client: redis.Redis, message_id: str) -> list[dict[str, Any]]:
    return [json.loads(fields[b"data"])
            for _, fields in client.xrange(f"agent-turn:log:{message_id}")]


def test_a_redis_restart_mid_turn_costs_latency_not_the_answer(
    own_redis: RestartableRedis, stub_server: StubServer, stub: StubControl,
    tmp_path: Path,
) -> None:
    base = f"redis://127.0.0.1:{own_redis.port}"
    settings = base_settings(
        broker_url=f"{base}/0", result_backend=f"{base}/1", pubsub_url=f"{base}/2",
        database_url=sqlite_url(tmp_path), backend_url=stub_server.url,
        turn_deadline_seconds=30.0, visibility_timeout_seconds=60.0,
        # The whole log, every seq once, is what shows nothing was lost or doubled.
        replay_log_compact_on_end=False,
    )
    producer = Celery("restart-producer")
    producer.config_from_object(celery_config(settings))
    worker = start_worker(settings, tmp_path / "worker.log", f"restart-{os.getpid()}@%h")
    bus = redis.Redis.from_url(f"{base}/2", socket_timeout=5)
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        turn = make_turn()
        stub.plan(turn["message_id"], answer_tokens=60, token_delay=0.04)
        submit_turn(turn, celery_app=producer, settings=settings)
        wait_until(lambda: sum(e["event"] == "agent_message"
                              for e in read_log(bus, turn["message_id"])) >= 2)

        own_redis.stop()
        own_redis.start()

        wait_until(lambda: any(e["event"] in ("message_end", "error")
                              for e in read_log(bus, turn["message_id"])), timeout=30)
        events = read_log(bus, turn["message_id"])
        end = assert_single_end(events, "message_end")
        assert answer_of(events) == end["answer"]
        assert end["answer"].startswith("[turn 1] You said: hi.")
        assert len(stub.runs(turn["message_id"])) == 1
        message = SessionStore(engine).get_message(turn["message_id"])
        assert message is not None and (message.status, message.answer) == (
            "succeeded", end["answer"])
    finally:
        stop_worker(worker)
        bus.close()
        engine.dispose()


# Generated hostile payloads ----------------------------------------------------------------

_HOSTILE_STRINGS = st.sampled_from([
    "", " ", "\x00", "\ud800", "a\udfffb", "\x1b[2J", "line\nCRITICAL forged", "x" * 129,
    "y" * 33_000, "tenant-1", "user-1", "app-1", "conv:1", "../../etc", "😀", "\u2028"])
_TEXT = st.one_of(_HOSTILE_STRINGS, st.text(st.characters(exclude_categories=[]), max_size=24))
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8)
_FIELDS = ["schema_version", "tenant_id", "app_id", "user_id", "conversation_id", "message_id",
           "user_from", "invoke_from", "query", "inputs", "agent"]


@st.composite
def _hostile_turns(draw: st.DrawFn, victim: dict[str, Any]) -> dict[str, Any]:
    """A turn as a buggy or hostile web tier might send it: ids of the victim or of nobody,
    any field spoiled, unknown fields added, some left out."""
    turn = make_turn(tenant_id=draw(st.sampled_from(["tenant-1", "tenant-2"])),
                     user_id=draw(st.sampled_from(["user-1", "user-2"])),
                     query=f"intruder asks {draw(_TEXT)}")
    if draw(st.booleans()):
        turn["conversation_id"] = victim["conversation_id"]
    if draw(st.integers(0, 3)) == 0:
        turn["message_id"] = victim["message_id"]
    for name in draw(st.lists(st.sampled_from(_FIELDS), max_size=2, unique=True)):
        turn[name] = draw(_JSON)
    for name in draw(st.lists(st.sampled_from(_FIELDS), max_size=1)):
        turn.pop(name, None)
    if draw(st.integers(0, 4)) == 0:
        turn[draw(_TEXT)] = draw(_JSON)
    return turn


def _all_logged_events(client: redis.Redis) -> list[dict[str, Any]]:
    events = []
    for key in client.scan_iter(match="agent-turn:log:*", count=1000):
        events += [json.loads(fields[b"data"]) | {"_log": key.decode()}
                   for _, fields in client.xrange(key)]
    return events


@hypothesis.settings(max_examples=3, deadline=None, phases=[hypothesis.Phase.generate],
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture,
                                            hypothesis.HealthCheck.too_slow,
                                            hypothesis.HealthCheck.data_too_large])
@hypothesis.given(data=st.data())
def test_generated_hostile_payloads_each_end_once_and_never_cross_owners(
    data: st.DataObject, celery_worker: RunningWorker, stub: StubControl, listen: Any,
    producer_app: Any, redis_client: redis.Redis
) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    victim = make_turn(query=f"my {secret}")
    submit_and_wait(victim, listen, producer_app, celery_worker)
    turns = data.draw(st.lists(_hostile_turns(victim), min_size=40, max_size=40))
    sent = [(turn, producer_app.send_task(TURN_TASK_NAME, kwargs={"turn": turn},
                                          queue=celery_worker.settings.queue))
            for turn in turns]
    for _, result in sent:
        assert final_state(result, timeout=60) in ("SUCCESS", "FAILURE")

    events = _all_logged_events(redis_client)
    by_task: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_task.setdefault(event["task_id"], []).append(event)
    victims_log = f"agent-turn:log:{victim['message_id']}"
    victims_tasks = {event["task_id"] for event in events if event["_log"] == victims_log}
    for turn, result in sent:
        mine = by_task.get(result.id, [])
        try:
            parsed = parse_turn(turn, celery_worker.settings)
        except InvalidTurnPayload:
            parsed = None
        # The victim's own finished message sent again by its owner: its end is on its log
        # already, and a second one would contradict it (docs/contract.md).
        again = parsed is not None and (parsed.message_id, parsed.conversation_id) == (
            victim["message_id"], victim["conversation_id"]) and parsed.owner == owner_fingerprint(
            victim["tenant_id"], victim["app_id"], victim["user_id"])
        if valid_message_id(turn) is not None:
            ends = [event for event in mine if event["event"] in ("message_end", "error")]
            assert len(ends) == (0 if again else 1), (turn, mine)
        if parsed is None and turn.get("message_id") != victim["message_id"] \
                and valid_message_id(turn) is not None:
            assert celery_worker.store.get_message(turn["message_id"]) is None, turn
        owned_by_victim = parsed is not None and parsed.owner == owner_fingerprint(
            victim["tenant_id"], victim["app_id"], victim["user_id"])
        if not owned_by_victim:
            assert result.id not in victims_tasks, ("an intruder on the victim's stream", turn)
            assert secret not in json.dumps(mine), ("the victim's text reached", turn)

    follow_up = make_turn(conversation_id=victim["conversation_id"])
    assert_single_end(submit_and_wait(follow_up, listen, producer_app, celery_worker),
                      "message_end")


# Questions to the user: duplicates and expiry --------------------------------------------


def test_an_answer_enqueued_twice_makes_one_continuation_run(
    celery_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn(query="CALL_TOOL:ask_human twice")
    listener = listen(turn["message_id"])
    submit_turn(turn, celery_app=producer_app, settings=celery_worker.settings)
    asked = listener.wait_for("human_input_required")
    answer = {"tenant_id": turn["tenant_id"], "app_id": turn["app_id"],
              "user_id": turn["user_id"], "message_id": turn["message_id"],
              "tool_call_id": asked["tool_call_id"], "action": "submit",
              "values": {"answer": "once"}}

    results = [producer_app.send_task(RESUME_TASK_NAME, kwargs={"answer": answer},
                                      queue=celery_worker.settings.queue) for _ in range(2)]

    end = assert_single_end(listener.wait_for_end(), "message_end")
    assert '"answer":"once"' in end["answer"]
    assert sorted(final_state(result) for result in results) == ["FAILURE", "SUCCESS"]
    assert len(stub.runs(turn["message_id"])) == 2, "the question's run and one continuation"


def test_a_worker_killed_during_the_continuation_re_attaches_to_that_run(
    crash_settings: Any, crash_store: SessionStore, stub: StubControl, listen: Any,
    producer_app: Any, tmp_path: Path,
) -> None:
    from worker.client import submit_human_input

    first = start_worker(crash_settings, tmp_path / "first.log", f"cont-1-{os.getpid()}@%h")
    turn = make_turn(query="CALL_TOOL:ask_human then crash")
    stub.plan(turn["message_id"], answer_tokens=40, token_delay=0.05)
    listener = listen(turn["message_id"])
    submit_turn(turn, celery_app=producer_app, settings=crash_settings)
    try:
        asked = listener.wait_for("human_input_required")
        submit_human_input(turn["message_id"], asked["tool_call_id"], "submit",
                           {"answer": "go on"}, tenant_id=turn["tenant_id"],
                           app_id=turn["app_id"], user_id=turn["user_id"],
                           celery_app=producer_app, settings=crash_settings)
        for _ in range(2):
            assert listener.wait_for("agent_message")["event"] == "agent_message"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    continuation_runs = stub.runs(turn["message_id"])[1:]
    assert len(continuation_runs) == 1 and continuation_runs[0]["status"] == "running", (
        "the worker must have been killed while the continuation's run streamed")

    second = start_worker(crash_settings, tmp_path / "second.log", f"cont-2-{os.getpid()}@%h")
    try:
        events = listener.wait_for_end(timeout=30)
    finally:
        stop_worker(second)
    end = assert_single_end(events, "message_end")
    assert end["answer"].startswith('Tool ask_human said: {"status":"submitted"')
    assert '"values":{"answer":"go on"}' in end["answer"]
    assert [e["event"] for e in events].count("human_input_required") == 1
    after_question = events[[e["event"] for e in events].index("human_input_required") + 1:]
    assert "".join(e["answer"] for e in after_question if e["event"] == "agent_message") == (
        end["answer"]), "each character of the continuation reaches the client exactly once"
    assert "message_replace" not in [e["event"] for e in events]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len(stub.runs(turn["message_id"])) == 2, "the question's run and one continuation"
    message = crash_store.get_message(turn["message_id"])
    assert message is not None
    assert (message.status, message.answer) == ("succeeded", end["answer"])


def test_an_unanswered_question_expires_with_one_error_and_refuses_a_late_answer(
    stub_server: StubServer, stub: StubControl, tmp_path: Path, listen: Any,
    producer_app: Any
) -> None:
    from worker.client import submit_human_input
    from worker.errors import HumanInputRefused

    settings = base_settings(database_url=sqlite_url(tmp_path), backend_url=stub_server.url,
                             queue=f"expiry-{uuid.uuid4().hex[:8]}",
                             human_input_ttl_seconds=1.0, question_sweep_seconds=0.2)
    worker = start_worker(settings, tmp_path / "worker.log", f"expiry-{os.getpid()}@%h")
    try:
        turn = make_turn(query="CALL_TOOL:ask_human and wait")
        listener = listen(turn["message_id"])
        submit_turn(turn, celery_app=producer_app, settings=settings)
        asked = listener.wait_for("human_input_required")

        error = assert_single_end(listener.wait_for_end(timeout=15), "error")
        assert (error["code"], error["status"]) == ("human_input_expired", 410)
        with pytest.raises(HumanInputRefused):
            submit_human_input(turn["message_id"], asked["tool_call_id"], "submit", {},
                               tenant_id=turn["tenant_id"], app_id=turn["app_id"],
                               user_id=turn["user_id"], celery_app=producer_app,
                               settings=settings)
        engine = make_engine(settings.database_url, pool_size=1)
        message = SessionStore(engine).get_message(turn["message_id"])
        engine.dispose()
        assert (message.status, message.error_code) == ("failed", "human_input_expired")
    finally:
        stop_worker(worker)
