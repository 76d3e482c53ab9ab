"""Publishing a turn's events on its Redis pub/sub channel, coalesced and numbered.

Each turn gets one channel (``Settings.channel_for``) and every message on it is one JSON object
in the shape of Dify's chat streaming frames (docs/contract.md). Two properties are kept here:

- ``seq`` counts 1, 2, 3 … per turn with no gaps, across retries and worker processes: a server
  side counter is incremented in the same Lua call that publishes, so a number is never skipped
  or reused, whichever process publishes next.
- Deltas are coalesced: a turn publishes at most one event per ``window`` (plus its first
  answer text, which goes out at once: time to first token is what a user notices). A delta
  that comes when the window since the turn's last event has passed goes out at once; one that
  comes sooner waits until it has passed, or until ``max_chars`` are buffered. The waits are
  kept by one ``FlushScheduler`` thread per process, so a model that pauses mid-answer does not
  hold buffered text back until its next token.

Pub/sub alone is at-most-once: a subscriber that connects late, or reconnects, misses what went
before. So every message is also appended to the turn's replay log, a Redis Stream whose entry
ids are the seqs (``<seq>-0``), by the same Lua call that publishes it: a message is either in
both the log and the channel or in neither, and a reader that subscribes first and then reads
the log misses nothing (the SSE gateway, gateway/relay.py, does exactly that).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import NoScriptError

from config.settings import Settings, get_settings
from worker import fastjson
from worker.errors import EventBusUnavailable, TurnTakenOver
from worker.locks import Lease
from worker.ownership import owner_key
from worker.questions import question_key

log = logging.getLogger(__name__)

# KEYS[1]: the turn's head (its last seq and the id of the publish that took it, ``<seq>
# <publish id>``), KEYS[2]: its replay log, KEYS[3] (when the turn holds its conversation's
# lease): the lease. ARGV: channel, message JSON without its closing brace, head TTL, log TTL
# (both in seconds; an empty log TTL keeps both keys' TTLs as they are), log length bound,
# publish id, the lease's token, the event's kind for compaction, and (on a message_end) the
# summary that compacts the log. Returns the seq the message went out with. The log entry's
# ``data`` and the pub/sub message are the same bytes.
#
# The seq is the head's plus one: counted on the server in the call that publishes, so a number
# is never skipped or reused whichever process publishes next. (A head written before the
# publish id joined it holds the bare number; it is read as such.)
#
# The lease is the fence between two copies of a turn (worker/takeover.py): once another worker
# has taken the turn over, a copy that was only paused publishes nothing more.
#
# A publish whose reply was lost (Redis restarted or the connection broke after it ran) is sent
# again by the client's retry with the same publish id; it must not go out a second time under a
# new seq, or the client would show that text twice. A turn has one publish in flight at a time
# (``TurnPublisher`` holds its lock across it), so the head's publish id is enough.
#
# TTLs are not refreshed by every publish: a turn's publisher refreshes them on its first
# publish, on every event but answer text and steps, and when its last refresh is a quarter of
# the log's TTL old (``TurnPublisher``), so a live turn's keys never come near expiring.
#
# Compaction. While a turn streams, its log holds every event: a client that joins late needs
# each delta. Once it has ended, most of that is redundant: a client needs the text it lacks,
# which the end's answer is, and each step's latest version. Each entry carries its kind (field
# ``k``: ``t`` text, ``r`` a reset, ``s<step id>`` a step's version, ``o`` any other), so that
# the end can rebuild the log as: the other events, the last reset, and the steps' latest
# versions (those after the last reset) at their own seqs, and in place of the last text event
# a ``message_replace`` with the whole answer. A client resuming after any seq then ends with
# exactly the answer: before the last text event it gets the replace, after it it had every
# delta already.
_PUBLISH_SCRIPT = """
local head, holder
if KEYS[3] then
  local both = redis.call('MGET', KEYS[1], KEYS[3])
  head, holder = both[1], both[2]
else
  head = redis.call('GET', KEYS[1])
end
local seq = 1
if head then
  local sep = string.find(head, ' ', 1, true)
  local last = tonumber(sep and string.sub(head, 1, sep - 1) or head)
  if sep and string.sub(head, sep + 1) == ARGV[6] then return last end
  seq = last + 1
