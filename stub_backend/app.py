"""A deterministic, in-memory stand-in for the dify-agent run API: the routes.

The worker under test talks to the agent backend only over HTTP, so the stub is a real ASGI app
that speaks the wire contract of ``/work/shared/agent-protocol.md``: strict request validation,
Redis-stream-like cursors, an SSE stream that replays and then follows, and run producers that
live independently of any client connection (a worker that reconnects must find the events it
missed). Answers are derived from the session snapshot sent with each run, so multi-turn
continuity bugs in the worker show up as wrong turn numbers in the answer text.

Where things are: ``settings`` (``StubSettings``), ``wire`` (run API bodies, strict),
``control`` (control API bodies and per-message registrations), ``history`` (the conversation
in a snapshot), ``process`` (what a run says: the answer, thinking, tool rounds, questions, and
the exact event sequences), ``runs`` (event logs, cursors, the producer), ``sse`` (the event
stream and its faults), ``server`` (a real socket); this module wires them to routes.

Run API (bearer token required only when ``auth_token`` is set):

- ``POST /runs`` -> 202 ``{"run_id", "status"}``; 503 while shutting down; 422 on a body the
  real server would refuse: unknown fields, a snapshot whose layers differ from the
  composition's, ``deferred_tool_results`` naming a call the snapshot is not waiting for (or
  missing one it waits for, or an ``ask_human`` result that is not ``{"status", "action":
  {"id", "label"}, "values", "message", "rendered_content"}``). A repeated
  ``idempotency_key`` answers 202 with the existing run's id and current status.
- ``GET /runs/{id}``, ``POST /runs/{id}/cancel`` (409 once ended),
  ``GET /runs/{id}/events?after=&limit=`` (``next_cursor`` is the last returned id, or the
  ``after`` cursor when the page is empty, so a poller can always pass it back),
  ``GET /runs/{id}/events/sse?after=`` (a ``Last-Event-ID`` header wins over ``after``, as a
  reconnecting EventSource keeps its original URL).

What a run says (stub_backend/process.py has the exact event sequences): a plain run thinks
"Thinking about it." (one thinking ``part_start``) and answers ``[turn N] You said: <query>.``.
Its query can ask for the agent's process, as the reference server was driven in the captures
of ../shared/agent-protocol-frames/: ``THINK`` (a streamed thought), ``CALL_TOOL:<name>`` (a
tool round, refused: the reference server has no tools), ``CALL_TOOL:ask_human`` (a question:
the run ends with a ``deferred_tool_call``). A run created with that snapshot and
``deferred_tool_results`` for the call resumes it and answers
``Tool ask_human said: <the result as compact JSON>``.

Control API (no auth), because the worker runs in another process and the test only knows the
message it enqueued, faults and overrides are keyed by ``metadata.message_id``:

- ``POST /_stub/messages/{message_id}`` registers, strictly (unknown keys are a 422):
  ``create`` and ``stream`` fault lists, ``fail`` (``{"reason", "error", "after_tokens",
  "times"}``), ``output``, ``token_delay``, ``answer_tokens`` and ``process``; keys given
  replace earlier values. Create faults are consumed before the body is validated, stream
  faults one per SSE connection.
- ``process`` is the message's whole process, replacing the query's triggers (``null``: back to
  them; ``[]``: none, and no "Thinking about it." either), a list of steps:

  - ``{"thinking": "text"}`` streamed word by word, or ``{"thinking": ["\\n", "a", " b"]}``
    streamed as exactly those chunks;
  - ``{"tool": "lookup", "args": {...}, "result": <JSON>}``: a round whose call returns
    ``result`` (``tool-return``); ``{"tool": ..., "args": ..., "refused": "text"}``: a round
    whose call is refused (``retry-prompt``); a next model round follows each;
  - ``{"ask_human": {"question", "title"?, "markdown"?, "fields"?: [{...}], "actions"?:
    [{"id", "label", "style"?}], "urgency"?}}``: the run ends with the deferred call (no
    ``actions``: one ``submit``); the run that resumes it goes on with the steps after it,
    so a turn can ask more than once.

  Tool and ``ask_human`` steps may give their ``tool_call_id``; the stub otherwise names calls
  ``call_<first 8 of the run id>_<n>``. Thinking chunks are paced by ``token_delay`` like
  answer tokens.
- ``GET /_stub/messages/{message_id}`` -> ``{"create_calls", "runs"}``;
  ``GET /_stub/runs[?message_id=]`` -> ``{"runs": [...]}`` in creation order;
  ``DELETE /_stub/state`` forgets everything (open streams of forgotten runs end), and collects
  cyclic garbage when automatic collection is off (``python -m stub_backend --no-gc-pauses``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stub_backend.control import MessageControl, Registration
from stub_backend.process import RunPlan, answer_tokens_for, plan_run
from stub_backend.runs import Run, StubState, parse_cursor, produce, producer_done
from stub_backend.settings import StubSettings
from stub_backend.sse import SSEResponse, install_drop_log_filter
from stub_backend.wire import CancelRequest, CreateRunRequest, validation_detail

__all__ = [
    "CreateRunRequest",
    "Run",
    "RunPlan",
    "StubSettings",
    "StubState",
    "answer_tokens_for",
    "create_app",
    "parse_cursor",
]

DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 500

# The producer under its former name, for code that drives one run directly.
_produce = produce


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
    install_drop_log_filter()

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
            return _error(422, validation_detail(exc))
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
            produce(run, plan_run(run.run_id, parsed, state.settings, registration)),
            name=f"stub-run-{run.run_id}",
        )
        run.task.add_done_callback(partial(producer_done, run))
        return JSONResponse({"run_id": run.run_id, "status": "running"}, status_code=202)

    async def run_status(request: Request) -> Response:
        return JSONResponse(get_run(request).status_body())

    async def cancel_run(request: Request) -> Response:
        run = get_run(request)
        try:
            body = CancelRequest.model_validate(await _json_body(request, allow_empty=True))
        except ValidationError as exc:
            return _error(422, validation_detail(exc))
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
            return _error(422, validation_detail(exc))
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
