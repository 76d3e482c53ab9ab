"""Flower, started by scripts/flower against the tests' real broker, watching the real worker.

Turns go through the worker and are read back through Flower's HTTP API (what its pages show),
behind basic auth; a revoke from Flower stops a running turn as ``stop_turn`` does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from config.celery import QUERY_REPR_CHARS, turn_kwargsrepr
from config.settings import Settings
from tests.conftest import (
    PUBSUB_DB,
    REDIS_HOST,
    REDIS_PORT,
    RESULT_DB,
    ROOT,
    RunningWorker,
    StubControl,
    TcpProxy,
    answer_of,
    assert_single_end,
    base_settings,
    free_port,
    make_turn,
    owner_ids,
    settings_env,
    sqlite_url,
    start_worker,
    stop_worker,
)
from tests.test_supervisor import SLOW, _wait_for_status, wait_for_chunks
from worker.client import stop_turn, submit_turn

# One worker is enough to watch: the SQLite one of the session.
on_sqlite_worker = pytest.mark.parametrize("celery_worker", ["sqlite"], indirect=True)

FLOWER_USER = "operator"
FLOWER_PASSWORD = f"flower-{uuid.uuid4().hex}"
WAIT_SECONDS = 20.0
READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")


@dataclass
class RunningFlower:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    auth: tuple[str, str] = (FLOWER_USER, FLOWER_PASSWORD)

    def get(self, path: str, **params: Any) -> requests.Response:
        return requests.get(f"{self.url}{path}", params=params, auth=self.auth, timeout=5)

    def post(self, path: str, **params: Any) -> requests.Response:
        return requests.post(f"{self.url}{path}", params=params, auth=self.auth, timeout=10)

    def task_when(self, task_id: str, done: Callable[[dict[str, Any]], bool],
                  timeout: float = WAIT_SECONDS) -> dict[str, Any]:
        """Poll the task's info until ``done`` holds (Flower learns of tasks from events)."""
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            answer = self.get(f"/api/task/info/{task_id}")
            if answer.status_code == 200:
                info = answer.json()
                if done(info):
                    return info
            else:
                assert answer.status_code == 404, answer.text
            time.sleep(0.1)
        raise AssertionError(f"Flower did not show task {task_id} as expected within "
                             f"{timeout}s; last seen: {info}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_flower(settings: Settings, log_path: Path) -> RunningFlower:
    """Flower as the Procfile runs it (scripts/flower), on a free port, waiting until it sees a
    live worker: that proves its event receiver is subscribed, so no task event is missed."""
    port = free_port()
    env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT),
           "AGENT_TURN_FLOWER_USER": FLOWER_USER, "AGENT_TURN_FLOWER_PASSWORD": FLOWER_PASSWORD,
           "AGENT_TURN_FLOWER_PORT": str(port), "AGENT_TURN_FLOWER_ADDRESS": "127.0.0.1"}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen([str(ROOT / "scripts" / "flower")], cwd=ROOT, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    flower = RunningFlower(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"Flower exited with {process.returncode}:\n{flower.log_tail()}")
        try:
            workers = flower.get("/workers", json=1)
            if workers.status_code == 200 and any(worker.get("status")
                                                   for worker in workers.json()["data"]):
                return flower
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            stop_worker(process)
            raise RuntimeError(f"Flower saw no live worker within {WAIT_SECONDS}s:\n"
                               f"{flower.log_tail()}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def flower(tmp_path_factory: pytest.TempPathFactory,
           celery_worker: RunningWorker) -> Iterator[RunningFlower]:
    running = start_flower(base_settings(), tmp_path_factory.mktemp("flower") / "flower.log")
    yield running
    stop_worker(running.process)


@on_sqlite_worker
def test_flower_refuses_requests_without_the_right_credentials(flower: RunningFlower) -> None:
    for auth in (None, (FLOWER_USER, "wrong-password"), ("someone", FLOWER_PASSWORD)):
        for path in ("/api/tasks", "/api/workers", "/tasks", "/"):
            answer = requests.get(f"{flower.url}{path}", auth=auth, timeout=5)
            assert answer.status_code == 401, (path, auth, answer.status_code)
        revoke = requests.post(f"{flower.url}/api/task/revoke/some-task", auth=auth, timeout=5)
        assert revoke.status_code == 401
    assert flower.get("/api/tasks").status_code == 200
    # Flower leaves its probe and Prometheus endpoints open (see the test below for /metrics).
    assert requests.get(f"{flower.url}/healthcheck", timeout=5).text == "OK"


@on_sqlite_worker
def test_the_flower_password_is_neither_on_its_command_line_nor_in_its_log(
    flower: RunningFlower
) -> None:
    command_line = Path(f"/proc/{flower.process.pid}/cmdline").read_bytes()
    assert b"flower" in command_line
    assert FLOWER_PASSWORD.encode() not in command_line
    assert FLOWER_PASSWORD not in flower.log_path.read_text(errors="replace")


def test_scripts_flower_refuses_to_start_without_credentials() -> None:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("AGENT_TURN_FLOWER_", "FLOWER_"))}
    result = subprocess.run([str(ROOT / "scripts" / "flower")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert "AGENT_TURN_FLOWER_PASSWORD" in result.stderr


@on_sqlite_worker
def test_flower_shows_finished_turns_with_ids_a_short_query_and_a_result_summary(
    flower: RunningFlower, celery_worker: RunningWorker, stub: StubControl, listen: Any,
    producer_app: Any
) -> None:
    secret_tail = f"tail-{uuid.uuid4().hex}"
    long_query = "Please summarise this: " + "lorem ipsum " * 20 + secret_tail
    input_value = f"input-{uuid.uuid4().hex}"
    turns = [make_turn(query=long_query, inputs={"document": input_value}),
             make_turn(query="hi")]
    submitted = []
    for turn in turns:
        listener = listen(turn["message_id"])
        submitted.append(submit_turn(turn, celery_app=producer_app,
                                     settings=celery_worker.settings))
        end = assert_single_end(listener.wait_for_end(), "message_end")
        assert end["status"] == "succeeded"

    for turn, sent in zip(turns, submitted, strict=True):
        info = flower.task_when(sent.task_id, lambda info: info["state"] == "SUCCESS")
        assert info["name"] == "agent_turn.run_turn"
        assert info["args"] == "()"
        assert info["kwargs"] == turn_kwargsrepr(turn)
        for name in ("message_id", "conversation_id", "tenant_id", "app_id", "user_id"):
            assert f"'{name}': '{turn[name]}'" in info["kwargs"]
        result = info["result"]
        assert "'status': 'succeeded'" in result and f"'message_id': '{sent.message_id}'" in result
        assert "answer_chars" in result and "You said" not in result, "a summary, not the answer"

    shown = flower.task_when(submitted[0].task_id, lambda info: True)
    assert f"'query': '{long_query[:QUERY_REPR_CHARS]}…'" in shown["kwargs"]
    everything_shown = flower.get("/api/tasks").text + repr(shown)
    assert secret_tail not in everything_shown, "the query is shown truncated"
    assert input_value not in everything_shown and "document" not in everything_shown, \
        "the inputs are never shown"
    assert submitted[1].task_id in flower.get("/api/tasks").json()
    metrics = requests.get(f"{flower.url}/metrics", timeout=5)  # open, without credentials
    assert metrics.status_code == 200 and 'task="agent_turn.run_turn"' in metrics.text
    assert long_query[:20] not in metrics.text
    assert not any(turn["message_id"] in metrics.text for turn in turns)


@on_sqlite_worker
@pytest.mark.parametrize("terminate", [False, True], ids=["revoke", "revoke-terminate"])
def test_revoking_a_running_turn_from_flower_stops_it(
    terminate: bool, flower: RunningFlower, celery_worker: RunningWorker, stub: StubControl,
    listen: Any, producer_app: Any
) -> None:
    """Flower's revoke is Celery's ``control.revoke``: the worker adds the task to its revoked
    set and the supervisor stops the turn, as ``stop_turn`` does.

    ``terminate`` does not kill a running turn (``TurnRequest``): Celery revokes before it
    kills, so the supervisor had often begun to end the turn, and a kill landing there lost the
    end event or the task's result. Either way, on every pool, the task ends in SUCCESS with a
    stopped summary.
    """
    turn = make_turn()
    stub.plan(turn["message_id"], **SLOW)
    listener = listen(turn["message_id"])
    sent = submit_turn(turn, celery_app=producer_app, settings=celery_worker.settings)
    wait_for_chunks(listener, 2)

    params = {"terminate": "true"} if terminate else {}
    answer = flower.post(f"/api/task/revoke/{sent.task_id}", **params)
    assert answer.status_code == 200, answer.text
    events = listener.wait_for_end(timeout=5)

    end = assert_single_end(events, "message_end")
    assert end["status"] == "stopped"
    assert end["answer"] == answer_of(events[:-1]) != "", "the partial answer is kept"
    [run] = stub.runs(turn["message_id"])
    assert run["status"] == "cancelled", "the backend run must be cancelled"
    message = celery_worker.store.get_message(turn["message_id"])
    assert message is not None and (message.status, message.answer) == ("stopped", end["answer"])
    info = flower.task_when(sent.task_id, lambda info: info["state"] in READY_STATES)
    assert info["state"] == "SUCCESS" and "'status': 'stopped'" in info["result"], info


@on_sqlite_worker
def test_revoking_a_waiting_turn_from_flower_ends_it_without_calling_the_backend(
    flower: RunningFlower, celery_worker: RunningWorker, stub: StubControl, listen: Any,
    producer_app: Any
) -> None:
    first = make_turn(query="first")
    waiting = make_turn(conversation_id=first["conversation_id"], query="second")
    stub.plan(first["message_id"], answer_tokens=60, token_delay=0.03)
    first_listener, waiting_listener = listen(first["message_id"]), listen(waiting["message_id"])
    submit_turn(first, celery_app=producer_app, settings=celery_worker.settings)
    wait_for_chunks(first_listener, 1)
    sent = submit_turn(waiting, celery_app=producer_app, settings=celery_worker.settings)
    _wait_for_status(celery_worker, waiting["message_id"], "queued")

    assert flower.post(f"/api/task/revoke/{sent.task_id}").status_code == 200

    end = assert_single_end(waiting_listener.wait_for_end(), "message_end")
    assert (end["status"], end["answer"]) == ("stopped", "")
    assert stub.create_calls(waiting["message_id"]) == 0
    assert assert_single_end(first_listener.wait_for_end(), "message_end")["status"] == \
        "succeeded"
    flower.task_when(sent.task_id, lambda info: info["state"] == "REVOKED")


@on_sqlite_worker
def test_a_revoke_that_lands_while_a_waiting_turn_checks_its_conversation_shows_revoked(
    flower: RunningFlower, stub: StubControl, listen: Any, producer_app: Any, tmp_path: Path
) -> None:
    """The revoke lands mid-attempt, so the attempt's retry races it: the retry's own message is
    discarded as revoked (``task-revoked``, the turn ends), and Celery sends the attempt's
    ``task-retried`` after that. Flower and the result backend must still end on REVOKED, and
    the turn end once, stopped.

    The worker's bus and result backend are reached through a proxy whose replies are made
    late: that holds an attempt in its lease check while the revoke lands (the revoke's reply
    says it has), and makes the attempt's retry bookkeeping end well after the discarded
    message's ``task-revoked``, the order in which the race is lost. The broker is direct."""
    redis_proxy = TcpProxy(REDIS_PORT)
    settings = base_settings(
        database_url=sqlite_url(tmp_path), backend_url=stub.url,
        pubsub_url=f"redis://{REDIS_HOST}:{redis_proxy.port}/{PUBSUB_DB}",
        result_backend=f"redis://{REDIS_HOST}:{redis_proxy.port}/{RESULT_DB}",
        queue=f"agent_turns_race_{uuid.uuid4().hex[:8]}")
    hostname = f"race-{os.getpid()}@{socket.gethostname()}"
    process = start_worker(settings, tmp_path / "worker.log", hostname, pool="threads")
    try:
        first = make_turn(query="first")
        waiting = make_turn(conversation_id=first["conversation_id"], query="second")
        stub.plan(first["message_id"], answer_tokens=200, token_delay=0.03)
        first_listener = listen(first["message_id"])
        waiting_listener = listen(waiting["message_id"])
        submit_turn(first, celery_app=producer_app, settings=settings)
        wait_for_chunks(first_listener, 1)
        sent = submit_turn(waiting, celery_app=producer_app, settings=settings)
        flower.task_when(sent.task_id, lambda info: info["state"] == "RETRY")

        redis_proxy.reply_delay = 0.3
        slowed_at = time.time()  # the worker's task events carry the same clock
        flower.task_when(sent.task_id, lambda info: (info.get("started") or 0) > slowed_at)
        replies = producer_app.control.revoke(sent.task_id, reply=True, timeout=5,
                                              destination=[hostname])
        assert [next(iter(reply)) for reply in replies] == [hostname], replies

        flower.task_when(sent.task_id, lambda info: info["state"] == "REVOKED"
                         and (info.get("retried") or 0) > slowed_at)
        redis_proxy.reply_delay = 0.0
        end = assert_single_end(waiting_listener.wait_for_end(), "message_end")
        assert (end["status"], end["answer"]) == ("stopped", "")
        assert stub.create_calls(waiting["message_id"]) == 0
        assert producer_app.AsyncResult(sent.task_id).state == "REVOKED"
        assert assert_single_end(first_listener.wait_for_end(), "message_end")["status"] == \
            "succeeded"
    finally:
        stop_worker(process)
        redis_proxy.close()
        stop_worker(process)

@on_sqlite_worker
def test_a_turn_that_waited_for_its_conversation_still_shows_only_ids(
    flower: RunningFlower, celery_worker: RunningWorker, stub: StubControl, listen: Any,
    producer_app: Any
) -> None:
    """Waiting re-enqueues the turn (a Celery retry), which must keep the short repr."""
    first = make_turn(query="first")
    secret_tail = f"tail-{uuid.uuid4().hex}"
    waiting = make_turn(conversation_id=first["conversation_id"],
                        query="second " + "x" * QUERY_REPR_CHARS + secret_tail)
    stub.plan(first["message_id"], answer_tokens=30, token_delay=0.03)
    first_listener, waiting_listener = listen(first["message_id"]), listen(waiting["message_id"])
    submit_turn(first, celery_app=producer_app, settings=celery_worker.settings)
    wait_for_chunks(first_listener, 1)
    sent = submit_turn(waiting, celery_app=producer_app, settings=celery_worker.settings)
    assert_single_end(first_listener.wait_for_end(), "message_end")
    assert assert_single_end(waiting_listener.wait_for_end(), "message_end")["status"] == \
        "succeeded"

    info = flower.task_when(sent.task_id, lambda info: info["state"] == "SUCCESS")
    assert info["retries"] >= 1, "the turn should have waited (been retried) at least once"
    assert info["args"] == "()"
    assert secret_tail not in info["kwargs"] and secret_tail not in flower.get("/api/tasks").text


def test_flower_shows_a_running_turn_as_streaming_with_its_progress(
    flower: RunningFlower, celery_worker: RunningWorker, stub: StubControl, listen: Any,
    producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], **SLOW)
    listener = listen(turn["message_id"])
    sent = submit_turn(turn, celery_app=producer_app, settings=celery_worker.settings)
    wait_for_chunks(listener, 1)

    info = flower.task_when(sent.task_id, lambda info: info["state"] == "STREAMING")
    assert info["started"] is not None or info["received"] is not None

    # Flower's views keep only Celery's own task fields; the progress itself is the state's
    # metadata in the result backend (tests/test_progress.py reads it through AsyncResult).
    result = flower.get(f"/api/task/result/{sent.task_id}").json()
    assert result["state"] == "STREAMING"
    stop_turn(message_id=turn["message_id"], **owner_ids(turn), celery_app=producer_app,
              settings=celery_worker.settings)
    assert_single_end(listener.wait_for_end(timeout=5), "message_end")
    done = flower.task_when(sent.task_id, lambda info: info["state"] in READY_STATES)
    assert done["state"] == "SUCCESS", "the streaming state gives way to the final one"
