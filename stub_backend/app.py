"""A deterministic, in-memory stand-in for the dify-agent run API.

The worker under test talks to the agent backend only over HTTP, so the stub is a real ASGI app
that speaks the wire contract of ``/work/shared/agent-protocol.md``: strict request validation,
Redis-stream-like cursors, an SSE stream that replays and then follows, and run producers that
live independently of any client connection (a worker that reconnects must find the events it
missed). Answers are derived from the session snapshot sent with each run, so multi-turn
continuity bugs in the worker show up as wrong turn numbers in the answer text.

Run API (bearer token required only when ``auth_token`` is set):

- ``POST /runs`` -> 202 ``{"run_id", "status"}``; 422 invalid body; 503 while shutting down.
  A repeated ``idempotency_key`` answers 202 with the existing run's id and current status.
- ``GET /runs/{id}``, ``POST /runs/{id}/cancel`` (409 once ended),
  ``GET /runs/{id}/events?after=&limit=`` (``next_cursor`` is the last returned id, or the
  ``after`` cursor when the page is empty, so a poller can always pass it back),
  ``GET /runs/{id}/events/sse?after=`` (a ``Last-Event-ID`` header wins over ``after``, as a
  reconnecting EventSource keeps its original URL).

Control API (no auth), because the worker runs in another process and the test only knows the
message it enqueued, faults and overrides are keyed by ``metadata.message_id``:

- ``POST /_stub/messages/{message_id}`` registers ``create``/``stream`` fault lists, ``fail``,
  ``output``, ``token_delay``, ``answer_tokens``; keys given replace earlier values. Create
  faults are consumed before the body is validated, stream faults one per SSE connection.
- ``GET /_stub/messages/{message_id}`` -> ``{"create_calls", "runs"}``;
  ``GET /_stub/runs[?message_id=]`` -> ``{"runs": [...]}`` in creation order;
  ``DELETE /_stub/state`` forgets everything (open streams of forgotten runs end), and collects
  cyclic garbage when automatic collection is off (``python -m stub_backend --no-gc-pauses``).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from stub_backend import process

__all__ = [
    "CreateRunRequest",
    "StubSettings",
    "StubState",
    "create_app",
]

TERMINAL_EVENT_TYPES = frozenset({"run_succeeded", "run_failed", "run_cancelled"})
PAD_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
THINKING_TEXT = "Thinking about it."
DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 500
_CURSOR_RE = re.compile(r"^(\d+)-(\d+)$")
_TOKEN_RE = re.compile(r"\s*\S+")


# --------------------------------------------------------------------------------------------
# Settings


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return default if raw in (None, "") else float(raw)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if raw in (None, "") else int(raw)


@dataclass(frozen=True)
class StubSettings:
    """Knobs of the stub; per-message overrides registered via ``/_stub/`` take precedence.

    ``token_delay`` paces the answer so tests and benchmarks can observe streaming (and cancel
    mid-run); ``answer_tokens`` pads answers to a fixed length for load tests;
    ``keepalive_interval`` is small in tests so idle-stream handling can be exercised quickly.
    """

    token_delay: float = 0.02
    answer_tokens: int = 0
    keepalive_interval: float = 15.0
    auth_token: str | None = None

    def __post_init__(self) -> None:
        if self.token_delay < 0:
            raise ValueError("token_delay must be >= 0")
        if self.answer_tokens < 0:
            raise ValueError("answer_tokens must be >= 0")
        if self.keepalive_interval <= 0:
            raise ValueError("keepalive_interval must be > 0 (it paces the keepalive frames)")

    @classmethod
    def from_env(cls) -> StubSettings:
        """Read ``STUB_TOKEN_DELAY``, ``STUB_ANSWER_TOKENS``, ``STUB_KEEPALIVE_INTERVAL`` and
        ``STUB_AUTH_TOKEN``, so a stub started as its own process can be configured by the
        script that launches it."""
        return cls(
            token_delay=_env_float("STUB_TOKEN_DELAY", cls.token_delay),
            answer_tokens=_env_int("STUB_ANSWER_TOKENS", cls.answer_tokens),
            keepalive_interval=_env_float("STUB_KEEPALIVE_INTERVAL", cls.keepalive_interval),
            auth_token=os.environ.get("STUB_AUTH_TOKEN") or None,
        )


# --------------------------------------------------------------------------------------------
# Wire models (strict, like the real server: unknown fields are a client bug worth surfacing)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LayerSpec(_Strict):
    """One layer of a composition."""

    name: str = Field(min_length=1)
    type: str = Field(min_length=1)
    deps: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    config: Any = None


class Composition(_Strict):
    """The layers a run is built from; names are the composition's logical identity."""

    schema_version: int = 1
    layers: list[LayerSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_unique_and_deps_resolvable(self) -> Composition:
        names = [layer.name for layer in self.layers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate layer names: {duplicates}")
        known = set(names)
        for layer in self.layers:
            for dep_key, target in layer.deps.items():
                if target == layer.name or target not in known:
                    raise ValueError(
                        f"layer {layer.name!r}: dep {dep_key!r} names {target!r}, "
                        "which is not another layer of the composition"
                    )
        return self


class DeferredToolResults(_Strict):
    """Results of tool calls a previous run deferred to the caller."""

    calls: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


class OnExit(_Strict):
    """What the server does with each layer when the run ends."""

    default: str = "suspend"
    layers: dict[str, str] = Field(default_factory=dict)


class CreateRunRequest(_Strict):
    """Body of ``POST /runs``."""

    composition: Composition
    session_snapshot: dict[str, Any] | None = None
    idempotency_key: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    deferred_tool_results: DeferredToolResults | None = None
    on_exit: OnExit = Field(default_factory=OnExit)

    @model_validator(mode="after")
    def _snapshot_matches_composition(self) -> CreateRunRequest:
        if self.session_snapshot is None:
            return self
        layers = self.session_snapshot.get("layers")
        if not isinstance(layers, list) or not all(
            isinstance(layer, dict) and isinstance(layer.get("name"), str) for layer in layers
        ):
            raise ValueError("session_snapshot.layers must be a list of objects with a name")
        snapshot_names = [layer["name"] for layer in layers]
        composition_names = [layer.name for layer in self.composition.layers]
        if snapshot_names != composition_names:
            raise ValueError(
                f"session_snapshot layers {snapshot_names} do not match the composition's "
                f"layers {composition_names}"
            )
        return self


class CancelRequest(_Strict):
    """Body of ``POST /runs/{run_id}/cancel``."""

    reason: str | None = None
    message: str | None = None


class CreateFault(_Strict):
    """One scripted answer to ``POST /runs``."""

    status: int = Field(ge=100, le=599)
    body: Any = None


class StreamFault(_Strict):
    """One scripted misbehaviour of an SSE connection; exactly one ``*_after`` is given."""

    drop_after: int | None = Field(default=None, ge=0)
    stall_after: int | None = Field(default=None, ge=0)
    stall_seconds: float | None = Field(default=None, ge=0)
    garbage_after: int | None = Field(default=None, ge=0)
    # Send ``frame`` (raw text, sent as is) after K frames, then go on normally: lets a test
    # put any malformed or hostile frame on the wire.
    inject_after: int | None = Field(default=None, ge=0)
    frame: str | None = None

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> StreamFault:
        kinds = [self.drop_after, self.stall_after, self.garbage_after, self.inject_after]
        if sum(kind is not None for kind in kinds) != 1:
            raise ValueError(
                "give exactly one of drop_after, stall_after, garbage_after, inject_after")
        if self.stall_seconds is not None and self.stall_after is None:
            raise ValueError("stall_seconds only goes with stall_after")
        if (self.frame is None) != (self.inject_after is None):
            raise ValueError("frame and inject_after go together")
        return self


class FailSpec(_Strict):
    """Make runs end with ``run_failed`` after some answer tokens."""

    reason: str | None = None
    error: str = "injected failure"
    after_tokens: int = Field(default=0, ge=0)
    # How many runs of the message fail; None: every one. Lets a test see a retry succeed.
    times: int | None = Field(default=None, ge=1)


class MessageControl(_Strict):
    """Body of ``POST /_stub/messages/{message_id}``; keys given replace earlier values."""

    create: list[CreateFault] | None = None
    stream: list[StreamFault] | None = None
    fail: FailSpec | None = None
    output: Any = None
    token_delay: float | None = Field(default=None, ge=0)
    answer_tokens: int | None = Field(default=None, ge=0)


def _validation_detail(exc: ValidationError) -> list[Any]:
    # exc.json() knows how to serialise the error contexts (which may hold exception objects).
    detail: list[Any] = json.loads(exc.json(include_url=False))
    return detail


# --------------------------------------------------------------------------------------------
# Runs and their event logs


def _utc_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_cursor(raw: str) -> tuple[int, int]:
    """Turn ``"<ms>-<n>"`` into a comparable key; ``ValueError`` on anything else."""
    match = _CURSOR_RE.match(raw.strip())
    if not match:
        raise ValueError(f"invalid cursor {raw!r}: expected '<ms>-<n>'")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class StoredEvent:
    """One event of a run's log; the SSE frame is rendered once, since many streams send it."""

    key: tuple[int, int]
    cursor: str
    type: str
    envelope: dict[str, Any]
    frame: bytes


@dataclass
class Registration:
    """Faults and overrides registered for one message id."""

    create: deque[CreateFault] = field(default_factory=deque)
    stream: deque[StreamFault] = field(default_factory=deque)
    fail: FailSpec | None = None
    has_output: bool = False
    output: Any = None
    token_delay: float | None = None
    answer_tokens: int | None = None

    def take_fail(self) -> FailSpec | None:
        """The failure the next run gets, counting down a limited ``times``."""
        fail = self.fail
        if fail is not None and fail.times is not None:
            remaining = fail.times - 1
            self.fail = fail.model_copy(update={"times": remaining}) if remaining else None
        return fail

    def update(self, body: MessageControl) -> None:
        given = body.model_fields_set
        if "create" in given:
            self.create = deque(body.create or [])
        if "stream" in given:
            self.stream = deque(body.stream or [])
        if "fail" in given:
            self.fail = body.fail
        if "output" in given:
            self.has_output = True
            self.output = body.output
        if "token_delay" in given:
            self.token_delay = body.token_delay
        if "answer_tokens" in given:
            self.answer_tokens = body.answer_tokens


@dataclass(frozen=True)
class RunPlan:
    """Everything a producer needs, fixed at create time so later registrations don't race."""

    query: str
    history: list[dict[str, Any]]
    tokens: list[str]
    token_delay: float
    fail: FailSpec | None
    has_output: bool
    output: Any
    layer_names: list[str]
    # The agent's process (stub_backend/process.py), chosen by the query or a resumed call.
    think: bool = False
    refused_tool: bool = False
    ask: bool = False
    resume: dict[str, Any] | None = None


class Run:
    """A run: status, an append-only event log, and a wake-up signal for its followers.

    Followers wait on ``changed``; every append sets it and installs a fresh one, so a
    thousand idle streams cost a thousand pending waits and no polling.
    """

    def __init__(self, run_id: str, message_id: str | None, request: Any) -> None:
        now = time.time()
        self.run_id = run_id
        self.message_id = message_id
        self.request = request
        self.status = "running"
        self.error: str | None = None
        self.created_at = _utc_iso(now)
        self.updated_at = self.created_at
        self.events: list[StoredEvent] = []
        self.sse_connections = 0
        self.discarded = False
        self.task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()
        self._last_ms = -1
        self._seq = 0

    @property
    def ended(self) -> bool:
        return self.status != "running"

    def _next_key(self) -> tuple[int, int]:
        ms = time.time_ns() // 1_000_000
        if ms <= self._last_ms:
            self._seq += 1
        else:
            self._last_ms, self._seq = ms, 0
        return self._last_ms, self._seq

    def append(self, type_: str, data: Any, *, delta: str | None = None) -> StoredEvent | None:
        """Add an event (ignored once the run ended, so a late producer step is harmless)."""
        if self.ended or self.discarded:
            return None
        key = self._next_key()
        cursor = f"{key[0]}-{key[1]}"
        now = time.time()
        envelope: dict[str, Any] = {
            "id": cursor,
            "run_id": self.run_id,
            "type": type_,
            "data": data,
            "created_at": _utc_iso(now),
        }
        if type_ == "pydantic_ai_event":
            envelope["agent_message_delta"] = delta
        line = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)
        frame = f"id: {cursor}\nevent: {type_}\ndata: {line}\n\n".encode()
        event = StoredEvent(key=key, cursor=cursor, type=type_, envelope=envelope, frame=frame)
        self.events.append(event)
        self.updated_at = _utc_iso(now)
        if type_ == "run_succeeded":
            self.status = "succeeded"
        elif type_ == "run_failed":
            self.status = "failed"
            self.error = data.get("error") if isinstance(data, dict) else None
        elif type_ == "run_cancelled":
            self.status = "cancelled"
        self.notify()
        return event

    def notify(self) -> None:
        """Wake every follower waiting on this run."""
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def index_after(self, key: tuple[int, int]) -> int:
        """Position of the first event whose cursor is greater than ``key``."""
        return bisect.bisect_right(self.events, key, key=lambda event: event.key)

    def status_body(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "error": self.error,
        }


class StubState:
    """All runs and registrations of one app; lives on the server's event loop.

    Another thread (a test in the same process) may read it through the ``describe_*``
    helpers, which copy what they return.
    """

    def __init__(self, settings: StubSettings) -> None:
        self.settings = settings
        self.runs: dict[str, Run] = {}
        self.idempotency: dict[str, str] = {}
        self.registrations: dict[str, Registration] = {}
        self.create_calls: dict[str, int] = {}
        self.runs_by_message: dict[str, list[str]] = {}
        self.shutting_down = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._shutdown_event: asyncio.Event | None = None

    @property
    def shutdown_event(self) -> asyncio.Event:
        if self._shutdown_event is None:
            self._shutdown_event = asyncio.Event()
        return self._shutdown_event

    def registration(self, message_id: str | None) -> Registration | None:
        return None if message_id is None else self.registrations.get(message_id)

    def begin_shutdown(self) -> None:
        """Refuse new runs with 503 and end open streams, so the server can drain quickly."""
        self.shutting_down = True
        self.shutdown_event.set()
        for run in list(self.runs.values()):
            run.notify()

    def cancel_producers(self) -> None:
        for run in list(self.runs.values()):
            if run.task is not None and not run.task.done():
                run.task.cancel()

    def reset(self) -> None:
        """Forget everything; streams of forgotten runs end instead of hanging forever."""
        for run in list(self.runs.values()):
            run.discarded = True
            if run.task is not None and not run.task.done():
                run.task.cancel()
            run.notify()
        self.runs.clear()
        self.idempotency.clear()
        self.registrations.clear()
        self.create_calls.clear()
        self.runs_by_message.clear()

    def describe_runs(self, message_id: str | None = None) -> list[dict[str, Any]]:
        return [
            {
                "run_id": run.run_id,
                "message_id": run.message_id,
                "status": run.status,
                "request": run.request,
                "sse_connections": run.sse_connections,
            }
            for run in list(self.runs.values())
            if message_id is None or run.message_id == message_id
        ]

    def describe_message(self, message_id: str) -> dict[str, Any]:
        return {
            "create_calls": self.create_calls.get(message_id, 0),
            "runs": list(self.runs_by_message.get(message_id, [])),
        }


# --------------------------------------------------------------------------------------------
# The run producer


def _query_of(request: CreateRunRequest) -> str:
    for layer in request.composition.layers:
        if layer.type.endswith("prompt"):
            config = layer.config if isinstance(layer.config, dict) else {}
            user = config.get("user")
            return user if isinstance(user, str) else ("" if user is None else str(user))
    return ""


def _history_of(snapshot: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not snapshot:
        return []
    for layer in snapshot.get("layers", []):
        if layer.get("name") == "history":
            state = layer.get("runtime_state")
            messages = state.get("messages") if isinstance(state, dict) else None
            if isinstance(messages, list):
                return [m for m in messages if isinstance(m, dict)]
    return []


def answer_tokens_for(query: str, history: list[dict[str, Any]], pad_to: int) -> list[str]:
    """The deterministic answer, split into words that carry their leading space."""
    turn = sum(1 for message in history if message.get("role") == "user") + 1
    tokens = _TOKEN_RE.findall(f"[turn {turn}] You said: {query}.")
    pad_index = 0
    while len(tokens) < pad_to:
        tokens.append(" " + PAD_WORDS[pad_index % len(PAD_WORDS)])
        pad_index += 1
    return tokens


def _plan(
    state: StubState, request: CreateRunRequest, registration: Registration | None
) -> RunPlan:
    settings = state.settings
    token_delay = settings.token_delay
    pad_to = settings.answer_tokens
    if registration is not None:
        if registration.token_delay is not None:
            token_delay = registration.token_delay
        if registration.answer_tokens is not None:
            pad_to = registration.answer_tokens
    query = _query_of(request)
    history = _history_of(request.session_snapshot)
    resume = _resumed_call(request)
    tokens = answer_tokens_for(query, history, pad_to)
    if resume is not None:
        said = json.dumps(resume["result"], separators=(",", ":"))
        tokens = _TOKEN_RE.findall(f"Tool ask_human said: {said}")
    return RunPlan(
        think="THINK" in query and resume is None,
        refused_tool="CALL_TOOL:lookup" in query and resume is None,
        ask="CALL_TOOL:ask_human" in query and resume is None,
        resume=resume,
        query=query,
        history=history,
        tokens=tokens,
        token_delay=token_delay,
        fail=registration.take_fail() if registration else None,
        has_output=registration.has_output if registration else False,
        output=registration.output if registration else None,
        layer_names=[layer.name for layer in request.composition.layers],
    )


def _pending_call_of(snapshot: dict[str, Any] | None) -> dict[str, Any] | None:
    for layer in (snapshot or {}).get("layers", []):
        state = layer.get("runtime_state") if isinstance(layer, dict) else None
        if isinstance(state, dict) and isinstance(state.get("pending_call"), dict):
            return state["pending_call"]
    return None


def deferred_problem(request: CreateRunRequest) -> str | None:
    """Why a run's ``deferred_tool_results`` cannot resume its snapshot, if they cannot."""
    results = request.deferred_tool_results
    if results is None or not results.calls:
        return None
    pending = _pending_call_of(request.session_snapshot)
    if pending is None:
        return "deferred_tool_results given, but the snapshot has no deferred call"
    unknown = sorted(set(results.calls) - {pending.get("tool_call_id")})
    if unknown:
        return f"deferred_tool_results name unknown tool calls {unknown}"
    return None


def _resumed_call(request: CreateRunRequest) -> dict[str, Any] | None:
    results = request.deferred_tool_results
    pending = _pending_call_of(request.session_snapshot)
    if results is None or pending is None or pending.get("tool_call_id") not in results.calls:
        return None
    return {"tool_call_id": pending["tool_call_id"], "question": pending.get("question", ""),
            "result": results.calls[pending["tool_call_id"]]}


def _usage(plan: RunPlan, started: float) -> dict[str, Any]:
    history_words = sum(len(str(m.get("content", "")).split()) for m in plan.history)
    prompt_tokens = 10 + len(plan.query.split()) + history_words
    completion_tokens = len(plan.tokens)
    prompt_price = Decimal(prompt_tokens) * Decimal("0.0000025")
    completion_price = Decimal(completion_tokens) * Decimal("0.0000100")
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_price": str(prompt_price),
        "completion_price": str(completion_price),
        "total_price": str(prompt_price + completion_price),
        "currency": "USD",
        "latency": round(time.monotonic() - started, 6),
    }


def _snapshot(plan: RunPlan, answer: str) -> dict[str, Any]:
    messages = [
        *plan.history,
        {"role": "user", "content": plan.query},
        {"role": "assistant", "content": answer},
    ]
    return {
        "schema_version": 1,
        "layers": [
            {
                "name": name,
                "lifecycle_state": "suspended",
                "runtime_state": {"messages": messages} if name == "history" else {},
            }
            for name in plan.layer_names
        ],
    }


async def _produce(run: Run, plan: RunPlan) -> None:
    """Emit the scripted event sequence of one run, independent of any SSE client.

    Token n is due n times ``token_delay`` after the first, on the run's own clock: a token that a
    busy loop made late is sent at once and the next keeps its time. Sleeping ``token_delay``
    after each token instead let the loop merge runs: every run whose timer fell due during
    one slow loop iteration slept from the same instant afterwards, so runs fell into lock-step
    and stayed there, and a load of 200 independent streams became bursts of 200 tokens at once
    partway through a benchmark (docs/performance.md).
    """
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    token_due = loop.time()
    run.append("run_started", {})

    async def pause() -> None:
        await asyncio.sleep(plan.token_delay)

    special = plan.think or plan.refused_tool or plan.ask or plan.resume is not None
    if not special:
        run.append(
            "pydantic_ai_event",
            {
                "index": 0,
                "part": {"part_kind": "thinking", "content": THINKING_TEXT},
                "event_kind": "part_start",
            },
            delta=None,
        )
    if plan.think:
        turn = sum(1 for message in plan.history if message.get("role") == "user") + 1
        await process.think(run.append, pause, f"Counting user messages: {turn}.")
    if plan.refused_tool:
        process.refused_tool_round(run.append, "lookup", {"question": plan.query},
                                   process.call_id_for(run.run_id))
    if plan.resume is not None:
        process.resumed_call(run.append, plan.resume["question"],
                             plan.resume["tool_call_id"], plan.resume["result"])
    if plan.ask:
        await pause()
        call = process.ask(run.append, plan.query, process.call_id_for(run.run_id))
        snapshot = _snapshot(plan, "")
        for layer in snapshot["layers"]:
            if layer["name"] == "history":
                layer["runtime_state"]["messages"] = [*plan.history,
                                                      {"role": "user", "content": plan.query}]
        holder = next((layer for layer in snapshot["layers"] if layer["name"] == "ask_human"),
                      snapshot["layers"][0])
        holder["runtime_state"]["pending_call"] = {
            "tool_call_id": call["tool_call_id"], "question": call["args"]["question"]}
        run.append("run_succeeded", {"session_snapshot": snapshot, "deferred_tool_call": call,
                                     "usage": _usage(plan, started)})
        return
    fail_after = plan.fail.after_tokens if plan.fail is not None else None
    for position, token in enumerate(plan.tokens):
        if fail_after is not None and position >= fail_after:
            break
        token_due += plan.token_delay
        await asyncio.sleep(max(0.0, token_due - loop.time()))
        if position == 0:
            run.append(
                "pydantic_ai_event",
                {
                    "index": 1,
                    "part": {"part_kind": "text", "content": token},
                    "event_kind": "part_start",
                },
                delta=token,
            )
            run.append(
                "pydantic_ai_event",
                {"tool_name": None, "tool_call_id": None, "event_kind": "final_result"},
                delta=None,
            )
        else:
            run.append(
                "pydantic_ai_event",
                {
                    "index": 1,
                    "delta": {"part_delta_kind": "text", "content_delta": token},
                    "event_kind": "part_delta",
                },
                delta=token,
            )
    if plan.fail is not None:
        run.append("run_failed", {"error": plan.fail.error, "reason": plan.fail.reason})
        return
    answer = "".join(plan.tokens)
    run.append(
        "pydantic_ai_event",
        {"index": 1, "part": {"part_kind": "text", "content": answer}, "event_kind": "part_end"},
        delta=None,
    )
    run.append(
        "run_succeeded",
        {
            "session_snapshot": _snapshot(plan, answer),
            "output": plan.output if plan.has_output else answer,
            "usage": _usage(plan, started),
        },
    )


def _producer_done(run: Run, task: asyncio.Task[None]) -> None:
    """Turn a crashed producer into a failed run, so a stub bug cannot hang a stream forever."""
    if task.cancelled():
        return
    failure = task.exception()
    if failure is not None:
        run.append("run_failed", {"error": f"stub producer crashed: {failure!r}", "reason": None})


# --------------------------------------------------------------------------------------------
# SSE


class _DeliberateDrop(Exception):
    """Raised inside a stream to make uvicorn abort the connection mid-response."""


class _DropLogFilter(logging.Filter):
    """Keep scripted connection drops out of the error log; they are not server bugs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _DeliberateDrop)


def _install_drop_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(existing, _DropLogFilter) for existing in logger.filters):
        logger.addFilter(_DropLogFilter())


KEEPALIVE_FRAME = b": keepalive\n\n"


class SSEResponse(Response):
    """Streams one run's events, replaying after a cursor and then following live.

    Written as a raw ASGI response (not ``StreamingResponse``) because the faults need control
    that a generator does not give: aborting the connection without the closing chunk, and
    staying silent while still noticing that the client went away.
    """

    media_type = "text/event-stream"

    def __init__(
        self, state: StubState, run: Run, after: tuple[int, int], fault: StreamFault | None
    ) -> None:
        # Deliberately not Response.__init__: it would declare "content-length: 0".
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self.state = state
        self.run = run
        self.after = after
        self.fault = fault

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        writer = asyncio.ensure_future(self._write(send))
        watcher = asyncio.ensure_future(self._wait_for_disconnect(receive))
        try:
            await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            writer.cancel()
            watcher.cancel()
            await asyncio.wait({writer, watcher})  # let both settle; never raises
        if writer.cancelled():
            return  # the client went away; there is nobody left to finish the response for
        failure = writer.exception()
        if failure is not None:
            # Propagating makes uvicorn close the transport without the final chunk.
            raise failure
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _wait_for_disconnect(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _write(self, send: Send) -> None:
        run, fault, state = self.run, self.fault, self.state
        keepalive = state.settings.keepalive_interval

        async def emit(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        index = run.index_after(self.after)
        sent = 0
        garbage_done = False
        while not (state.shutting_down or run.discarded):
            if index >= len(run.events) and run.ended:
                return
            if fault is not None and fault.drop_after == sent:
                raise _DeliberateDrop(f"scripted drop after {sent} frames")
            if fault is not None and fault.stall_after == sent:
                await self._stall(fault.stall_seconds)
                return
            if index < len(run.events):
                event = run.events[index]
                if fault is not None and fault.garbage_after == sent and not garbage_done:
                    garbage_done = True
                    await emit(
                        f"id: {event.cursor}\nevent: pydantic_ai_event\n"
                        "data: {this is not json\n\n".encode()
                    )
                if fault is not None and fault.inject_after == sent and not garbage_done:
                    garbage_done = True
                    await emit((fault.frame or "").encode())
                await emit(event.frame)
                index += 1
                sent += 1
                if event.type in TERMINAL_EVENT_TYPES:
                    return
                continue
            changed = run.changed
            try:
                async with asyncio.timeout(keepalive):
                    await changed.wait()
            except TimeoutError:
                await emit(KEEPALIVE_FRAME)

    async def _stall(self, seconds: float | None) -> None:
        # Silence until the time is up, the client leaves (the watcher cancels us) or shutdown.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.state.shutdown_event.wait()


# --------------------------------------------------------------------------------------------
# HTTP handlers


def _error(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


Handler = Callable[[Request], Awaitable[Response]]


def _with_auth(state: StubState, handler: Handler) -> Handler:
    """Require the bearer token on the run API when one is configured."""

    async def guarded(request: Request) -> Response:
        expected = state.settings.auth_token
        if expected:
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), expected.encode()
            ):
                return _error(
                    401, "missing or invalid bearer token", {"www-authenticate": "Bearer"}
                )
        return await handler(request)

    return guarded


async def _json_body(request: Request, *, allow_empty: bool = False) -> Any:
    raw = await request.body()
    if allow_empty and not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HTTPException(422, f"body is not valid JSON: {exc}") from exc


def _message_id_of(body: Any) -> str | None:
    metadata = body.get("metadata") if isinstance(body, dict) else None
    value = metadata.get("message_id") if isinstance(metadata, dict) else None
    return None if value is None else str(value)


def _cursor_param(raw: str | None) -> tuple[int, int]:
    if raw is None or raw == "":
        return (0, 0)
    try:
        return parse_cursor(raw)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc


def create_app(settings: StubSettings | None = None) -> Starlette:
    """Build the stub app; its :class:`StubState` is at ``app.state.stub``."""
    state = StubState(settings or StubSettings())
    _install_drop_log_filter()

    def get_run(request: Request) -> Run:
        run = state.runs.get(request.path_params["run_id"])
        if run is None:
            raise HTTPException(404, "run not found")
        return run

    async def create_run(request: Request) -> Response:
        if state.shutting_down:
            return _error(503, "server is shutting down")
        body = await _json_body(request)
        message_id = _message_id_of(body)
        registration = state.registration(message_id)
        if message_id is not None:
            state.create_calls[message_id] = state.create_calls.get(message_id, 0) + 1
        if registration is not None and registration.create:
            fault = registration.create.popleft()
            payload = fault.body if fault.body is not None else {
                "detail": f"injected fault (status {fault.status})"
            }
            return JSONResponse(payload, status_code=fault.status)
        try:
            parsed = CreateRunRequest.model_validate(body)
        except ValidationError as exc:
            return _error(422, _validation_detail(exc))
        problem = deferred_problem(parsed)
        if problem is not None:
            return _error(422, problem)
        key = parsed.idempotency_key
        if key is not None and key in state.idempotency:
            existing = state.runs.get(state.idempotency[key])
            if existing is not None:
                return JSONResponse(
                    {"run_id": existing.run_id, "status": existing.status}, status_code=202
                )
        run = Run(uuid.uuid4().hex, message_id, body)
        state.runs[run.run_id] = run
        if key is not None:
            state.idempotency[key] = run.run_id
        if message_id is not None:
            state.runs_by_message.setdefault(message_id, []).append(run.run_id)
        run.task = asyncio.get_running_loop().create_task(
            _produce(run, _plan(state, parsed, registration)), name=f"stub-run-{run.run_id}"
        )
        run.task.add_done_callback(partial(_producer_done, run))
        return JSONResponse({"run_id": run.run_id, "status": "running"}, status_code=202)

    async def run_status(request: Request) -> Response:
        return JSONResponse(get_run(request).status_body())

    async def cancel_run(request: Request) -> Response:
        run = get_run(request)
        try:
            body = CancelRequest.model_validate(await _json_body(request, allow_empty=True))
        except ValidationError as exc:
            return _error(422, _validation_detail(exc))
        if run.ended:
            return _error(409, f"run already ended with status {run.status}")
        if run.task is not None:
            run.task.cancel()
        run.append("run_cancelled", {"reason": body.reason, "message": body.message})
        return JSONResponse({"run_id": run.run_id, "status": "cancelled"})

    async def event_page(request: Request) -> Response:
        run = get_run(request)
        after = _cursor_param(request.query_params.get("after"))
        raw_limit = request.query_params.get("limit", str(DEFAULT_PAGE_LIMIT))
        try:
            limit = int(raw_limit)
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_PAGE_LIMIT:
            return _error(422, f"limit must be an integer in 1..{MAX_PAGE_LIMIT}")
        start = run.index_after(after)
        events = run.events[start : start + limit]
        next_cursor = events[-1].cursor if events else f"{after[0]}-{after[1]}"
        return JSONResponse(
            {
                "run_id": run.run_id,
                "events": [event.envelope for event in events],
                "next_cursor": next_cursor,
            }
        )

    async def event_stream(request: Request) -> Response:
        run = get_run(request)
        last_event_id = request.headers.get("last-event-id")
        after = _cursor_param(last_event_id or request.query_params.get("after"))
        run.sse_connections += 1
        registration = state.registration(run.message_id)
        fault = registration.stream.popleft() if registration and registration.stream else None
        return SSEResponse(state, run, after, fault)

    async def register_message(request: Request) -> Response:
        message_id = request.path_params["message_id"]
        try:
            body = MessageControl.model_validate(await _json_body(request, allow_empty=True))
        except ValidationError as exc:
            return _error(422, _validation_detail(exc))
        state.registrations.setdefault(message_id, Registration()).update(body)
        return JSONResponse({"message_id": message_id, "updated": sorted(body.model_fields_set)})

    async def message_info(request: Request) -> Response:
        return JSONResponse(state.describe_message(request.path_params["message_id"]))

    async def list_runs(request: Request) -> Response:
        return JSONResponse({"runs": state.describe_runs(request.query_params.get("message_id"))})

    async def reset_state(request: Request) -> Response:
        state.reset()
        if not gc.isenabled():
            # A benchmark's stub runs without automatic collection; between its phases is when
            # a collection costs nobody's latency.
            gc.collect()
        return JSONResponse({"ok": True})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, exc.detail, dict(exc.headers or {}))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            state.begin_shutdown()
            state.cancel_producers()

    app = Starlette(
        routes=[
            Route("/runs", _with_auth(state, create_run), methods=["POST"]),
            Route("/runs/{run_id}", _with_auth(state, run_status), methods=["GET"]),
            Route("/runs/{run_id}/cancel", _with_auth(state, cancel_run), methods=["POST"]),
            Route("/runs/{run_id}/events", _with_auth(state, event_page), methods=["GET"]),
            Route("/runs/{run_id}/events/sse", _with_auth(state, event_stream), methods=["GET"]),
            Route("/_stub/messages/{message_id}", register_message, methods=["POST"]),
            Route("/_stub/messages/{message_id}", message_info, methods=["GET"]),
            Route("/_stub/runs", list_runs, methods=["GET"]),
            Route("/_stub/state", reset_state, methods=["DELETE"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.stub = state
    return app