end
if KEYS[3] and holder ~= ARGV[7] then
  return redis.error_reply('FENCED another worker holds the turn now')
end
local message = ARGV[2] .. ',"seq":' .. seq .. '}'
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], seq .. '-0', 'data', message, 'k', ARGV[8])
if ARGV[4] == '' then
  redis.call('SET', KEYS[1], seq .. ' ' .. ARGV[6], 'KEEPTTL')
else
  redis.call('SET', KEYS[1], seq .. ' ' .. ARGV[6], 'EX', tonumber(ARGV[3]))
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
end
redis.call('PUBLISH', ARGV[1], message)
if ARGV[9] == '' then return seq end
local entries = redis.call('XRANGE', KEYS[2], '-', '+')
local text, reset, data, kinds, keep, steps = 0, 0, {}, {}, {}, {}
for _, entry in ipairs(entries) do
  local at = tonumber(string.match(entry[1], '^(%d+)'))
  local fields = entry[2]
  local kind = 'o'
  for i = 1, #fields, 2 do
    if fields[i] == 'data' then data[at] = fields[i + 1]
    elseif fields[i] == 'k' then kind = fields[i + 1] end
  end
  kinds[at] = kind
  if kind == 't' then text = at
  elseif kind == 'r' then text, reset = at, at
  elseif string.sub(kind, 1, 1) == 's' then steps[kind] = at
  else table.insert(keep, at) end
end
for _, at in pairs(steps) do
  if at > reset then table.insert(keep, at) end
