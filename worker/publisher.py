"""Publishing a turn's events on its Redis pub/sub channel, coalesced and numbered.

Each turn gets one channel (``Settings.channel_for``) and every message on it is one JSON object
in the shape of Dify's chat streaming frames (docs/contract.md). Two properties are kept here:

- ``seq`` counts 1, 2, 3 … per turn with no gaps, across retries and worker processes: a server
  side counter is incremented in the same Lua call that publishes, so a number is never skipped
  or reused, whichever process publishes next.
- Deltas are coalesced: the first delta of a turn goes out at once (time to first token is what a
  user notices); later ones wait until ``window`` has passed or ``max_chars`` are buffered. The
  window is kept by one ``FlushScheduler`` thread per process, so a model that pauses mid-answer
  does not hold buffered text back until its next token.
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from worker.errors import EventBusUnavailable

# KEYS[1]: the turn's sequence counter. ARGV: channel, message JSON without its closing brace,
# counter TTL in seconds. Returns the seq the message went out with.
_PUBLISH_SCRIPT = """
local seq = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ',"seq":' .. seq .. '}')
return seq
"""


@dataclass(frozen=True, slots=True)
class TurnIds:
    task_id: str
    message_id: str
    conversation_id: str


class FlushScheduler:
    """Flushes coalescing buffers whose window has passed, for every turn of the process."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None

    def call_at(self, deadline: float, callback: Callable[[], None]) -> None:
        with self._wakeup:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="flush-scheduler",
                                                daemon=True)
                self._thread.start()
            entry = (deadline, next(self._counter), callback)
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._wakeup.notify()

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._wakeup.wait(timeout)
                _, _, callback = heapq.heappop(self._heap)
            callback()


class EventBus:
    """The process-wide publishing side of the pub/sub bus: one pool, one script, one scheduler."""

    def __init__(
        self,
        redis_client: redis.Redis,
        *,
        channel_for: Callable[[str], str],
        state_ttl_seconds: int = 24 * 3600,
        coalesce_window_ms: float = 40.0,
        coalesce_max_chars: int = 512,
    ) -> None:
        self.redis = redis_client
        self._channel_for = channel_for
        self._state_ttl = state_ttl_seconds
        self._window = coalesce_window_ms / 1000.0
        self._max_chars = coalesce_max_chars
        self._script = redis_client.register_script(_PUBLISH_SCRIPT)
        self.scheduler = FlushScheduler()

    def turn(self, ids: TurnIds) -> TurnPublisher:
        return TurnPublisher(self, ids)

    def seq_key(self, message_id: str) -> str:
        return f"agent-turn:seq:{message_id}"

    def last_seq(self, message_id: str) -> int:
        try:
            return int(self.redis.get(self.seq_key(message_id)) or 0)
        except redis.RedisError as exc:
            raise EventBusUnavailable(f"reading the turn's event counter failed: {exc}",
                                      message_id=message_id) from exc

    def publish(self, ids: TurnIds, event: str, fields: dict[str, Any]) -> int:
        message = {
            "event": event,
            "task_id": ids.task_id,
            "message_id": ids.message_id,
            "conversation_id": ids.conversation_id,
            "created_at": int(time.time()),
            **fields,
        }
        body = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        try:
            return int(self._script(keys=[self.seq_key(ids.message_id)],
                                    args=[self._channel_for(ids.message_id), body[:-1],
                                          self._state_ttl]))
        except redis.RedisError as exc:
            raise EventBusUnavailable(f"publishing {event} failed: {exc}",
                                      message_id=ids.message_id) from exc


class TurnPublisher:
    """The events of one turn. Thread-safe: the scheduler flushes from its own thread."""

    def __init__(self, bus: EventBus, ids: TurnIds) -> None:
        self._bus = bus
        self.ids = ids
        self._lock = threading.Lock()
        self._buffer: list[str] = []
        self._buffered_chars = 0
        self._flush_pending = False
        self._first_sent = False
        self._failure: EventBusUnavailable | None = None
        self.chunks_published = 0
        self.chars_published = 0

    def delta(self, text: str) -> None:
        """Queue answer text; published at once, or coalesced with its neighbours."""
        if not text:
            return
        with self._lock:
            self._raise_failure()
            self._buffer.append(text)
            self._buffered_chars += len(text)
            window = self._bus._window
            if not self._first_sent or window <= 0 or self._buffered_chars >= self._bus._max_chars:
                self._first_sent = True
                self._flush_locked()
            elif not self._flush_pending:
                self._flush_pending = True
                self._bus.scheduler.call_at(time.monotonic() + window, self._flush_from_timer)

    def flush(self) -> None:
        with self._lock:
            self._raise_failure()
            self._flush_locked()

    def replace(self, answer: str) -> None:
        """Tell the client its text so far is wrong: this is the whole answer now."""
        with self._lock:
            self._raise_failure()
            self._buffer.clear()
            self._buffered_chars = 0
            self._bus.publish(self.ids, "message_replace", {"answer": answer})

    def end(self, answer: str, metadata: dict[str, Any], *, status: str = "succeeded") -> None:
        """The turn's last event: ``status`` is ``succeeded``, or ``stopped`` with the partial
        answer."""
        with self._lock:
            self._raise_failure()
            self._flush_locked()
            self._bus.publish(self.ids, "message_end",
                              {"answer": answer, "metadata": metadata, "status": str(status)})

    def error(self, *, status: int, code: str, message: str) -> None:
        with self._lock:
            self._buffer.clear()
            self._buffered_chars = 0
            self._bus.publish(self.ids, "error",
                              {"status": status, "code": code, "message": message})

    def _flush_from_timer(self) -> None:
        with self._lock:
            if not self._flush_pending:
                return
            try:
                self._flush_locked()
            except EventBusUnavailable as exc:
                self._failure = exc

    def _flush_locked(self) -> None:
        self._flush_pending = False
        if not self._buffer:
            return
        text = "".join(self._buffer)
        self._buffer.clear()
        self._buffered_chars = 0
        self._bus.publish(self.ids, "agent_message", {"answer": text})
        self.chunks_published += 1
        self.chars_published += len(text)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
