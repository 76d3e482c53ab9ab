"""What a running worker tells operators: stage logs, Prometheus metrics, the STREAMING state."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from celery.result import AsyncResult

from stub_backend import StubServer
from tests.conftest import (
    RunningWorker,
    StubControl,
    assert_single_end,
    base_settings,
    make_turn,
    sqlite_url,
    start_worker,
    stop_worker,
    submit_and_wait,
)
from worker.client import submit_turn
from worker.progress import ProgressReporter, store_progress
from worker.store import SessionStore, make_engine

SECRET_CREDENTIAL = "sk-live-DO-NOT-LOG-4242"
SECRET_QUERY = "my very private question 9137"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def observed_worker(stub_server: StubServer,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningWorker]:
    """A worker with its metrics endpoint on and a credential that must never be logged."""
    directory = tmp_path_factory.mktemp("observed")
    settings = base_settings(
        database_url=sqlite_url(directory), backend_url=stub_server.url,
        queue=f"observed-{uuid.uuid4().hex[:8]}", metrics_port=free_port(),
        model_credentials=json.dumps({"api_key": SECRET_CREDENTIAL}),
        progress_interval_seconds=0.1,
    )
    log_path = directory / "worker.log"
    process = start_worker(settings, log_path, f"observed-{os.getpid()}@%h")
    engine = make_engine(settings.database_url, pool_size=1)
    yield RunningWorker(process, settings, log_path, SessionStore(engine))
    stop_worker(process)
    engine.dispose()


def metric(worker: RunningWorker, name: str, **labels: str) -> float:
    text = requests.get(f"http://127.0.0.1:{worker.settings.metrics_port}/metrics",
                        timeout=5).text
    label_text = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    wanted = f"{name}{{{label_text}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def stage_lines(log_path: Path, message_id: str) -> list[dict[str, Any]]:
    stages = []
    for line in log_path.read_text(errors="replace").splitlines():
        start = line.find('{"stage":')
        if start >= 0:
            record = json.loads(line[start:])
            if record.get("message_id") == message_id:
                stages.append(record)
    return stages


def test_a_turn_logs_one_structured_line_per_stage_with_its_ids(
    observed_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn(query=SECRET_QUERY)
    events = submit_and_wait(turn, listen, producer_app, observed_worker)
    assert_single_end(events, "message_end")

    stages = stage_lines(observed_worker.log_path, turn["message_id"])
    assert [record["stage"] for record in stages] == [
        "received", "run_created", "first_chunk", "end"]
    run_id = stub.runs(turn["message_id"])[0]["run_id"]
    for record in stages:
        assert record["conversation_id"] == turn["conversation_id"]
        assert record["task_id"] == events[-1]["task_id"]
    assert all(record["run_id"] == run_id for record in stages[1:])
    assert stages[-1]["outcome"] == "succeeded"
    assert stages[-1]["duration_ms"] >= stages[2]["ttfc_ms"] >= 0
    assert stages[-1]["chars"] == len(events[-1]["answer"])


def test_retries_and_errors_are_logged_as_stages(
    observed_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], create=[{"status": 503}, {"status": 503}, {"status": 503}])
    events = submit_and_wait(turn, listen, producer_app, observed_worker)
    assert_single_end(events, "error")

    stages = [r["stage"] for r in stage_lines(observed_worker.log_path, turn["message_id"])]
    assert stages.count("retry") == observed_worker.settings.max_retries
    assert stages[-1] == "error"


def test_secrets_and_user_text_never_reach_the_log(
    observed_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    turn = make_turn(query=SECRET_QUERY)
    assert_single_end(submit_and_wait(turn, listen, producer_app, observed_worker),
                      "message_end")

    log_text = observed_worker.log_path.read_text(errors="replace")
    assert turn["message_id"] in log_text
    assert SECRET_CREDENTIAL not in log_text
    assert SECRET_QUERY not in log_text


def test_metrics_count_turns_chunks_retries_and_first_chunk_times(
    observed_worker: RunningWorker, stub: StubControl, listen: Any, producer_app: Any
) -> None:
    before = {
        "ok": metric(observed_worker, "agent_turn_turns_total", outcome="succeeded"),
        "retries": metric(observed_worker, "agent_turn_retries_total",
                          code="backend_unavailable"),
        "ttfc": metric(observed_worker, "agent_turn_time_to_first_chunk_seconds_count"),
        "chunks": metric(observed_worker, "agent_turn_chunks_published_total"),
    }
    turn = make_turn()
    stub.plan(turn["message_id"], create=[{"status": 503}])
    events = submit_and_wait(turn, listen, producer_app, observed_worker)
    assert_single_end(events, "message_end")

    assert metric(observed_worker, "agent_turn_turns_total",
                  outcome="succeeded") == before["ok"] + 1
    assert metric(observed_worker, "agent_turn_retries_total",
                  code="backend_unavailable") == before["retries"] + 1
    assert metric(observed_worker,
                  "agent_turn_time_to_first_chunk_seconds_count") == before["ttfc"] + 1
    chunks = sum(event["event"] == "agent_message" for event in events)
    assert metric(observed_worker, "agent_turn_chunks_published_total") == (
        before["chunks"] + chunks)
    assert metric(observed_worker, "agent_turn_in_flight") == 0


def test_a_running_turn_shows_a_streaming_state_with_progress(
    observed_worker: RunningWorker, stub: StubControl, producer_app: Any
) -> None:
    turn = make_turn()
    stub.plan(turn["message_id"], answer_tokens=80, token_delay=0.03)
    submitted = submit_turn(turn, celery_app=producer_app, settings=observed_worker.settings)
    result = AsyncResult(submitted.task_id, app=producer_app)

    deadline = time.monotonic() + 10
    while result.state != "STREAMING":
        assert time.monotonic() < deadline, f"never STREAMING (state {result.state})"
        time.sleep(0.05)
    progress = result.info
    assert progress["run_id"] == stub.runs(turn["message_id"])[0]["run_id"]
    assert progress["attempt"] == 1 and progress["chunks"] >= 1 and progress["chars"] > 0

    summary = result.get(timeout=20)
    assert summary["status"] == "succeeded"
    assert summary["answer_chars"] > 0 and "answer" not in summary


# The process's progress reporter ------------------------------------------------------------

class GatedSender:
    """Records the batches the reporter sends; each send waits until the test lets it through."""

    def __init__(self, fail_first: bool = False) -> None:
        self.sent: list[dict[str, dict[str, Any]]] = []
        self.entered = threading.Semaphore(0)
        self.proceed = threading.Semaphore(0)
        self._fail_first = fail_first

    def __call__(self, reports: dict[str, dict[str, Any]]) -> None:
        self.entered.release()
        assert self.proceed.acquire(timeout=5), "the test never let the send through"
        if self._fail_first:
            self._fail_first = False
            raise ConnectionError("broker down")
        self.sent.append(dict(reports))

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=5), "the reporter never sent"


def test_reports_due_together_go_out_in_one_batch_with_each_turns_newest() -> None:
    sender = GatedSender()
    reporter = ProgressReporter(sender)
    reporter.post("task-a", {"chunks": 1})
    sender.wait_entered()  # task-a's first report is being sent; the next ones queue
    reporter.post("task-b", {"chunks": 1})
    reporter.post("task-a", {"chunks": 2})
    reporter.post("task-a", {"chunks": 3})
    sender.proceed.release()
    sender.wait_entered()
    sender.proceed.release()
    reporter.withdraw("task-a")
    reporter.withdraw("task-b")

    assert sender.sent == [{"task-a": {"chunks": 1}},
                           {"task-b": {"chunks": 1}, "task-a": {"chunks": 3}}]
    assert reporter.batches == 2


def test_a_withdrawn_report_is_never_sent_and_withdraw_waits_for_one_being_sent() -> None:
    sender = GatedSender()
    reporter = ProgressReporter(sender)
    reporter.post("task-a", {"chunks": 1})
    sender.wait_entered()
    reporter.post("task-b", {"chunks": 1})
    withdrawn = threading.Event()

    def end_turn_a() -> None:
        reporter.withdraw("task-b")  # not sent yet: dropped
        reporter.withdraw("task-a")  # being sent: returns once it has gone out
        withdrawn.set()

    ending = threading.Thread(target=end_turn_a)
    ending.start()
    assert not withdrawn.wait(0.2), "withdraw returned while the report was still being sent"
    sender.proceed.release()
    assert withdrawn.wait(5)
    ending.join(5)

    assert sender.sent == [{"task-a": {"chunks": 1}}]
    assert sender.entered.acquire(timeout=0.2) is False, "the withdrawn report went out"


def test_a_failed_report_does_not_stop_the_next_ones() -> None:
    sender = GatedSender(fail_first=True)
    reporter = ProgressReporter(sender)
    reporter.post("task-a", {"chunks": 1})
    sender.wait_entered()
    sender.proceed.release()  # this one fails
    reporter.post("task-a", {"chunks": 2})
    sender.wait_entered()
    sender.proceed.release()
    reporter.withdraw("task-a")

    assert sender.sent == [{"task-a": {"chunks": 2}}]


# Writing the states ----------------------------------------------------------------------------

class CountingConnection(redis.Connection):
    """A real connection that counts what it sends: one send is one round trip."""

    sends = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sends += 1
        super().send_packed_command(command, check_health)


def test_many_reports_are_written_in_two_round_trips_and_read_as_celery_states(
    producer_app: Any,
) -> None:
    backend = producer_app.backend
    tasks = [f"progress-{uuid.uuid4().hex}" for _ in range(20)]
    finished, failed = tasks[0], tasks[1]
    backend.store_result(finished, {"answer_chars": 3}, "SUCCESS")
    backend.store_result(failed, ValueError("gone"), "FAILURE")
    reports = {task_id: {"chunks": n, "chars": 10 * n} for n, task_id in enumerate(tasks)}
    counted = redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=CountingConnection,
        **backend.client.connection_pool.connection_kwargs))
    counted.ping()  # connected: its handshake's sends are not the writes'
    backend_client, backend.client = backend.client, counted
    CountingConnection.sends = 0
    try:
        store_progress(backend, reports, "STREAMING")
    finally:
        backend.client = backend_client
        counted.close()

    assert CountingConnection.sends == 2
    assert AsyncResult(finished, app=producer_app).state == "SUCCESS", "a final state moved back"
    assert AsyncResult(failed, app=producer_app).state == "FAILURE", "a final state moved back"
    for n, task_id in enumerate(tasks[2:], start=2):
        result = AsyncResult(task_id, app=producer_app)
        assert (result.state, result.info) == ("STREAMING", {"chunks": n, "chars": 10 * n})


def test_a_streaming_state_is_published_for_those_who_wait_on_the_result(
    producer_app: Any,
) -> None:
    backend = producer_app.backend
    task_id = f"progress-{uuid.uuid4().hex}"
    listener = backend.client.pubsub()
    listener.subscribe(backend.get_key_for_task(task_id))
    try:
        assert listener.get_message(timeout=5)["type"] == "subscribe"
        store_progress(backend, {task_id: {"chunks": 4}}, "STREAMING")
        message = listener.get_message(timeout=5)
    finally:
        listener.close()

    assert message is not None, "no state went out on the task's channel"
    state = backend.decode(message["data"])
    assert (state["status"], state["result"], state["task_id"]) == (
        "STREAMING", {"chunks": 4}, task_id)
