"""Runs: an append-only event log each, the followers waiting on it, and the producer filling it.

A run lives independently of any client connection (a worker that reconnects must find the
events it missed), so its producer is a task of the server's loop that appends the run's script
(stub_backend/process.py) to the log on the run's own clock, and SSE streams only read the log.
Cursors are Redis-stream-like (``<ms>-<n>``), as the real server's are.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from stub_backend import process
from stub_backend.control import Registration
from stub_backend.process import RunPlan
from stub_backend.settings import StubSettings

__all__ = [
    "TERMINAL_EVENT_TYPES",
    "Run",
    "StoredEvent",
    "StubState",
    "parse_cursor",
    "produce",
    "producer_done",
]

TERMINAL_EVENT_TYPES = frozenset({"run_succeeded", "run_failed", "run_cancelled"})
_CURSOR_RE = re.compile(r"^(\d+)-(\d+)$")


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


async def produce(run: Run, plan: RunPlan) -> None:
    """Append the run's events (stub_backend/process.py), independent of any SSE client.

    Paced event n (an answer token or a thought's chunk) is due n times ``token_delay`` after
    the run started, on the run's own clock: one that a busy loop made late is sent at once and
    the next keeps its time. Sleeping ``token_delay`` after each token instead let the loop
    merge runs: every run whose timer fell due during one slow loop iteration slept from the
    same instant afterwards, so runs fell into lock-step and stayed there, and a load of 200
    independent streams became bursts of 200 tokens at once partway through a benchmark
    (docs/performance.md).
    """
    loop = asyncio.get_running_loop()
    due = loop.time()
    for emit in process.events(plan):
        if emit.paced:
            due += plan.token_delay
            await asyncio.sleep(max(0.0, due - loop.time()))
        run.append(emit.type, emit.data, delta=emit.delta)


def producer_done(run: Run, task: asyncio.Task[None]) -> None:
    """Turn a crashed producer into a failed run, so a stub bug cannot hang a stream forever."""
    if task.cancelled():
        return
    failure = task.exception()
    if failure is not None:
        run.append("run_failed", {"error": f"stub producer crashed: {failure!r}", "reason": None})
