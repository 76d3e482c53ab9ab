"""The dify-agent stub, exercised over a real socket the way the worker will use it."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from stub_backend import StubServer, StubSettings
from stub_backend.process import RunPlan
from stub_backend.runs import Run, produce
from tests.conftest import wait_until

TIMEOUT = (5.0, 10.0)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CURSOR = re.compile(r"^(\d+)-(\d+)$")
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
LAYER_NAMES = ("execution_context", "prompt", "history", "llm")
# The reference server's captures were made with the ask-human layer in the composition.
ASK_LAYER_NAMES = ("execution_context", "prompt", "ask_human", "history", "llm")
FRAMES = PROJECT_ROOT.parent / "shared" / "agent-protocol-frames"


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def backend() -> Iterator[StubServer]:
    with StubServer(StubSettings(token_delay=0.0)) as server:
        yield server


@pytest.fixture(scope="module")
def chatty_backend() -> Iterator[StubServer]:
    """A stub with a tiny keepalive interval, to observe idle-stream behaviour quickly."""
    with StubServer(StubSettings(token_delay=0.0, keepalive_interval=0.05)) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_state(backend: StubServer) -> None:
    requests.delete(f"{backend.url}/_stub/state", timeout=TIMEOUT).raise_for_status()


def composition(query: str = "hi", names: tuple[str, ...] = LAYER_NAMES) -> dict[str, Any]:
    layers: dict[str, dict[str, Any]] = {
        "execution_context": {
            "name": "execution_context",
            "type": "dify.execution_context",
            "config": {"tenant_id": "t1", "user_id": "u1", "conversation_id": "c1"},
        },
        "prompt": {
            "name": "prompt",
            "type": "plain.prompt",
            "config": {"prefix": "Be brief.", "user": query},
        },
        "history": {"name": "history", "type": "pydantic_ai.history"},
        "ask_human": {"name": "ask_human", "type": "dify.ask_human", "config": {}},
        "llm": {
            "name": "llm",
            "type": "dify.plugin.llm",
            "deps": {"execution_context": "execution_context"},
            "config": {"model_provider": "openai", "model": "gpt-4o"},
        },
    }
    return {"schema_version": 1, "layers": [layers[name] for name in names]}


def run_body(
    query: str = "hi",
    *,
    message_id: str | None = "msg-1",
    snapshot: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    layers: tuple[str, ...] = LAYER_NAMES,
) -> dict[str, Any]:
    return {
        "composition": composition(query, layers),
        "session_snapshot": snapshot,
        "idempotency_key": idempotency_key,
        "metadata": {"message_id": message_id} if message_id else {},
        "deferred_tool_results": None,
        "on_exit": {"default": "suspend", "layers": {}},
    }


def create(server: StubServer, body: dict[str, Any], **kwargs: Any) -> requests.Response:
    return requests.post(f"{server.url}/runs", json=body, timeout=TIMEOUT, **kwargs)


def start_run(server: StubServer, query: str = "hi", **kwargs: Any) -> str:
    response = create(server, run_body(query, **kwargs))
    assert response.status_code == 202, response.text
    run_id: str = response.json()["run_id"]
    return run_id


def register(server: StubServer, message_id: str, **body: Any) -> None:
    response = requests.post(
        f"{server.url}/_stub/messages/{message_id}", json=body, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text


@dataclass
class Frame:
    raw: bytes
    id: str | None = None
    event: str | None = None
    data: str | None = None
    comment: str | None = None

    @property
    def envelope(self) -> dict[str, Any]:
        assert self.data is not None
        parsed: dict[str, Any] = json.loads(self.data)
        return parsed


def parse_frame(raw: bytes) -> Frame:
    frame = Frame(raw=raw + b"\n\n")
    for line in raw.decode().split("\n"):
        field, _, value = line.partition(": ")
        if line.startswith(":"):
            frame.comment = line[1:].strip()
        elif field in ("id", "event", "data"):
            setattr(frame, field, value)
    return frame


def iter_frames(response: requests.Response) -> Iterator[Frame]:
    """Frames as they arrive; raises whatever requests raises if the stream breaks."""
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            yield parse_frame(raw)
    assert buffer == b"", f"stream ended inside a frame: {buffer!r}"


def open_stream(
    server: StubServer,
    run_id: str,
    *,
    after: str | None = None,
    last_event_id: str | None = None,
    timeout: tuple[float, float] = TIMEOUT,
) -> requests.Response:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    params = {"after": after} if after else {}
    response = requests.get(
        f"{server.url}/runs/{run_id}/events/sse",
        params=params,
        headers=headers,
        stream=True,
        timeout=timeout,
    )
    assert response.status_code == 200, response.text
    return response


def read_stream(server: StubServer, run_id: str, **kwargs: Any) -> list[Frame]:
    with open_stream(server, run_id, **kwargs) as response:
        return list(iter_frames(response))


def events_of(frames: list[Frame]) -> list[dict[str, Any]]:
    return [frame.envelope for frame in frames if frame.comment is None]


def answer_deltas(events: list[dict[str, Any]]) -> str:
    return "".join(e.get("agent_message_delta") or "" for e in events)


def run_status(server: StubServer, run_id: str) -> dict[str, Any]:
    response = requests.get(f"{server.url}/runs/{run_id}", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def cursor_key(cursor: str) -> tuple[int, int]:
    match = CURSOR.match(cursor)
    assert match, cursor
    return int(match.group(1)), int(match.group(2))


# --------------------------------------------------------------------------------------------
# Creating runs


def test_create_answers_202_with_hex_run_id_and_running_status(backend: StubServer) -> None:
    response = create(backend, run_body())

    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "running"
    assert re.fullmatch(r"[0-9a-f]{32}", body["run_id"])


def test_create_accepts_a_minimal_body_with_defaults(backend: StubServer) -> None:
    response = create(backend, {"composition": composition()})

    assert response.status_code == 202, response.text


def _with(body: dict[str, Any], mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    mutate(body)
    return body


@pytest.mark.parametrize(
    ("case", "body"),
    [
        ("unknown top-level field", _with(run_body(), lambda b: b.update(extra=1))),
        (
            "unknown composition field",
            _with(run_body(), lambda b: b["composition"].update(version=2)),
        ),
        (
            "unknown layer field",
            _with(run_body(), lambda b: b["composition"]["layers"][0].update(kind="x")),
        ),
        ("unknown on_exit field", _with(run_body(), lambda b: b["on_exit"].update(when="now"))),
        (
            "unknown deferred_tool_results field",
            _with(run_body(), lambda b: b.update(deferred_tool_results={"calls": {}, "x": 1})),
        ),
        (
            "duplicate layer names",
            _with(
                run_body(),
                lambda b: b["composition"]["layers"].append(dict(b["composition"]["layers"][0])),
            ),
        ),
        (
            "dep naming no layer",
            _with(
                run_body(),
                lambda b: b["composition"]["layers"][3].update(deps={"execution_context": "nope"}),
            ),
        ),
        ("missing composition", {"metadata": {}}),
        (
            "snapshot with other layer order",
            run_body(
                snapshot={
                    "schema_version": 1,
                    "layers": [
                        {"name": n} for n in ("prompt", "execution_context", "history", "llm")
                    ],
                }
            ),
        ),
        ("snapshot without layers", run_body(snapshot={"schema_version": 1})),
    ],
)
def test_create_rejects_invalid_body_with_422(
    backend: StubServer, case: str, body: dict[str, Any]
) -> None:
    response = create(backend, body)

    assert response.status_code == 422, case
    assert "detail" in response.json()
    assert backend.app_state.describe_runs() == []


def test_create_rejects_a_body_that_is_not_json_with_422(backend: StubServer) -> None:
    response = requests.post(
        f"{backend.url}/runs",
        data=b"{not json",
        headers={"content-type": "application/json"},
        timeout=TIMEOUT,
    )

    assert response.status_code == 422
    assert "detail" in response.json()


def test_run_api_requires_the_configured_bearer_token() -> None:
    with StubServer(StubSettings(token_delay=0.0, auth_token="s3cret")) as server:
        missing = create(server, run_body())
        wrong = create(server, run_body(), headers={"Authorization": "Bearer nope"})
        right = create(server, run_body(), headers={"Authorization": "Bearer s3cret"})
        run_id = right.json()["run_id"]
        status_without = requests.get(f"{server.url}/runs/{run_id}", timeout=TIMEOUT)
        control = requests.get(f"{server.url}/_stub/runs", timeout=TIMEOUT)

    assert missing.status_code == 401
    assert missing.json()["detail"]
    assert wrong.status_code == 401
    assert right.status_code == 202
    assert status_without.status_code == 401
    assert control.status_code == 200


def test_idempotency_key_returns_the_same_run_without_starting_another(backend: StubServer) -> None:
    first = create(backend, run_body(idempotency_key="turn-1"))
    second = create(backend, run_body(idempotency_key="turn-1"))
    other = create(backend, run_body(idempotency_key="turn-2"))

    assert first.status_code == second.status_code == other.status_code == 202
    assert second.json()["run_id"] == first.json()["run_id"]
    assert other.json()["run_id"] != first.json()["run_id"]
    info = requests.get(f"{backend.url}/_stub/messages/msg-1", timeout=TIMEOUT).json()
    assert info == {"create_calls": 3, "runs": [first.json()["run_id"], other.json()["run_id"]]}


def test_answer_of_second_turn_reflects_the_snapshot_it_was_sent(backend: StubServer) -> None:
    first_events = events_of(read_stream(backend, start_run(backend, "hello")))
    first_result = first_events[-1]["data"]
    second_run = start_run(backend, "again", snapshot=first_result["session_snapshot"])
    second_result = events_of(read_stream(backend, second_run))[-1]["data"]

    assert first_result["output"] == "[turn 1] You said: hello."
    assert second_result["output"] == "[turn 2] You said: again."
    snapshot = second_result["session_snapshot"]
    assert [layer["name"] for layer in snapshot["layers"]] == list(LAYER_NAMES)
    assert all(layer["lifecycle_state"] == "suspended" for layer in snapshot["layers"])
    history = next(layer for layer in snapshot["layers"] if layer["name"] == "history")
    assert history["runtime_state"]["messages"] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "[turn 1] You said: hello."},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "[turn 2] You said: again."},
    ]


def test_runs_are_produced_without_any_stream_client(backend: StubServer) -> None:
    run_id = start_run(backend)

    wait_until(lambda: run_status(backend, run_id)["status"] == "succeeded")
    runs = requests.get(f"{backend.url}/_stub/runs", timeout=TIMEOUT).json()["runs"]
    assert runs[0]["sse_connections"] == 0


def test_run_status_reports_times_and_no_error(backend: StubServer) -> None:
    run_id = start_run(backend)
    read_stream(backend, run_id)

    status = run_status(backend, run_id)
    assert status["run_id"] == run_id
    assert status["status"] == "succeeded"
    assert status["error"] is None
    assert ISO_UTC.match(status["created_at"])
    assert status["updated_at"] >= status["created_at"]


def test_create_answers_503_while_shutting_down() -> None:
    server = StubServer(StubSettings(token_delay=0.0))
    with server:
        assert create(server, run_body()).status_code == 202
        server.begin_shutdown()
        wait_until(lambda: create(server, run_body()).status_code == 503)


# --------------------------------------------------------------------------------------------
# The event stream


def test_frames_have_the_exact_wire_format_and_increasing_ids(backend: StubServer) -> None:
    run_id = start_run(backend)

    frames = read_stream(backend, run_id)

    keys = [cursor_key(frame.id or "") for frame in frames]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for frame in frames:
        envelope = frame.envelope
        line = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)
        assert frame.raw == f"id: {frame.id}\nevent: {frame.event}\ndata: {line}\n\n".encode()
        assert envelope["id"] == frame.id
        assert envelope["type"] == frame.event
        assert envelope["run_id"] == run_id
        assert ISO_UTC.match(envelope["created_at"])
        assert ("agent_message_delta" in envelope) == (frame.event == "pydantic_ai_event")
    assert frames[0].event == "run_started"
    assert frames[-1].event == "run_succeeded"


def test_event_sequence_streams_the_answer_after_a_thinking_part(backend: StubServer) -> None:
    events = events_of(read_stream(backend, start_run(backend, "hi")))

    kinds = [e["data"].get("event_kind") for e in events[1:-1]]
    assert kinds == ["part_start", "part_start", "final_result"] + ["part_delta"] * 4 + ["part_end"]
    thinking = events[1]
    assert thinking["data"]["part"] == {"part_kind": "thinking", "content": "Thinking about it."}
    assert thinking["agent_message_delta"] is None
    assert events[2]["data"] == {
        "index": 1,
        "part": {"part_kind": "text", "content": "[turn"},
        "event_kind": "part_start",
    }
    assert [e["agent_message_delta"] for e in events[2:-2]] == [
        "[turn", None, " 1]", " You", " said:", " hi."
    ]
    assert events[-2]["data"]["part"]["content"] == "[turn 1] You said: hi."
    assert events[-2]["agent_message_delta"] is None
    result = events[-1]["data"]
    assert answer_deltas(events) == result["output"] == "[turn 1] You said: hi."
    usage = result["usage"]
    assert usage["currency"] == "USD"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    prices = ("prompt_price", "completion_price", "total_price")
    assert all(isinstance(usage[price], str) for price in prices)


def test_answer_is_padded_to_the_requested_token_count(backend: StubServer) -> None:
    register(backend, "msg-1", answer_tokens=8)

    events = events_of(read_stream(backend, start_run(backend, "hi")))

    deltas = [e["agent_message_delta"] for e in events if e.get("agent_message_delta")]
    assert len(deltas) == 8
    assert events[-1]["data"]["output"] == "[turn 1] You said: hi. lorem ipsum dolor"


def test_replays_from_an_after_cursor(backend: StubServer) -> None:
    run_id = start_run(backend)
    frames = read_stream(backend, run_id)

    replay = read_stream(backend, run_id, after=frames[3].id)

    assert [frame.raw for frame in replay] == [frame.raw for frame in frames[4:]]
    assert read_stream(backend, run_id, after="0-0") == frames


def test_replays_from_last_event_id_then_follows_live(backend: StubServer) -> None:
    register(backend, "msg-1", token_delay=0.05, answer_tokens=12)
    run_id = start_run(backend)
    with open_stream(backend, run_id) as response:
        frames = iter_frames(response)
        seen = [next(frames) for _ in range(3)]

    assert run_status(backend, run_id)["status"] == "running"
    rest = read_stream(backend, run_id, last_event_id=seen[-1].id, after="0-0")

    assert rest[0].envelope["id"] != seen[-1].id
    assert rest[-1].event == "run_succeeded"
    full = read_stream(backend, run_id)
    assert [f.raw for f in seen + rest] == [f.raw for f in full]


def test_idle_stream_carries_keepalive_comments(chatty_backend: StubServer) -> None:
    register(chatty_backend, "slow", token_delay=0.3)
    run_id = start_run(chatty_backend, message_id="slow")

    keepalives = 0
    with open_stream(chatty_backend, run_id) as response:
        for frame in iter_frames(response):
            if frame.comment is not None:
                assert frame.raw == b": keepalive\n\n"
                keepalives += 1
            if keepalives >= 2:
                break
    requests.post(f"{chatty_backend.url}/runs/{run_id}/cancel", json={}, timeout=TIMEOUT)
    assert keepalives == 2


def test_unknown_run_answers_404_everywhere(backend: StubServer) -> None:
    base = f"{backend.url}/runs/0123456789abcdef"
    answers = [
        requests.get(base, timeout=TIMEOUT),
        requests.post(f"{base}/cancel", json={}, timeout=TIMEOUT),
        requests.get(f"{base}/events", timeout=TIMEOUT),
        requests.get(f"{base}/events/sse", timeout=TIMEOUT),
    ]

    assert [a.status_code for a in answers] == [404] * 4
    assert all(a.json()["detail"] for a in answers)


def test_event_page_pages_through_the_log_with_next_cursor(backend: StubServer) -> None:
    run_id = start_run(backend)
    streamed = events_of(read_stream(backend, run_id))
    url = f"{backend.url}/runs/{run_id}/events"

    first = requests.get(url, params={"limit": 3}, timeout=TIMEOUT).json()
    rest = requests.get(
        url, params={"after": first["next_cursor"], "limit": 500}, timeout=TIMEOUT
    ).json()
    empty = requests.get(url, params={"after": rest["next_cursor"]}, timeout=TIMEOUT).json()

    assert first["run_id"] == run_id
    assert first["next_cursor"] == first["events"][2]["id"]
    assert first["events"] + rest["events"] == streamed
    assert empty == {"run_id": run_id, "events": [], "next_cursor": rest["next_cursor"]}
    for bad in ({"limit": 0}, {"limit": 501}, {"limit": "x"}, {"after": "yesterday"}):
        assert requests.get(url, params=bad, timeout=TIMEOUT).status_code == 422


# --------------------------------------------------------------------------------------------
# Faults and overrides


def test_drop_fault_breaks_the_chunked_response(backend: StubServer) -> None:
    register(backend, "msg-1", stream=[{"drop_after": 3}])
    run_id = start_run(backend)
    received: list[Frame] = []

    with open_stream(backend, run_id) as response, pytest.raises(
        (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)
    ):
        for frame in iter_frames(response):
            received.append(frame)

    assert len(received) == 3
    resumed = read_stream(backend, run_id, last_event_id=received[-1].id)
    assert resumed[-1].event == "run_succeeded"
    assert [f.raw for f in received + resumed] == [f.raw for f in read_stream(backend, run_id)]


def test_stall_fault_goes_silent_then_closes(chatty_backend: StubServer) -> None:
    register(chatty_backend, "stall", stream=[{"stall_after": 2, "stall_seconds": 0.5}])
    run_id = start_run(chatty_backend, message_id="stall")
    arrivals: list[tuple[float, Frame]] = []

    started = time.monotonic()
    with open_stream(chatty_backend, run_id) as response:
        for frame in iter_frames(response):
            arrivals.append((time.monotonic() - started, frame))
    ended = time.monotonic() - started

    assert [frame.comment for _, frame in arrivals] == [None, None]
    assert ended - arrivals[-1][0] >= 0.45


def test_stall_fault_without_duration_outlasts_the_client_read_timeout(
    chatty_backend: StubServer,
) -> None:
    register(chatty_backend, "stall", stream=[{"stall_after": 1}])
    run_id = start_run(chatty_backend, message_id="stall")
    received: list[Frame] = []

    with open_stream(chatty_backend, run_id, timeout=(5.0, 0.4)) as response, pytest.raises(
        requests.exceptions.ConnectionError
    ):
        for frame in iter_frames(response):
            received.append(frame)

    assert [frame.event for frame in received] == ["run_started"]
    assert read_stream(chatty_backend, run_id)[-1].event == "run_succeeded"


def test_garbage_fault_sends_one_undecodable_frame_then_continues(backend: StubServer) -> None:
    register(backend, "msg-1", stream=[{"garbage_after": 2}])
    run_id = start_run(backend)

    frames = read_stream(backend, run_id)

    clean = read_stream(backend, run_id)
    assert frames[2].raw == (
        f"id: {clean[2].id}\nevent: pydantic_ai_event\ndata: {{this is not json\n\n".encode()
    )
    assert [f.raw for f in frames[:2] + frames[3:]] == [f.raw for f in clean]


def test_create_fault_answers_the_scripted_status_without_creating_a_run(
    backend: StubServer,
) -> None:
    register(backend, "msg-1", create=[{"status": 503}, {"status": 500, "body": {"oops": True}}])

    answers = [create(backend, run_body()) for _ in range(3)]

    assert [a.status_code for a in answers] == [503, 500, 202]
    assert answers[0].json()["detail"]
    assert answers[1].json() == {"oops": True}
    info = requests.get(f"{backend.url}/_stub/messages/msg-1", timeout=TIMEOUT).json()
    assert info == {"create_calls": 3, "runs": [answers[2].json()["run_id"]]}


def test_fail_fault_ends_the_run_with_the_reason_after_n_tokens(backend: StubServer) -> None:
    register(
        backend,
        "msg-1",
        fail={"reason": "InvokeRateLimitError", "error": "rate limited", "after_tokens": 2},
    )
    run_id = start_run(backend)

    events = events_of(read_stream(backend, run_id))

    assert answer_deltas(events) == "[turn 1]"
    assert events[-1]["type"] == "run_failed"
    assert events[-1]["data"] == {"error": "rate limited", "reason": "InvokeRateLimitError"}
    status = run_status(backend, run_id)
    assert (status["status"], status["error"]) == ("failed", "rate limited")


def test_output_override_replaces_output_but_not_the_streamed_tokens(backend: StubServer) -> None:
    register(backend, "msg-1", output={"answer": "structured", "score": 3})

    events = events_of(read_stream(backend, start_run(backend)))

    assert answer_deltas(events) == "[turn 1] You said: hi."
    assert events[-1]["data"]["output"] == {"answer": "structured", "score": 3}


def test_control_api_rejects_an_ambiguous_stream_fault(backend: StubServer) -> None:
    response = requests.post(
        f"{backend.url}/_stub/messages/msg-1",
        json={"stream": [{"drop_after": 1, "garbage_after": 2}]},
        timeout=TIMEOUT,
    )

    assert response.status_code == 422


# --------------------------------------------------------------------------------------------
# Cancelling


def test_cancel_stops_the_producer_and_ends_the_stream(backend: StubServer) -> None:
    register(backend, "msg-1", token_delay=0.2, answer_tokens=50)
    run_id = start_run(backend)

    with open_stream(backend, run_id) as response:
        frames: list[Frame] = []
        for frame in iter_frames(response):
            frames.append(frame)
            if frame.event == "run_started":
                cancel = requests.post(
                    f"{backend.url}/runs/{run_id}/cancel",
                    json={"reason": "user_stop"},
                    timeout=TIMEOUT,
                )

    assert cancel.status_code == 200
    assert cancel.json() == {"run_id": run_id, "status": "cancelled"}
    assert frames[-1].event == "run_cancelled"
    assert frames[-1].envelope["data"] == {"reason": "user_stop", "message": None}
    assert run_status(backend, run_id)["status"] == "cancelled"
    run = backend.app_state.runs[run_id]
    wait_until(lambda: run.task is not None and run.task.done())
    assert run.events[-1].type == "run_cancelled"


def test_cancel_after_the_run_ended_answers_409(backend: StubServer) -> None:
    run_id = start_run(backend)
    read_stream(backend, run_id)

    response = requests.post(f"{backend.url}/runs/{run_id}/cancel", timeout=TIMEOUT)

    assert response.status_code == 409
    assert response.json()["detail"]


# --------------------------------------------------------------------------------------------
# Control API and lifecycle


def test_control_api_lists_runs_with_requests_and_stream_counts(backend: StubServer) -> None:
    body = run_body("first")
    first = create(backend, body).json()["run_id"]
    second = start_run(backend, "second", message_id="msg-2")
    read_stream(backend, first)
    read_stream(backend, first)

    mine = requests.get(
        f"{backend.url}/_stub/runs", params={"message_id": "msg-1"}, timeout=TIMEOUT
    ).json()["runs"]
    everything = requests.get(f"{backend.url}/_stub/runs", timeout=TIMEOUT).json()["runs"]

    assert mine == [
        {
            "run_id": first,
            "message_id": "msg-1",
            "status": "succeeded",
            "request": body,
            "sse_connections": 2,
        }
    ]
    assert [run["run_id"] for run in everything] == [first, second]


def test_reset_forgets_runs_and_registrations(backend: StubServer) -> None:
    run_id = start_run(backend)
    register(backend, "msg-1", create=[{"status": 503}])

    requests.delete(f"{backend.url}/_stub/state", timeout=TIMEOUT).raise_for_status()

    assert requests.get(f"{backend.url}/runs/{run_id}", timeout=TIMEOUT).status_code == 404
    assert requests.get(f"{backend.url}/_stub/runs", timeout=TIMEOUT).json() == {"runs": []}
    assert create(backend, run_body()).status_code == 202


def test_stop_is_bounded_even_with_open_streams() -> None:
    server = StubServer(StubSettings(token_delay=1.0))
    server.start()
    run_id = start_run(server)
    response = open_stream(server, run_id)
    first = next(iter_frames(response))

    started = time.monotonic()
    server.stop()

    assert first.event == "run_started"
    assert time.monotonic() - started < 5.0
    response.close()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{server.url}/_stub/runs", timeout=(1.0, 1.0))


def test_module_runs_as_its_own_process_configured_from_env() -> None:
    env = {**os.environ, "STUB_AUTH_TOKEN": "from-env", "STUB_TOKEN_DELAY": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "stub_backend", "--port", "0"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        url = line.strip().rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:"), line
        body = run_body()

        denied = requests.post(f"{url}/runs", json=body, timeout=TIMEOUT)
        allowed = requests.post(
            f"{url}/runs", json=body, headers={"Authorization": "Bearer from-env"}, timeout=TIMEOUT
        )
        assert denied.status_code == 401
        assert allowed.status_code == 202
    finally:
        process.terminate()
        assert process.wait(timeout=10) in (0, -signal.SIGTERM)
        if process.stdout is not None:
            process.stdout.close()


def test_the_url_it_announces_accepts_connections_at_once() -> None:
    """Scripts and the benchmark connect as soon as they read the line: a socket that is bound
    but not yet listening would refuse them (the benchmark failed that way once)."""
    process = subprocess.Popen([sys.executable, "-m", "stub_backend", "--port", "0"],
                               cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip().rsplit(" ", 1)[-1]

        answer = requests.get(f"{url}/_stub/runs", timeout=TIMEOUT)

        assert answer.status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def test_reset_collects_cyclic_garbage_when_automatic_collection_is_off(
    backend: StubServer,
) -> None:
    """A benchmark's stub runs with the collector off (--no-gc-pauses); the reset between its
    phases is where the garbage of the phase before goes."""
    collected = []

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    weakref.finalize(Cycle(), collected.append, True)
    gc.disable()
    try:
        assert collected == []

        requests.delete(f"{backend.url}/_stub/state", timeout=TIMEOUT).raise_for_status()

        assert collected == [True]
    finally:
        gc.enable()


def test_no_gc_pauses_freezes_start_up_objects_and_stops_automatic_collection() -> None:
    probe = ("import gc; from stub_backend.__main__ import parse_args, stop_collector_pauses; "
             "assert parse_args(['--no-gc-pauses']).no_gc_pauses; "
             "assert not parse_args([]).no_gc_pauses; "
             "stop_collector_pauses(); print(gc.isenabled(), gc.get_freeze_count() > 1000)")

    shown = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True,
                           text=True, timeout=60, check=True)

    assert shown.stdout.split() == ["False", "True"]


def test_a_token_made_late_by_a_busy_loop_does_not_push_back_the_ones_after_it() -> None:
    """Each token is due on the run's own schedule. Pacing by sleeping after every token let one
    slow loop iteration shift the rest of a run, so the runs that iteration held fell into
    lock-step for good and a benchmark's independent streams became bursts."""
    plan = RunPlan(query="q", history=[], tokens=[f"t{i} " for i in range(10)], token_delay=0.02,
                   fail=None, has_output=False, output=None, layer_names=["history"])
    run = Run("run-1", "msg-1", {})

    async def produce_through_a_busy_moment() -> None:
        producer = asyncio.create_task(produce(run, plan))
        await asyncio.sleep(0.03)
        time.sleep(0.05)  # the loop is busy while tokens 2 and 3 fall due
        await asyncio.wait_for(producer, timeout=5)

    asyncio.run(produce_through_a_busy_moment())

    stamps = [event.key[0] for event in run.events if event.envelope.get("agent_message_delta")]
    assert len(stamps) == 10 and run.status == "succeeded"
    # On schedule the last token comes 9 x 20 ms after the first; with every later token
    # pushed back by the busy moment it would come ~40 ms later than that.
    assert 170 <= stamps[-1] - stamps[0] < 200, stamps


