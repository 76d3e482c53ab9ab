"""The dify-agent client against the real stub server over a socket.

Faults are scripted per message through the stub's control API (``StubControl.plan``); the
client runs with small time-outs so stalls and reconnects take fractions of a second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from config.settings import Settings
from stub_backend import StubServer, StubSettings
from tests.conftest import StubControl, make_turn
from worker.backend import AgentBackendClient, RunEvent, answer_delta_of, parse_event
from worker.composition import build_run_request, load_template
from worker.errors import (
    BackendUnavailable,
    ProtocolViolation,
    RunRejected,
    StreamInterrupted,
)
from worker.payload import parse_turn

READ_TIMEOUT = 1.0  # the session stub sends a keepalive every 0.5 s
CLOSED_PORT_URL = "http://127.0.0.1:1"


def make_client(url: str, **overrides: Any) -> AgentBackendClient:
    options: dict[str, Any] = {"connect_timeout": 1.0, "read_timeout": READ_TIMEOUT,
                               "max_reconnects": 3, "reconnect_delay": 0.01}
    options.update(overrides)
    return AgentBackendClient(url, **options)


@pytest.fixture
def client(stub: StubControl) -> Iterator[AgentBackendClient]:
    backend = make_client(stub.url)
    yield backend
    backend.close()


def run_request(settings: Settings, **turn: Any) -> tuple[str, dict[str, Any]]:
    """A message id and the CreateRunRequest body the worker would send for it."""
    payload = parse_turn(make_turn(**turn), settings)
    body = build_run_request(payload, load_template(settings.composition_template), settings,
                             session_snapshot=None, run_number=1)
    return payload.message_id, body


def cursor(event: RunEvent) -> tuple[int, int]:
    ms, _, n = event.event_id.partition("-")
    return int(ms), int(n)


def logged_event_ids(stub: StubControl, run_id: str) -> list[str]:
    """Every event id of the run as the backend logged it (the paged API, not the stream)."""
    answer = requests.get(f"{stub.url}/runs/{run_id}/events", params={"limit": 500},
                          timeout=5)
    answer.raise_for_status()
    return [event["id"] for event in answer.json()["events"]]


def follow(client: AgentBackendClient, run_id: str, *, timeout: float = 15.0,
           **kwargs: Any) -> list[RunEvent]:
    deadline = time.monotonic() + timeout
    events = []
    for event in client.stream_events(run_id, **kwargs):
        events.append(event)
        assert time.monotonic() < deadline, f"stream not finished within {timeout}s"
    return events


def sse_connections(stub: StubControl, message_id: str) -> int:
    (run,) = stub.runs(message_id)
    connections: int = run["sse_connections"]
    return connections


# Creating runs ------------------------------------------------------------------------------


def test_create_run_returns_the_new_run_id(client: AgentBackendClient, stub: StubControl,
                                           settings: Settings) -> None:
    message_id, body = run_request(settings)

    run_id = client.create_run(body, message_id=message_id)

    runs = stub.runs(message_id)
    assert [run["run_id"] for run in runs] == [run_id]
    assert runs[0]["request"] == body


def test_a_repeated_create_with_the_same_idempotency_key_returns_the_same_run(
    client: AgentBackendClient, stub: StubControl, settings: Settings,
) -> None:
    message_id, body = run_request(settings)

    first = client.create_run(body, message_id=message_id)
    second = client.create_run(body, message_id=message_id)

    assert first == second
    assert len(stub.runs(message_id)) == 1


@pytest.mark.parametrize("status", [503, 500, 502, 429])
def test_a_create_answered_with_a_server_error_is_backend_unavailable(
    client: AgentBackendClient, stub: StubControl, settings: Settings, status: int,
) -> None:
    message_id, body = run_request(settings)
    stub.plan(message_id, create=[{"status": status}])

    with pytest.raises(BackendUnavailable) as caught:
        client.create_run(body, message_id=message_id)

    assert caught.value.retryable
    assert caught.value.message_id == message_id
    assert str(status) in caught.value.message
    assert stub.create_calls(message_id) == 1  # a create is never retried by the client


@pytest.mark.parametrize("status", [422, 401, 403, 404])
def test_a_create_refused_by_the_backend_is_run_rejected(
    client: AgentBackendClient, stub: StubControl, settings: Settings, status: int,
) -> None:
    message_id, body = run_request(settings)
    stub.plan(message_id, create=[{"status": status, "body": {"detail": "nope"}}])

    with pytest.raises(RunRejected) as caught:
        client.create_run(body, message_id=message_id)

    assert not caught.value.retryable
    assert caught.value.message_id == message_id
    assert str(status) in caught.value.message and "nope" in caught.value.message


@pytest.mark.parametrize("status", [301, 307, 308])
def test_a_create_answered_with_a_redirect_is_run_rejected_not_followed(
    client: AgentBackendClient, stub: StubControl, settings: Settings, status: int,
) -> None:
    message_id, body = run_request(settings)
    stub.plan(message_id, create=[{"status": status, "body": {"detail": "moved"}}])

    with pytest.raises(RunRejected) as caught:
        client.create_run(body, message_id=message_id)

    assert not caught.value.retryable
    assert f"HTTP {status} (redirects are not followed)" in caught.value.message
    assert stub.create_calls(message_id) == 1


def test_a_body_the_backend_cannot_validate_is_run_rejected(
    client: AgentBackendClient, stub: StubControl, settings: Settings,
) -> None:
    message_id, body = run_request(settings)
    body["unexpected_field"] = True  # the backend forbids unknown fields

    with pytest.raises(RunRejected) as caught:
        client.create_run(body, message_id=message_id)

    assert "422" in caught.value.message
    assert stub.runs(message_id) == []


def test_a_backend_that_refuses_connections_is_backend_unavailable(settings: Settings) -> None:
    message_id, body = run_request(settings)
    backend = make_client(CLOSED_PORT_URL)
    try:
        with pytest.raises(BackendUnavailable) as caught:
            backend.create_run(body, message_id=message_id)
        assert caught.value.retryable and caught.value.message_id == message_id
        with pytest.raises(BackendUnavailable):
            backend.get_run("run-1")
        with pytest.raises(BackendUnavailable):
            backend.cancel_run("run-1")
    finally:
        backend.close()


@pytest.mark.parametrize("answer", [{"status": "running"}, {"run_id": ""}, {"run_id": 42},
                                    ["run-1"]])
def test_a_create_answer_without_a_run_id_is_a_protocol_violation(
    client: AgentBackendClient, stub: StubControl, settings: Settings, answer: Any,
) -> None:
    message_id, body = run_request(settings)
    stub.plan(message_id, create=[{"status": 202, "body": answer}])

    with pytest.raises(ProtocolViolation) as caught:
        client.create_run(body, message_id=message_id)

    assert not caught.value.retryable and caught.value.message_id == message_id


# Following the event stream -----------------------------------------------------------------


def test_the_stream_yields_every_event_in_order_up_to_run_succeeded(
    client: AgentBackendClient, stub: StubControl, settings: Settings,
) -> None:
    message_id, body = run_request(settings, query="hello there")
    run_id = client.create_run(body, message_id=message_id)

    events = follow(client, run_id, message_id=message_id)

    assert events[0].type == "run_started"
    assert events[-1].type == "run_succeeded" and events[-1].terminal
    assert not any(event.terminal for event in events[:-1])
    assert [cursor(e) for e in events] == sorted({cursor(e) for e in events})
    assert [event.event_id for event in events] == logged_event_ids(stub, run_id)
    output = events[-1].data["output"]
    assert output == "[turn 1] You said: hello there."
    assert "".join(event.answer_delta or "" for event in events) == output
    assert isinstance(events[-1].data["session_snapshot"], dict)
    assert events[-1].data["usage"]["total_tokens"] > 0
    assert sse_connections(stub, message_id) == 1


def test_the_thinking_part_contributes_no_answer_text(
    client: AgentBackendClient, settings: Settings,
) -> None:
    message_id, body = run_request(settings)
    run_id = client.create_run(body, message_id=message_id)

    events = follow(client, run_id, message_id=message_id)

    thinking = [event for event in events
                if (event.data.get("part") or {}).get("part_kind") == "thinking"]
    assert len(thinking) == 1
    assert thinking[0].answer_delta is None
    part_ends = [event for event in events if event.data.get("event_kind") == "part_end"]
    assert part_ends and all(event.answer_delta is None for event in part_ends)


def test_text_parts_are_read_when_the_server_leaves_out_agent_message_delta() -> None:
    def envelope(data: dict[str, Any]) -> dict[str, Any]:
        return {"id": "1-0", "run_id": "r", "type": "pydantic_ai_event", "data": data}

    assert answer_delta_of(envelope({"event_kind": "part_start", "index": 0,
                                     "part": {"part_kind": "thinking", "content": "hmm"}})) is None
    assert answer_delta_of(envelope({"event_kind": "part_delta", "index": 0, "delta": {
        "part_delta_kind": "thinking", "content_delta": "hmm"}})) is None
    assert answer_delta_of(envelope({"event_kind": "part_start", "index": 1,
                                     "part": {"part_kind": "text", "content": "Hi"}})) == "Hi"
    assert answer_delta_of(envelope({"event_kind": "part_delta", "index": 1, "delta": {
        "part_delta_kind": "text", "content_delta": " there"}})) == " there"
    assert answer_delta_of(envelope({"event_kind": "part_end", "index": 1,
                                     "part": {"part_kind": "text", "content": "Hi"}})) is None


def test_an_event_of_another_run_is_a_protocol_violation() -> None:
    frame = ('{"id":"1-0","run_id":"other","type":"run_started","data":{},'
             '"created_at":"2026-01-01T00:00:00.000000Z"}')

    with pytest.raises(ProtocolViolation) as caught:
        parse_event(frame, "mine")

    assert caught.value.run_id == "mine"


def test_the_stream_resumes_after_a_dropped_connection_without_a_second_run(
    client: AgentBackendClient, stub: StubControl, settings: Settings,
) -> None:
    message_id, body = run_request(settings)
    stub.plan(message_id, stream=[{"drop_after": 3}])
    run_id = client.create_run(body, message_id=message_id)

    events = follow(client, run_id, message_id=message_id)

    ids = [event.event_id for event in events]
    assert len(ids) == len(set(ids))
    assert ids == logged_event_ids(stub, run_id)
    assert events[-1].type == "run_succeeded"
    assert "".join(e.answer_delta or "" for e in events) == events[-1].data["output"]
    assert len(stub.runs(message_id)) == 1
    assert stub.create_calls(message_id) == 1
    # Two connections, and the second resumed after the third event (no repeats above).
    assert sse_connections(stub, message_id) == 2


def test_a_stream_that_drops_repeatedly_but_makes_progress_is_followed_to_the_end(
    stub: StubControl, settings: Settings,
) -> None:
    message_id, body = run_request(settings)
    stub.plan(message_id, stream=[{"drop_after": 2}] * 6)
    backend = make_client(stub.url, max_reconnects=1)
    try:
        run_id = backend.create_run(body, message_id=message_id)
        events = follow(backend, run_id, message_id=message_id)
    finally:
        backend.close()

    assert [event.event_id for event in events] == logged_event_ids(stub, run_id)
    assert events[-1].type == "run_succeeded"
    assert sse_connections(stub, message_id) >= 3


def test_the_stream_resumes_after_a_stall_via_the_read_timeout(
    client: AgentBackendClient, stub: StubControl, settings: Settings,
) -> None:
    message_id, body = run_request(settings)
    stub.plan(message_id, stream=[{"stall_after": 2}])
    run_id = client.create_run(body, message_id=message_id)

    started = time.monotonic()
    events = follow(client, run_id, message_id=message_id)
    elapsed = time.monotonic() - started

    assert [event.event_id for event in events] == logged_event_ids(stub, run_id)
    assert events[-1].type == "run_succeeded"
    assert sse_connections(stub, message_id) == 2
    assert READ_TIMEOUT * 0.9 <= elapsed < READ_TIMEOUT + 5.0


def test_a_stall_is_logged_as_a_read_timeout(
    client: AgentBackendClient, stub: StubControl, settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    message_id, body = run_request(settings)
    stub.plan(message_id, stream=[{"stall_after": 2}])
    run_id = client.create_run(body, message_id=message_id)

    with caplog.at_level(logging.WARNING, logger="worker.backend"):
        events = follow(client, run_id, message_id=message_id)

    assert events[-1].type == "run_succeeded"
    assert f"broke (timed out (no byte for {READ_TIMEOUT:g} s)); resuming after" in caplog.text


@pytest.fixture(scope="module")
def steady_stub() -> Iterator[StubServer]:
    """Tokens spaced under the read time-out: a stream that is never silent for that long."""
    with StubServer(StubSettings(token_delay=READ_TIMEOUT * 0.3, answer_tokens=10,
                                 keepalive_interval=0.5)) as server:
        yield server


def test_a_consumer_slower_than_the_read_timeout_does_not_cut_its_stream(
    steady_stub: StubServer, settings: Settings,
) -> None:
    stub = StubControl(steady_stub.url)
    message_id, body = run_request(settings)
    backend = make_client(steady_stub.url)
    try:
        run_id = backend.create_run(body, message_id=message_id)
        events = []
        for event in backend.stream_events(run_id, message_id=message_id):
            events.append(event)
            if len(events) == 2:
                time.sleep(READ_TIMEOUT * 2)  # a turn busy with one event, e.g. a slow publish
    finally:
        backend.close()

    assert events[-1].type == "run_succeeded"
    assert [event.event_id for event in events] == logged_event_ids(stub, run_id)
    assert sse_connections(stub, message_id) == 1, "a busy reader's stream was cut as silent"


def test_resuming_from_a_cursor_skips_the_events_already_seen(
    client: AgentBackendClient, stub: StubControl, settings: Settings,
) -> None:
    message_id, body = run_request(settings)
    run_id = client.create_run(body, message_id=message_id)
    everything = follow(client, run_id, message_id=message_id)

    rest = follow(client, run_id, after=everything[3].event_id, message_id=message_id)

    assert [e.event_id for e in rest] == [e.event_id for e in everything[4:]]


def test_the_stream_gives_up_after_max_reconnects_when_every_connection_drops(
    stub: StubControl, settings: Settings,
) -> None:
    message_id, body = run_request(settings)
    stub.plan(message_id, stream=[{"drop_after": 0}] * 10)
    backend = make_client(stub.url, max_reconnects=2)
    try:
        run_id = backend.create_run(body, message_id=message_id)
        with pytest.raises(StreamInterrupted) as caught:
            follow(backend, run_id, message_id=message_id)
    finally:
        backend.close()

    assert caught.value.retryable
    assert (caught.value.run_id, caught.value.message_id) == (run_id, message_id)
    assert sse_connections(stub, message_id) == 3  # the first try and two reconnects


def test_an_undecodable_frame_is_a_protocol_violation_without_reconnecting(
    client: AgentBackendClient, stub: StubControl, settings: Settings,
) -> None:
    message_id, body = run_request(settings)
    stub.plan(message_id, stream=[{"garbage_after": 2}])
    run_id = client.create_run(body, message_id=message_id)
    seen: list[RunEvent] = []

    with pytest.raises(ProtocolViolation) as caught:
        for event in client.stream_events(run_id, message_id=message_id):
            seen.append(event)

    assert not caught.value.retryable
    assert (caught.value.run_id, caught.value.message_id) == (run_id, message_id)
    assert len(seen) == 2
    assert sse_connections(stub, message_id) == 1


def test_a_frame_larger_than_max_frame_bytes_is_a_protocol_violation(
    stub: StubControl, settings: Settings,
) -> None:
    message_id, body = run_request(settings)
    stub.plan(message_id, output="x" * 20_000)  # only the run_succeeded frame is this big
    backend = make_client(stub.url, max_frame_bytes=8_000)
    try:
        run_id = backend.create_run(body, message_id=message_id)
        seen: list[RunEvent] = []
        with pytest.raises(ProtocolViolation) as caught:
            for event in backend.stream_events(run_id, message_id=message_id):
                seen.append(event)
    finally:
        backend.close()

    assert caught.value.run_id == run_id
    assert seen and not any(event.terminal for event in seen)
    assert sse_connections(stub, message_id) == 1


def test_streaming_an_unknown_run_is_run_rejected(client: AgentBackendClient) -> None:
    with pytest.raises(RunRejected) as caught:
        follow(client, "no-such-run", message_id="msg-x")

    assert "404" in caught.value.message
    assert (caught.value.run_id, caught.value.message_id) == ("no-such-run", "msg-x")


# Run status and cancel ----------------------------------------------------------------------


def test_get_run_returns_the_run_status(
    client: AgentBackendClient, settings: Settings,
) -> None:
    message_id, body = run_request(settings)
    run_id = client.create_run(body, message_id=message_id)
    follow(client, run_id)

    status = client.get_run(run_id)

    assert (status["run_id"], status["status"], status["error"]) == (run_id, "succeeded", None)
    with pytest.raises(RunRejected) as caught:
        client.get_run("no-such-run")
    assert caught.value.run_id == "no-such-run"


def test_cancel_stops_a_running_run_and_is_false_once_it_ended(
    client: AgentBackendClient, stub: StubControl, settings: Settings,
) -> None:
    message_id, body = run_request(settings)
    stub.plan(message_id, token_delay=0.3)  # long enough to still be running
    run_id = client.create_run(body, message_id=message_id)
    assert client.get_run(run_id)["status"] == "running"

    assert client.cancel_run(run_id, reason="user_stop") is True
    events = follow(client, run_id)
    assert events[-1].type == "run_cancelled"
    assert events[-1].data["reason"] == "user_stop"
    assert client.get_run(run_id)["status"] == "cancelled"
    assert client.cancel_run(run_id) is False


def test_cancelling_a_finished_run_is_false(
    client: AgentBackendClient, settings: Settings,
) -> None:
    message_id, body = run_request(settings)
    run_id = client.create_run(body, message_id=message_id)
    follow(client, run_id)

    assert client.cancel_run(run_id) is False


def test_cancelling_an_unknown_run_is_run_rejected(client: AgentBackendClient) -> None:
    with pytest.raises(RunRejected):
        client.cancel_run("no-such-run")


# Authentication -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_stub() -> Iterator[StubServer]:
    with StubServer(StubSettings(auth_token="s3cret", token_delay=0.0,
                                 keepalive_interval=0.5)) as server:
        yield server


def test_the_bearer_token_is_sent_when_configured(guarded_stub: StubServer,
                                                  settings: Settings) -> None:
    message_id, body = run_request(settings)
    backend = make_client(guarded_stub.url, token="s3cret")
    try:
        run_id = backend.create_run(body, message_id=message_id)
        events = follow(backend, run_id)
        assert backend.get_run(run_id)["status"] == "succeeded"
    finally:
        backend.close()

    assert events[-1].type == "run_succeeded"


@pytest.mark.parametrize("token", [None, "wrong"])
def test_a_missing_or_wrong_token_is_run_rejected(guarded_stub: StubServer, settings: Settings,
                                                  token: str | None) -> None:
    message_id, body = run_request(settings)
    backend = make_client(guarded_stub.url, token=token)
    try:
        with pytest.raises(RunRejected) as caught:
            backend.create_run(body, message_id=message_id)
        assert "401" in caught.value.message
        assert caught.value.message_id == message_id
        with pytest.raises(RunRejected):
            follow(backend, "any-run")
    finally:
        backend.close()