end
if reset > 0 and reset ~= text then table.insert(keep, reset) end
if text > 0 then table.insert(keep, text) end
table.sort(keep)
if #keep == #entries then
  -- Nothing to drop (say, a compacted log's end delivered again): the log stays as it is.
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
  return seq
end
local rebuilt = KEYS[2] .. ':compacted'
redis.call('DEL', rebuilt)
for _, at in ipairs(keep) do
  local body, kind = data[at], kinds[at]
  if at == text then body, kind = ARGV[9] .. ',"seq":' .. at .. '}', 't' end
  redis.call('XADD', rebuilt, at .. '-0', 'data', body, 'k', kind)
end
redis.call('RENAME', rebuilt, KEYS[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
return seq
"""

# Pauses between attempts to publish while Redis refuses connections: ~3 s in all.
CONNECT_RETRY_PAUSES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0)

# The events after which nothing more belongs to a turn (docs/contract.md).
TERMINAL_EVENTS = frozenset({"message_end", "error"})

# Re-deliveries of a finished turn each publish its message_end once more (docs/contract.md); the
# log bound leaves room for this many without trimming the turn itself.
REDELIVERY_ALLOWANCE = 100


def seq_key(message_id: str) -> str:
    """The turn's head: its last seq and the id of the publish that took it (``seq_of``)."""
    return f"agent-turn:seq:{message_id}"


def seq_of(head: bytes | str | None) -> int:
    """The last seq a turn gave out, from its head (``<seq> <publish id>``, or a bare number as
    heads were written before the publish id joined them); 0 when nothing was published."""
    if not head:
        return 0
    if isinstance(head, str):
        head = head.encode()
    return int(head.split(b" ", 1)[0])


def replay_log_key(message_id: str) -> str:
    """The turn's replay log: a Stream of its messages, entry id ``<seq>-0``, field ``data``."""
    return f"agent-turn:log:{message_id}"


@dataclass(frozen=True, slots=True)
class ReplayLogPolicy:
    """How long a turn's replay log lives and how long it may grow.

    ``max_events`` is a bound that can never cut a live turn's log: a client that connects late
    needs every entry from seq 1 (deltas only add up from the start), so the bound must be at
    least the most messages one turn can publish. Each attempt publishes at most one
    ``message_replace("")`` when it starts, one ``agent_message`` per delta flush (every flush
    carries at least one character and the worker stops an attempt whose streamed text passes
    ``max_answer_chars``), one ``message_replace`` with the structured answer and one end or
    ``error``; a turn makes at most ``max_retries + 1`` attempts. What keeps a real turn small
    is coalescing (a flush per window or per ``coalesce_max_chars``, tens to hundreds of entries
    for a long answer) and the shorter TTL once it has ended; the bound only stops a runaway.
    """

    ttl_seconds: int
    ttl_after_end_seconds: int
    max_events: int
    # Whether a turn's end compacts its log (see the publish script).
    compact: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> ReplayLogPolicy:
        per_attempt = settings.max_answer_chars + 3
        return cls(
            ttl_seconds=settings.replay_log_ttl_seconds,
            ttl_after_end_seconds=settings.replay_log_ttl_after_end_seconds,
            max_events=(settings.max_retries + 1) * per_attempt + REDELIVERY_ALLOWANCE,
            compact=settings.replay_log_compact_on_end,
        )


@dataclass(frozen=True, slots=True)
class ClientText:
    """How much answer text an earlier attempt left on the client's screen."""

    published: bool
    chars: int
    resumable: bool


# What ``client_text`` says of a turn that has published nothing yet.
NOTHING_SHOWN = ClientText(published=False, chars=0, resumable=True)


@dataclass(frozen=True, slots=True)
class TurnIds:
    task_id: str
    message_id: str
    conversation_id: str
    # The id the turn's channel, log and counter are named by: the message id, except for a turn
    # refused for ownership, whose one error goes to a stream of its own (worker/ownership.py).
    stream: str = ""

    @property
    def stream_id(self) -> str:
        return self.stream or self.message_id


class FlushScheduler:
    """Flushes coalescing buffers whose window has passed, for every turn of the process.

    The timer thread only hands due flushes to a few flusher threads: flushes that fall due
    together then publish together (``GroupCommit``), instead of one round trip after another
    on a single thread, which is what bounded a worker with a thousand turns.
    """

    FLUSHERS = 32

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._flushers = ThreadPoolExecutor(self.FLUSHERS, thread_name_prefix="flush")

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
                now = time.monotonic()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[2])
            for callback in due:
                self._flushers.submit(_run_logged, callback)


def _run_logged(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:
        log.exception("a scheduled flush failed")


def _let_the_ready_run() -> None:
    """Yield once: under gevent, every greenlet that is ready to run runs first."""
    time.sleep(0)


class _PendingCall:
    """One caller's publish, waiting in a ``GroupCommit`` queue."""

    __slots__ = ("args", "batch", "done", "keys", "ready", "result")

    def __init__(self, keys: list[str], args: list[Any]) -> None:
        self.keys, self.args = keys, args
        self.ready = threading.Event()  # set when done, or when handed a batch to send
        self.done = False
        self.batch: list[_PendingCall] | None = None  # the calls this caller is to send
        self.result: Any = None

    def finish(self, result: Any) -> None:
        self.result, self.done = result, True
        self.ready.set()


class _ConnectFailed(Exception):
    """Carries a failed connect out of redis-py's retry loop, which would retry it."""


class GroupCommit:
    """Runs a Lua script for all callers that arrive together in pipelined round trips.

    Up to ``max_in_flight`` round trips run at once, each on its own pooled connection. A caller
    that finds one free takes it with whatever had queued, and first gathers (``gather``): it
    yields once, so that under gevent every greenlet that is ready to run runs before it sends,
    and every call made meanwhile joins its round trip. Otherwise a caller queues, and the next
    round trip to finish hands the whole queue to its oldest caller to send as one pipeline.
    A turn has one publish in flight at a time (``TurnPublisher``), so its events keep their
    order.

    Gathering costs a quiet worker one pass of the hub (microseconds): nothing else is ready.
    A loaded one has hundreds of turns woken by the same poll of their sockets, each with an
    event to publish, and a round trip (one send, one receive, ~30 µs of Redis's CPU) was most
    of an event's cost to both processes: without gathering those turns took a round trip
    each, as the four slots were free more often than not. With gathering, 3 events share a
    round trip at 1,000 turns instead of 1.6; in the throughput scenario, old and new code
    alternating, Redis's CPU a turn fell 14-19% and the worker's fell or held, and the
    latency scenario's added latency per event was no worse (docs/performance.md, *Fifth
    session of 2026-12-07*).
    """

    def __init__(self, client: redis.Redis, script: Any, *, max_in_flight: int = 4,
                 gather: Callable[[], None] | None = _let_the_ready_run) -> None:
        self._client = client
        self._script = script
        self._max_in_flight = max_in_flight
        self._gather = gather
        # The batch of a leader that is gathering before it sends: later callers join it.
        self._gathering: list[_PendingCall] | None = None
        self._lock = threading.Lock()
        self._queue: list[_PendingCall] = []
        self._in_flight = 0
        self._idle: list[redis.connection.AbstractConnection] = []
        self._pid = os.getpid()
        self.round_trips = 0  # sent so far, resends included: how much sharing there was

    def call(self, keys: list[str], args: list[Any]) -> Any:
        pending = _PendingCall(keys, args)
        gathers = False
        with self._lock:
            if self._gathering is not None:
                self._gathering.append(pending)
            elif self._in_flight < self._max_in_flight:
                self._in_flight += 1
                pending.batch, self._queue = [*self._queue, pending], []
                if self._gather is not None:
                    self._gathering, gathers = pending.batch, True
            else:
                self._queue.append(pending)
        try:
            if gathers:
                try:
                    self._gather()  # callers that arrive now join this round trip
                finally:
                    with self._lock:
                        self._gathering = None
            if pending.batch is None:
                pending.ready.wait()
            with self._lock:
                batch, pending.batch = pending.batch, None
            if batch is not None:
                self._lead(batch)
        except BaseException:
            self._give_up(pending)
            raise
        if isinstance(pending.result, BaseException):
            raise pending.result
        return pending.result

    def _lead(self, batch: list[_PendingCall]) -> None:
        results: list[Any] = []
        try:
            results = self._run(batch)
        except Exception as exc:  # the round trip failed: so did every call it carried
            results = [exc] * len(batch)
        finally:
            if len(results) != len(batch):  # interrupted mid-round-trip
                results = [EventBusUnavailable("publishing was interrupted")] * len(batch)
            for pending, result in zip(batch, results, strict=True):
                pending.finish(result)
            with self._lock:
                queued, self._queue = self._queue, []
                self._hand_on_locked(queued)

    def _hand_on_locked(self, batch: list[_PendingCall]) -> None:
        """Give the next round trip to the oldest caller of ``batch``, or free the slot."""
        if batch:
            batch[0].batch = batch
            batch[0].ready.set()
        else:
            self._in_flight -= 1

    def _give_up(self, pending: _PendingCall) -> None:
        """A caller interrupted while waiting must not take a round trip with it."""
        with self._lock:
            if pending in self._queue:
                self._queue.remove(pending)
                return
            if pending.batch is None and self._gathering is not None \
                    and pending in self._gathering:  # joined a round trip not sent yet
                self._gathering.remove(pending)
                return
            batch, pending.batch = pending.batch, None
            if batch is not None:  # handed a batch it will never send: hand it on
                self._hand_on_locked([p for p in batch if p is not pending])

    def _run(self, batch: list[_PendingCall]) -> list[Any]:
        connection = self._take_connection()
        try:
            results = self._round_trip_with_retry(connection, batch)
            missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
            if missing:  # Redis restarted or its script cache was flushed: load it, run those again
                self._client.script_load(self._script.script)
                again = self._round_trip_with_retry(connection, [batch[i] for i in missing])
                for i, result in zip(missing, again, strict=True):
                    results[i] = result
            return results
        except BaseException:
            connection.disconnect()  # a reply may still be on its way: never reuse the socket
            raise
        finally:
            with self._lock:
                self._idle.append(connection)

    def _take_connection(self) -> redis.connection.AbstractConnection:
        """A connection of the client's pool, kept for round trips (at most one per slot).

        Borrowing one from the pool per round trip costs a lock, a readiness poll (a system
        call) and the pipeline object's bookkeeping: about as much CPU as the round trip itself.
        Kept connections still belong to the pool, so disconnecting the pool closes them.
        """
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's sockets are not ours
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        return self._client.connection_pool.get_connection()

    def _round_trip_with_retry(
        self, connection: redis.connection.AbstractConnection, batch: list[_PendingCall]
    ) -> list[Any]:
        """One round trip, resent as redis-py resends its own commands.

        Without the pool's readiness poll, a kept socket the server closed (a restart) shows
        only when used: the first failure is resent at once on a fresh connection. After that
        the client's retry policy reconnects and resends with its backoff. A resend of a
        publish that did run is recognised by its publish id. A refused connect is raised at
        once, for ``EventBus.publish`` to retry with its own pauses.
        """
        try:
            return self._round_trip(connection, batch)
        except (redis.ConnectionError, redis.TimeoutError):
            connection.disconnect()

        def attempt() -> list[Any]:
            try:
                connection.connect()  # no-op while connected
            except redis.ConnectionError as exc:
                raise _ConnectFailed from exc
            return self._round_trip(connection, batch)

        try:
            return connection.retry.call_with_retry(
                attempt, lambda _error: connection.disconnect()
            )
        except _ConnectFailed as failed:
            raise failed.__cause__ from None  # type: ignore[misc]

    def _round_trip(
        self, connection: redis.connection.AbstractConnection, batch: list[_PendingCall]
    ) -> list[Any]:
        sha = self._script.sha
        with self._lock:
            self.round_trips += 1
        connection.send_packed_command(connection.pack_commands(
            [("EVALSHA", sha, len(pending.keys), *pending.keys, *pending.args)
             for pending in batch]
        ))
        results: list[Any] = []
        for _ in batch:
            try:
                results.append(connection.read_response())
            except redis.ResponseError as exc:  # this call's error; the connection is fine
                results.append(exc)
        return results


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
        replay_log: ReplayLogPolicy | None = None,
        round_trips: int = 4,
        gather: bool = True,
    ) -> None:
        self.redis = redis_client
        self._channel_for = channel_for
        self._state_ttl = state_ttl_seconds
        # Read from the process's settings when not given, so that the worker's log follows
        # AGENT_TURN_REPLAY_LOG_* whoever builds its bus.
        self.replay_log = replay_log or ReplayLogPolicy.from_settings(get_settings())
        self._window = coalesce_window_ms / 1000.0
        self._max_chars = coalesce_max_chars
        self._script = redis_client.register_script(_PUBLISH_SCRIPT)
        self._commit = GroupCommit(redis_client, self._script, max_in_flight=round_trips,
                                   gather=_let_the_ready_run if gather else None)
        self._publisher_id = uuid.uuid4().hex
        self._publish_numbers = itertools.count(1)
        self.scheduler = FlushScheduler()

    @classmethod
    def from_settings(cls, redis_client: redis.Redis, settings: Settings) -> EventBus:
        """The bus as the worker's settings configure it, on the given client."""
        return cls(
            redis_client,
            channel_for=settings.channel_for,
            state_ttl_seconds=settings.turn_state_ttl_seconds,
            coalesce_window_ms=settings.coalesce_window_ms,
            coalesce_max_chars=settings.coalesce_max_chars,
            round_trips=settings.publish_round_trips,
            gather=settings.publish_gather,
            replay_log=ReplayLogPolicy.from_settings(settings),
        )

    def turn(self, ids: TurnIds) -> TurnPublisher:
        return TurnPublisher(self, ids)

    def record_owner(self, message_id: str, fingerprint: str) -> None:
        """Say whose turn the message is, before anything is published on its channel.

        The gateway reads it to serve a stream only to its owner (worker/ownership.py); it
        lives as long as the turn's seq counter, so as long as anything of the turn does.
        """
        try:
            self.redis.set(owner_key(message_id), fingerprint, ex=self._state_ttl)
        except redis.RedisError as exc:
            raise EventBusUnavailable(f"recording the turn's owner failed: {exc}",
                                      message_id=message_id) from exc

    def record_owner_on(self, pipe: redis.client.Pipeline, message_id: str,
                        fingerprint: str) -> Callable[[Any], None]:
        """Queue ``record_owner`` on ``pipe``; the returned function checks its reply."""
        pipe.set(owner_key(message_id), fingerprint, ex=self._state_ttl)

        def recorded(reply: Any) -> None:
            if isinstance(reply, Exception):
                raise EventBusUnavailable(f"recording the turn's owner failed: {reply}",
                                          message_id=message_id)

        return recorded

    def record_owner_if_none(self, message_id: str, fingerprint: str) -> bool:
        """Record the owner unless one is recorded already; whether this call recorded it."""
        try:
            return bool(self.redis.set(owner_key(message_id), fingerprint, nx=True,
                                       ex=self._state_ttl))
        except redis.RedisError as exc:
            raise EventBusUnavailable(f"recording the turn's owner failed: {exc}",
                                      message_id=message_id) from exc

    def record_question(self, message_id: str, question: dict[str, Any], *,
                        ttl_seconds: int) -> None:
        """The open question of a message, for a producer to check an answer against before
        it enqueues one (the worker checks again against the store, which decides)."""
        try:
            self.redis.set(question_key(message_id), json.dumps(question), ex=ttl_seconds)
        except redis.RedisError as exc:
            raise EventBusUnavailable(f"recording the turn's question failed: {exc}",
                                      message_id=message_id) from exc

    def forget_question(self, message_id: str) -> None:
        with contextlib.suppress(redis.RedisError):
            self.redis.delete(question_key(message_id))

    def owner_of(self, message_id: str) -> str | None:
        """The recorded owner's fingerprint of a message, or None if none is recorded."""
        try:
            found = self.redis.get(owner_key(message_id))
        except redis.RedisError as exc:
            raise EventBusUnavailable(f"reading the turn's owner failed: {exc}",
                                      message_id=message_id) from exc
        return found.decode() if found is not None else None

    def seq_key(self, message_id: str) -> str:
        return seq_key(message_id)

    def replay_log_key(self, message_id: str) -> str:
        return replay_log_key(message_id)

    def last_seq(self, message_id: str) -> int:
        try:
            return seq_of(self.redis.get(self.seq_key(message_id)))
        except redis.RedisError as exc:
            raise EventBusUnavailable(f"reading the turn's event counter failed: {exc}",
                                      message_id=message_id) from exc

    def last_event(self, message_id: str) -> str | None:
        """The kind of the last event on the turn's replay log (None: nothing logged)."""
        try:
            entries = self.redis.xrevrange(replay_log_key(message_id), count=1)
        except redis.RedisError as exc:
            raise EventBusUnavailable(f"reading the turn's replay log failed: {exc}",
                                      message_id=message_id) from exc
        return json.loads(entries[0][1][b"data"])["event"] if entries else None

    def client_text(self, message_id: str) -> ClientText:
        """What a client following this turn shows now, read back from the replay log.

        A retry that re-attaches to the run an earlier attempt streamed can then skip the text
        the client already has instead of resetting it; anything it cannot vouch for (a log
        gone before the counter, a structured replace) is reported as not resumable.
        """
        try:
            published = self.last_seq(message_id) > 0
            entries = self.redis.xrange(replay_log_key(message_id)) if published else []
        except redis.RedisError as exc:
            raise EventBusUnavailable(f"reading the turn's replay log failed: {exc}",
                                      message_id=message_id) from exc
        chars, resumable = 0, bool(entries) or not published
        for _, fields in entries:
            event = json.loads(fields[b"data"])
            if event["event"] == "agent_message":
                chars += len(event["answer"])
            elif event["event"] == "message_replace":
                chars, resumable = len(event["answer"]), event["answer"] == ""
        return ClientText(published=published, chars=chars, resumable=resumable)

    def publish(self, ids: TurnIds, event: str, fields: dict[str, Any],
                fence: Lease | None = None, *, refresh_ttl: bool = True) -> int:
        """Number, log and publish one event; its seq. ``refresh_ttl=False`` leaves the
        turn's keys' TTLs as they are (``TurnPublisher`` refreshes them often enough)."""
        # ``id`` as Dify's server sends it: the message id on message-level events (Dify's
        # web client reads the message id from it), the step's id on agent_thought.
        message = {
            "event": event,
            "id": ids.message_id,
            "task_id": ids.task_id,
            "message_id": ids.message_id,
            "conversation_id": ids.conversation_id,
            "created_at": int(time.time()),
            **fields,
        }
        body = fastjson.encode(message)
        policy = self.replay_log
        log_ttl = policy.ttl_after_end_seconds if event in TERMINAL_EVENTS else policy.ttl_seconds
        # The counter must outlive the log: entry ids are seqs and must keep growing.
        log_ttl = min(log_ttl, self._state_ttl)
        stream = ids.stream_id
        keys = [seq_key(stream), replay_log_key(stream)]
        args = [self._channel_for(stream), body[:-1], self._state_ttl,
                log_ttl if refresh_ttl else "",
                policy.max_events, f"{self._publisher_id}:{next(self._publish_numbers)}",
                fence.token if fence is not None else "", _index_kind(event, fields),
                self._summary(message) if event == "message_end" and policy.compact else ""]
        if fence is not None:
            keys.append(fence.key)
        # A refused connection is retried here (redis-py retries failures after connecting,
        # not a refused connect): a Redis restart or failover of a few seconds costs the turn
        # latency, not an attempt. Every retry, here or in redis-py, resends the same publish
        # id, so one whose reply was lost is not published twice.
        for pause in (*CONNECT_RETRY_PAUSES, None):
            try:
                return int(self._commit.call(keys, args))
            except redis.ConnectionError as exc:
                if pause is None or "connecting to" not in str(exc):
                    raise EventBusUnavailable(f"publishing {event} failed: {exc}",
                                              message_id=ids.message_id) from exc
                time.sleep(pause)
            except redis.ResponseError as exc:
                if str(exc).startswith("FENCED"):
                    raise TurnTakenOver(f"{event} not published: {exc}",
                                        message_id=ids.message_id) from None
                raise EventBusUnavailable(f"publishing {event} failed: {exc}",
                                          message_id=ids.message_id) from exc
            except redis.RedisError as exc:
                raise EventBusUnavailable(f"publishing {event} failed: {exc}",
                                          message_id=ids.message_id) from exc
        raise AssertionError("unreachable")


    @staticmethod
    def _summary(end: dict[str, Any]) -> bytes:
        """The ``message_replace`` that stands for a finished turn's text in its compacted log,
        without its seq and closing brace (the script adds them)."""
        summary = {"event": "message_replace",
                   **{name: end[name] for name in ("id", "task_id", "message_id",
                                                   "conversation_id", "created_at")},
                   "answer": end["answer"]}
        return fastjson.encode(summary)[:-1]


def _index_kind(event: str, fields: dict[str, Any]) -> str:
    """How the log's index files an event: text (``t``), a reset (``r``), a step's version
    (``s<step id>``) or any other (``o``)."""
    if event == "agent_message":
        return "t"
    if event == "message_replace":
        return "r" if fields.get("answer") == "" else "t"
    if event == "agent_thought":
        return f"s{fields.get('id', '')}"
    return "o"


class TurnPublisher:
    """The events of one turn. Thread-safe: the scheduler flushes from its own thread.

    Answer deltas and step updates wait in one ordered queue, so they go out in the order the
    run produced them: consecutive deltas are joined into one ``agent_message``, and
    consecutive updates of one step keep only the newest (a client replaces the step it holds
    by ``id``). An item goes out at once when the window since the turn's last event has
    passed, else when it does.
    """

    def __init__(self, bus: EventBus, ids: TurnIds) -> None:
        self._bus = bus
        self.ids = ids
        self._lock = threading.Lock()
        # Each item: a list of answer parts, or the fields of one agent_thought.
        self._pending: list[list[str] | dict[str, Any]] = []
        self._buffered_chars = 0
        self._flush_pending = False
        # Until when the window since the turn's last published event runs (0: none yet).
        self._quiet_after = 0.0
        self._first_text_sent = False
        self._failure: EventBusUnavailable | TurnTakenOver | None = None
        # The lease this turn's copy holds while it runs: its events go out only while it does.
        self.fence: Lease | None = None
        self.chunks_published = 0
        self.chars_published = 0
        self.steps_published = 0
        # Until when the turn's keys' TTLs need no refresh (the publish script's comment).
        self._ttl_fresh_until = 0.0

    def delta(self, text: str) -> None:
        """Queue answer text; published at once, or coalesced with its neighbours."""
        if not text:
            return
        with self._lock:
            self._raise_failure()
            last = self._pending[-1] if self._pending else None
            if isinstance(last, list):
                last.append(text)
            else:
                self._pending.append([text])
            self._buffered_chars += len(text)
            # The first answer text goes out at once even after steps: time to first token
            # is what a user notices.
            first_text, self._first_text_sent = not self._first_text_sent, True
            self._schedule_locked(at_once=first_text)

    def step(self, fields: dict[str, Any]) -> None:
        """Queue a step's current state (``agent_thought``), coalesced like answer text."""
        with self._lock:
            self._raise_failure()
            last = self._pending[-1] if self._pending else None
            if isinstance(last, dict) and last.get("id") == fields.get("id"):
                self._pending[-1] = fields
            else:
                self._pending.append(fields)
            self._schedule_locked()

    def flush(self) -> None:
        with self._lock:
            self._raise_failure()
            self._flush_locked()

    def replace(self, answer: str) -> None:
        """Tell the client its text so far is wrong: this is the whole answer now."""
        with self._lock:
            self._raise_failure()
            self._pending = [item for item in self._pending if isinstance(item, dict)]
            self._buffered_chars = 0
            self._flush_locked()
            self._bus.publish(self.ids, "message_replace", {"answer": answer}, self.fence)

    def end(self, answer: str, metadata: dict[str, Any], *, status: str = "succeeded") -> None:
        """The turn's last event: ``status`` is ``succeeded``, or ``stopped`` with the partial
        answer."""
        with self._lock:
            self._raise_failure()
            self._flush_locked()
            self._bus.publish(self.ids, "message_end",
                              {"answer": answer, "metadata": metadata, "status": str(status)},
                              self.fence)

    def event(self, event: str, fields: dict[str, Any]) -> None:
        """Any other event of the turn, after everything queued before it."""
        with self._lock:
            self._raise_failure()
            self._flush_locked()
            self._bus.publish(self.ids, event, fields, self.fence)

    def error(self, *, status: int, code: str, message: str) -> None:
        with self._lock:
            self._pending.clear()
            self._buffered_chars = 0
            self._bus.publish(self.ids, "error",
                              {"status": status, "code": code, "message": message}, self.fence)

    def discard(self) -> None:
        """Drop what is queued and not yet out: the attempt failed, and its ``error`` (or the
        next attempt) must not be followed by text the timer would still flush."""
        with self._lock:
            self._pending.clear()
            self._buffered_chars = 0
            self._flush_pending = False

    def _schedule_locked(self, *, at_once: bool = False) -> None:
        """Send now if the window since the turn's last event has passed, else once it has.

        The window bounds how often a turn publishes; it is not a delay. A token that comes
        after a quiet spell longer than the window (a model at 5 tokens/s against 40 ms) goes
        out from the reading thread at once, without the timer's hand-off and its wait.
        """
        window = self._bus._window
        now = time.monotonic()
        if at_once or window <= 0 or now >= self._quiet_after \
                or self._buffered_chars >= self._bus._max_chars:
            self._flush_locked()
        elif not self._flush_pending:
            self._flush_pending = True
            self._bus.scheduler.call_at(self._quiet_after, self._flush_from_timer)

    def _flush_from_timer(self) -> None:
        with self._lock:
            if not self._flush_pending:
                return
            try:
                self._flush_locked()
            except (EventBusUnavailable, TurnTakenOver) as exc:
                self._failure = exc

    def _flush_locked(self) -> None:
        self._flush_pending = False
        while self._pending:
            item = self._pending[0]
            if isinstance(item, list):
                text = "".join(item)
                self._publish_hot("agent_message", {"answer": text})
                self._buffered_chars -= len(text)
                self.chunks_published += 1
                self.chars_published += len(text)
            else:
                self._publish_hot("agent_thought", item)
                self.steps_published += 1
            self._pending.pop(0)
        self._buffered_chars = 0

    def _publish_hot(self, event: str, fields: dict[str, Any]) -> None:
        """Publish answer text or a step, refreshing the turn's TTLs only when they are due: a
        turn's hundreds of deltas need not each rewrite them."""
        now = time.monotonic()
        refresh = now >= self._ttl_fresh_until
        self._bus.publish(self.ids, event, fields, self.fence, refresh_ttl=refresh)
        self._quiet_after = now + self._bus._window
        if refresh:
            self._ttl_fresh_until = now + self._bus.replay_log.ttl_seconds / 4

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