# --------------------------------------------------------------------------------------------
# The agent's process: thinking, tool rounds, questions (stub_backend/process.py)

SUBMITTED = {"status": "submitted", "action": {"id": "submit", "label": "Submit"},
             "values": {"answer": "yes"}}


def captured(name: str) -> list[dict[str, Any]]:
    """The events of one stream captured from the reference server."""
    path = FRAMES / name
    if not path.exists():
        pytest.skip(f"the reference captures are not here ({path})")
    return [parse_frame(raw.encode()).envelope
            for raw in path.read_text().strip().split("\n\n")]


def is_text(event: dict[str, Any]) -> bool:
    data = event["data"]
    inner = data.get("part") or data.get("delta") or {}
    return "text" in (inner.get("part_kind"), inner.get("part_delta_kind"))


def normalized(value: Any) -> Any:
    """``value`` with what differs between any two runs (call ids, timestamps) blanked."""
    if isinstance(value, dict):
        return {key: "<id>" if key == "tool_call_id" and item is not None
                else "<ts>" if key == "timestamp" else normalized(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [normalized(item) for item in value]
    return value


def process_of(events: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """Every event but the answer's text parts, as (type, agent_message_delta, data), with ids
    and timestamps blanked: what must equal the reference server's stream."""
    return [(event["type"], event.get("agent_message_delta"), normalized(event["data"]))
            for event in events
            if not is_text(event) and event["type"] not in ("run_succeeded", "run_started")]


def kinds(events: list[dict[str, Any]]) -> list[str]:
    """Each event as ``type:event_kind:part kind`` (``pai`` for a pydantic_ai_event)."""
    shown = []
    for event in events:
        data = event["data"]
        inner = data.get("part") or data.get("delta") or {}
        kind = inner.get("part_kind") or inner.get("part_delta_kind")
        label = "pai" if event["type"] == "pydantic_ai_event" else event["type"]
        shown.append(":".join(str(k) for k in (label, data.get("event_kind"), kind) if k))
    return shown


def answer_kinds(tokens: int) -> list[str]:
    return (["pai:part_start:text", "pai:final_result"] + ["pai:part_delta:text"] * (tokens - 1)
            + ["pai:part_end:text", "run_succeeded"])


def history_of(end: dict[str, Any]) -> list[dict[str, Any]]:
    layer = next(layer for layer in end["session_snapshot"]["layers"]
                 if layer["name"] == "history")
    messages: list[dict[str, Any]] = layer["runtime_state"]["messages"]
    return messages


def run_events(server: StubServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = create(server, body)
    assert response.status_code == 202, response.text
    return events_of(read_stream(server, response.json()["run_id"]))


def resume_body(query: str, asked: dict[str, Any], result: Any,
                layers: tuple[str, ...] = ASK_LAYER_NAMES,
                message_id: str = "msg-1") -> dict[str, Any]:
    """The run that answers the question ``asked`` (a run_succeeded's data) with ``result``."""
    body = run_body(query, snapshot=asked["session_snapshot"], layers=layers,
                    message_id=message_id)
    call_id = asked["deferred_tool_call"]["tool_call_id"]
    body["deferred_tool_results"] = {"calls": {call_id: result}, "metadata": {}}
    return body


def assert_answer_is_the_only_text(events: list[dict[str, Any]]) -> None:
    """Only text parts carry answer text, and it joins to the output."""
    for event in events:
        if event["type"] != "pydantic_ai_event":
            continue
        kind = event["data"].get("event_kind")
        carries_text = is_text(event) and kind in ("part_start", "part_delta")
        assert (event["agent_message_delta"] is not None) == carries_text, event
    assert answer_deltas(events) == events[-1]["data"]["output"]


def test_think_in_the_query_streams_the_captured_thought_before_the_answer(
        backend: StubServer) -> None:
    events = events_of(read_stream(backend, start_run(backend, "THINK first")))

    reference = captured("thinking.sse")
    assert process_of(events) == process_of(reference)
    assert kinds(events) == [
        "run_started", "pai:part_start:thinking", *["pai:part_delta:thinking"] * 3,
        "pai:part_end:thinking", *answer_kinds(6)]
    assert events[5]["data"]["part"]["content"] == "\nCounting user messages: 1.\n"
    assert {event["data"]["index"] for event in events if is_text(event)} == {1}
    assert events[-1]["data"]["output"] == "[turn 1] You said: THINK first."
    assert_answer_is_the_only_text(events)
    assert history_of(events[-1]["data"])[1] == {
        "role": "thinking", "content": "\nCounting user messages: 1.\n"}


def test_a_refused_tool_round_streams_as_captured_then_the_usual_answer(
        backend: StubServer) -> None:
    events = events_of(read_stream(backend, start_run(backend, "CALL_TOOL:lookup please")))

    assert process_of(events) == process_of(captured("tool_unknown.sse"))
    assert kinds(events) == [
        "run_started", "pai:part_start:tool-call", "pai:part_end:tool-call",
        "pai:function_tool_call:tool-call", "pai:function_tool_result:retry-prompt",
        *answer_kinds(6)]
    assert events[3]["data"]["args_valid"] is False
    assert events[4]["data"]["part"]["content"] == \
        "Unknown tool name: 'lookup'. No tools available."
    call_ids = {event["data"]["part"]["tool_call_id"] for event in events[1:5]}
    assert call_ids == {f"call_{events[0]['run_id'][:8]}_1"}
    assert {event["data"]["index"] for event in events if is_text(event)} == {0}
    assert events[-1]["data"]["output"] == "[turn 1] You said: CALL_TOOL:lookup please."
    assert_answer_is_the_only_text(events)


def test_several_tool_rounds_follow_one_another_in_order_then_the_answer(
        backend: StubServer) -> None:
    register(backend, "msg-1", process=[
        {"thinking": "I should look it up."},
        {"tool": "lookup", "args": {"city": "Zürich"}, "result": {"temp": 21}},
        {"tool": "search", "args": {}, "refused": "Unknown tool name: 'search'."},
        {"thinking": ["\n", "Done."]},
    ])

    events = events_of(read_stream(backend, start_run(backend, "weather?")))

    assert kinds(events) == [
        "run_started", "pai:part_start:thinking", *["pai:part_delta:thinking"] * 4,
        "pai:part_end:thinking",
        "pai:part_start:tool-call", "pai:part_end:tool-call",
        "pai:function_tool_call:tool-call", "pai:function_tool_result:tool-return",
        "pai:part_start:tool-call", "pai:part_end:tool-call",
        "pai:function_tool_call:tool-call", "pai:function_tool_result:retry-prompt",
        "pai:part_start:thinking", "pai:part_delta:thinking", "pai:part_end:thinking",
        *answer_kinds(5)]
    data = [event["data"] for event in events]
    prefix = f"call_{events[0]['run_id'][:8]}"
    assert [d["delta"]["content_delta"] for d in data[2:6]] == [" should", " look", " it", " up."]
    assert (data[1]["part"]["content"], data[6]["part"]["content"]) == (
        "I", "I should look it up.")
    assert (data[6]["next_part_kind"], data[7]["previous_part_kind"]) == ("tool-call", "thinking")
    assert data[7]["part"] == {
        "tool_name": "lookup", "args": '{"city": "Z\\u00fcrich"}', "tool_call_id": f"{prefix}_1",
        "tool_kind": None, "id": None, "provider_name": "DifyPlugin/langgenius/openai",
        "provider_details": None, "part_kind": "tool-call"}
    assert (data[7]["index"], data[11]["index"], data[15]["index"]) == (1, 0, 0)
    assert (data[9]["args_valid"], data[13]["args_valid"]) == (True, False)
    assert (data[10]["part"]["content"], data[10]["part"]["outcome"]) == ({"temp": 21}, "success")
    assert data[14]["part"]["content"] == "Unknown tool name: 'search'."
    assert data[14]["part"]["tool_call_id"] == f"{prefix}_2"
    assert (data[15]["previous_part_kind"], data[17]["part"]["content"]) == (None, "\nDone.")
    assert {d["index"] for e, d in zip(events, data, strict=True) if is_text(e)} == {1}
    assert events[-1]["data"]["output"] == "[turn 1] You said: weather?."
    assert_answer_is_the_only_text(events)
    assert [message["role"] for message in history_of(events[-1]["data"])] == [
        "user", "thinking", "tool_call", "tool_return", "tool_call", "retry_prompt",
        "thinking", "assistant"]


def test_thought_chunks_are_paced_like_answer_tokens(backend: StubServer) -> None:
    register(backend, "msg-1", token_delay=0.03, process=[{"thinking": ["a", " b", " c"]}])

    events = events_of(read_stream(backend, start_run(backend, "hi")))

    paced = [cursor_key(event["id"])[0] for event in events
             if event["data"].get("event_kind") in ("part_start", "part_delta")]
    assert len(paced) == 3 + 5
    # Eight paced events 30 ms apart on the run's own clock span seven intervals (with only
    # the answer paced, the span would be four); six leave room for a late first chunk.
    assert paced[-1] - paced[0] >= 6 * 30, paced


def test_an_empty_process_drops_the_default_thought_and_null_restores_the_query_triggers(
        backend: StubServer) -> None:
    register(backend, "msg-1", process=[])
    plain = events_of(read_stream(backend, start_run(backend, "THINK")))
    register(backend, "msg-1", process=None)
    thinking = events_of(read_stream(backend, start_run(backend, "THINK")))

    assert kinds(plain) == ["run_started", *answer_kinds(5)]
    assert plain[1]["data"]["index"] == 0
    assert kinds(thinking)[1] == "pai:part_start:thinking"
    assert thinking[1]["data"]["part"]["content"] == "\n"


@pytest.mark.parametrize("layers", [ASK_LAYER_NAMES, LAYER_NAMES])
def test_ask_human_defers_the_call_as_captured_and_remembers_it_in_the_snapshot(
        backend: StubServer, layers: tuple[str, ...]) -> None:
    query = "CALL_TOOL:ask_human when ready"
    events = run_events(backend, run_body(query, layers=layers))

    reference = captured("ask_human.sse")
    assert process_of(events) == process_of(reference)
    assert kinds(events) == [
        "run_started", "pai:part_start:tool-call", "pai:final_result",
        "pai:part_end:tool-call", "pai:function_tool_call:tool-call", "run_succeeded"]
    end = events[-1]["data"]
    assert sorted(end) == sorted(reference[-1]["data"]) == [
        "deferred_tool_call", "session_snapshot", "usage"]
    call = end["deferred_tool_call"]
    assert normalized(call) == normalized(reference[-1]["data"]["deferred_tool_call"])
    assert call["tool_call_id"] == events[1]["data"]["part"]["tool_call_id"]
    assert [layer["name"] for layer in end["session_snapshot"]["layers"]] == list(layers)
    assert history_of(end) == [
        {"role": "user", "content": query},
        {"role": "tool_call", "tool_call_id": call["tool_call_id"], "tool_name": "ask_human",
         "args": events[1]["data"]["part"]["args"]}]
    assert answer_deltas(events) == ""


def test_a_resumed_run_returns_the_submitted_result_and_answers_with_it(
        backend: StubServer) -> None:
    query = "CALL_TOOL:ask_human when ready"
    asked = run_events(backend, run_body(query, layers=ASK_LAYER_NAMES))[-1]["data"]

    events = run_events(backend, resume_body(query, asked, SUBMITTED))

    reference = captured("ask_human_resumed.sse")
    assert process_of(events) == process_of(reference)
    assert kinds(events) == [
        "run_started", "pai:function_tool_call:tool-call",
        "pai:function_tool_result:tool-return", *answer_kinds(4)]
    call_id = asked["deferred_tool_call"]["tool_call_id"]
    assert events[1]["data"]["args_valid"] is None
    assert events[2]["data"]["part"]["tool_call_id"] == call_id
    assert events[2]["data"]["part"]["content"] == SUBMITTED
    end = events[-1]["data"]
    assert end["output"] == reference[-1]["data"]["output"] == (
        'Tool ask_human said: {"status":"submitted","action":{"id":"submit","label":"Submit"},'
        '"values":{"answer":"yes"}}')
    assert_answer_is_the_only_text(events)
    assert [message["role"] for message in history_of(end)] == [
        "user", "tool_call", "tool_return", "assistant"]
    next_turn = run_events(backend, run_body("THINK again", snapshot=end["session_snapshot"],
                                             layers=ASK_LAYER_NAMES))
    assert next_turn[-1]["data"]["output"] == "[turn 2] You said: THINK again."
    assert next_turn[5]["data"]["part"]["content"] == "\nCounting user messages: 2.\n"


def test_a_planned_question_offers_what_the_plan_says_and_the_resumed_run_goes_on(
        backend: StubServer) -> None:
    question = {"title": "Ship it?", "question": "Deploy to production?", "markdown": "**now**",
                "fields": [{"name": "note", "label": "Note", "type": "paragraph"}],
                "actions": [{"id": "approve", "label": "Approve", "style": "primary"},
                            {"id": "reject", "label": "Reject", "style": "destructive"}],
                "urgency": "high"}
    register(backend, "msg-1", process=[
        {"thinking": "Ask first."},
        {"ask_human": question, "tool_call_id": "call_deploy"},
        {"tool": "deploy", "args": {"env": "prod"}, "result": "deployed"},
    ])
    first = run_events(backend, run_body("deploy", layers=ASK_LAYER_NAMES))
    answer = {"status": "submitted", "action": {"id": "approve", "label": "Approve"},
              "values": {"note": "go"}}

    resumed = run_events(backend, resume_body("deploy", first[-1]["data"], answer))

    assert kinds(first) == [
        "run_started", "pai:part_start:thinking", "pai:part_delta:thinking",
        "pai:part_end:thinking", "pai:part_start:tool-call", "pai:final_result",
        "pai:part_end:tool-call", "pai:function_tool_call:tool-call", "run_succeeded"]
    assert (first[4]["data"]["index"], first[4]["data"]["previous_part_kind"]) == (1, "thinking")
    assert json.loads(first[4]["data"]["part"]["args"]) == question
    assert first[-1]["data"]["deferred_tool_call"] == {
        "tool_call_id": "call_deploy", "tool_name": "ask_human", "args": question,
        "metadata": {"layer_type": "dify.ask_human", "tool_name": "ask_human",
                     "schema_version": 1}}
    assert kinds(resumed) == [
        "run_started", "pai:function_tool_call:tool-call",
        "pai:function_tool_result:tool-return", "pai:part_start:tool-call",
        "pai:part_end:tool-call", "pai:function_tool_call:tool-call",
        "pai:function_tool_result:tool-return", *answer_kinds(4)]
    assert resumed[2]["data"]["part"]["content"] == answer
    assert resumed[3]["data"]["part"]["tool_name"] == "deploy"
    assert resumed[-1]["data"]["output"] == "Tool ask_human said: " + json.dumps(
        answer, separators=(",", ":"))
    assert_answer_is_the_only_text(resumed)


def test_a_question_without_actions_offers_submit_as_the_reference_server_does(
        backend: StubServer) -> None:
    register(backend, "msg-1", process=[{"ask_human": {"question": "Sure?"}}])

    end = run_events(backend, run_body("hi"))[-1]["data"]

    assert end["deferred_tool_call"]["args"] == {
        "title": None, "question": "Sure?", "markdown": None, "fields": [],
        "actions": [{"id": "submit", "label": "Submit", "style": "primary"}],
        "urgency": "normal"}


def test_a_turn_can_ask_twice_and_each_answer_resumes_it(backend: StubServer) -> None:
    register(backend, "msg-1", process=[{"ask_human": {"question": "First?"}},
                                        {"ask_human": {"question": "Second?"}}])
    first = run_events(backend, run_body("two questions"))[-1]["data"]
    second_events = run_events(backend, resume_body("two questions", first, SUBMITTED,
                                                    layers=LAYER_NAMES))
    second = second_events[-1]["data"]
    done = run_events(backend, resume_body("two questions", second,
                                           {"status": "timeout"}, layers=LAYER_NAMES))

    assert first["deferred_tool_call"]["args"]["question"] == "First?"
    assert second["deferred_tool_call"]["args"]["question"] == "Second?"
    assert second["deferred_tool_call"]["tool_call_id"] != first["deferred_tool_call"][
        "tool_call_id"]
    assert kinds(second_events)[1:3] == ["pai:function_tool_call:tool-call",
                                         "pai:function_tool_result:tool-return"]
    assert done[-1]["data"]["output"] == 'Tool ask_human said: {"status":"timeout"}'
    assert [m["role"] for m in history_of(done[-1]["data"])] == [
        "user", "tool_call", "tool_return", "tool_call", "tool_return", "assistant"]


def test_a_failing_run_that_asks_fails_in_place_of_its_question(backend: StubServer) -> None:
    register(backend, "msg-1", fail={"reason": "InvokeRateLimitError", "error": "slow down"})

    events = events_of(read_stream(backend, start_run(backend, "CALL_TOOL:ask_human now")))

    assert kinds(events)[-2:] == ["pai:function_tool_call:tool-call", "run_failed"]
    assert events[-1]["data"] == {"error": "slow down", "reason": "InvokeRateLimitError"}


@pytest.mark.parametrize(
    ("case", "change"),
    [
        ("unknown tool_call_id",
         lambda body: body["deferred_tool_results"].update(calls={"call_unknown": SUBMITTED})),
        ("a result too many",
         lambda body: body["deferred_tool_results"]["calls"].update(call_other=SUBMITTED)),
        ("no result for the pending call",
         lambda body: body["deferred_tool_results"].update(calls={})),
        ("no deferred_tool_results at all", lambda body: body.update(deferred_tool_results=None)),
        ("results without a snapshot", lambda body: body.update(
            session_snapshot=None, composition=composition("x", ASK_LAYER_NAMES))),
        ("a status the layer does not know",
         lambda body: next(iter(body["deferred_tool_results"]["calls"].values())).update(
             status="maybe")),
        ("an unknown field in the result",
         lambda body: next(iter(body["deferred_tool_results"]["calls"].values())).update(
             colour="red")),
        ("an action without a label",
         lambda body: next(iter(body["deferred_tool_results"]["calls"].values())).update(
             action={"id": "submit"})),
        ("metadata that is not per call", lambda body: body["deferred_tool_results"].update(
            metadata={"call": "flat"})),
    ],
)
def test_deferred_results_that_do_not_answer_the_pending_call_are_refused_with_422(
        backend: StubServer, case: str, change: Callable[[dict[str, Any]], None]) -> None:
    asked = run_events(backend, run_body("CALL_TOOL:ask_human ok", layers=ASK_LAYER_NAMES))
    body = resume_body("CALL_TOOL:ask_human ok", asked[-1]["data"], dict(SUBMITTED))
    change(body)

    response = create(backend, body)

    assert response.status_code == 422, case
    assert response.json()["detail"]
    assert len(backend.app_state.describe_runs()) == 1, "no run was started"


def test_a_result_for_a_call_already_answered_is_refused_with_422(backend: StubServer) -> None:
    asked = run_events(backend, run_body("CALL_TOOL:ask_human ok", layers=ASK_LAYER_NAMES))
    body = resume_body("CALL_TOOL:ask_human ok", asked[-1]["data"], SUBMITTED)
    answered = run_events(backend, body)[-1]["data"]
    body["session_snapshot"] = answered["session_snapshot"]

    response = create(backend, body)

    assert response.status_code == 422
    assert "not waiting for" in json.dumps(response.json()["detail"])


@pytest.mark.parametrize(
    "step",
    [
        {"think": "typo"},
        {"thinking": ""},
        {"thinking": []},
        {"thinking": "x", "extra": 1},
        {"tool": "lookup"},
        {"tool": "lookup", "result": 1, "refused": "no"},
        {"tool": "lookup", "result": 1, "colour": "red"},
        {"tool": "ask_human", "result": 1},
        {"ask_human": {"question": "q", "colour": "red"}},
        {"ask_human": {"question": " "}},
        {"ask_human": {"question": "q", "urgency": "whenever"}},
        {"ask_human": {"question": "q", "actions": [{"id": "not an id", "label": "x"}]}},
        {"ask_human": {"question": "q", "actions": [{"id": "a", "label": "A"},
                                                    {"id": "a", "label": "B"}]}},
        {"ask_human": {"question": "q"}, "extra": 1},
    ],
)
def test_control_api_rejects_a_process_step_it_does_not_know(
        backend: StubServer, step: dict[str, Any]) -> None:
    response = requests.post(f"{backend.url}/_stub/messages/msg-1",
                             json={"process": [step]}, timeout=TIMEOUT)

    assert response.status_code == 422, step
    assert response.json()["detail"]
