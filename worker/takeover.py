"""A dead worker's turns, taken over by a live one within seconds.

The broker alone brings a dead worker's turns back late: Redis keeps a delivered message
unacknowledged until its visibility timeout (900 s by default), and RabbitMQ returns it only
when the connection drops, never for a worker that is paused. The worker already proves it is
alive every fraction of a second: its supervisor renews an alive key of its own, beside the
running turns' conversation leases. This module goes by that key.

- Every worker process has a name (``WorkerName``: the Celery hostname, the pid and a random
  part, so two processes with one hostname never share one) and, on the bus's Redis, an
  *alive* key, renewed every quarter of its TTL in the same round trip as its leases that are
  due (a worker's leases live ten times that TTL: worker/locks.py).
- Every task message a worker holds (running, prefetched, waiting for its countdown) is in
  its *deliveries* hash from the moment Celery builds the request until the message is
  acknowledged or rejected, and every lease it holds is in its *leases* hash.
- A ``TakeoverWatcher`` thread in every worker looks for workers whose alive key lapsed. One
  Lua call claims a dead worker's deliveries (only one survivor gets them), frees its leases
  and forgets it. The deliveries move into the survivor's own hash until each is handed on,
  so a survivor that dies in the middle leaves the rest to the next one. Each claimed message
  goes back to the head of its queue (Redis: the original message, out of kombu's unacked
  hash, so it is not redelivered again at the visibility timeout; other brokers: a copy under
  the same task id). Whichever worker takes it finds the
  lease free and re-attaches to the turn's backend run (``worker.turn``), streaming on from
  what the client already has.

Exactly one copy streams: the lease is the fence. Every publish of a running turn carries its
lease token, and the publish script refuses it once the lease is another's
(``worker.publisher``); a copy that finds the lease held by its own message waits for it instead
of starting (``ConversationBusy``); a paused worker that wakes finds its leases gone and stops
its copies without publishing (``TurnTakenOver``). docs/faults.md has the measured times.

Redis Cluster: the claim touches a worker's keys and the leases it names, which may sit in
different slots; like the publish script, it needs one Redis (or hash tags) today.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from worker import metrics
from worker.writebehind import WriteBehind

log = logging.getLogger(__name__)

WORKERS_KEY = "agent-turn:workers"


def alive_key(worker: str) -> str:
    return f"agent-turn:worker:{worker}:alive"


def deliveries_key(worker: str) -> str:
    return f"agent-turn:worker:{worker}:deliveries"


def leases_key(worker: str) -> str:
    return f"agent-turn:worker:{worker}:leases"


_this_worker: str | None = None


def name_this_worker(hostname: str) -> str:
    """Name this process among workers (once, at start-up): unique even when processes share
    a hostname, so one process's proof of life never stands for another's."""
    global _this_worker
    _this_worker = f"{hostname}#{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return _this_worker


def this_worker() -> str | None:
    """This process's worker name; None outside a worker (a producer, a test's own services)."""
    return _this_worker


# KEYS: the workers set, the dead worker's alive key, its deliveries, its leases, the claiming
# worker's deliveries. ARGV: the dead worker's name. Returns the claimed deliveries as field,
# value pairs of the claimer's hash, or false if the worker is alive (or was claimed already).
# The deliveries move into the claimer's own hash rather than vanish: a claimer that dies
# before it has handed them all on leaves them there, where the next survivor finds them.
_CLAIM_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
redis.call('SREM', KEYS[1], ARGV[1])
local leases = redis.call('HGETALL', KEYS[4])
for i = 1, #leases, 2 do
  if redis.call('GET', leases[i]) == leases[i + 1] then redis.call('DEL', leases[i]) end
end
redis.call('DEL', KEYS[4])
local held = redis.call('HGETALL', KEYS[3])
local claimed = {}
for i = 1, #held, 2 do
  local field = held[i]
  if string.sub(field, 1, 11) ~= 'handing-on:' then
    field = 'handing-on:' .. ARGV[1] .. ':' .. field
  end
  redis.call('HSET', KEYS[5], field, held[i + 1])
  claimed[#claimed + 1] = field
  claimed[#claimed + 1] = held[i + 1]
end
redis.call('DEL', KEYS[3])
return claimed
"""


@dataclass(frozen=True, slots=True)
class Delivery:
    """A task message a worker holds, as much of it as handing it on needs."""

    tag: str
    task: str
    task_id: str
    exchange: str
    routing_key: str
    message_id: str | None = None
    retries: int = 0
    # Which broker holds the message (``broker_id``): only a worker of the same broker can
    # hand it on; the bus may serve workers of several.
    broker: str = ""
    # Only for brokers whose messages cannot be restored from Redis: what a copy needs.
    kwargs: dict[str, Any] | None = None

    def as_json(self) -> str:
        return json.dumps({"tag": self.tag, "task": self.task, "id": self.task_id,
                           "exchange": self.exchange, "routing_key": self.routing_key,
                           "message_id": self.message_id, "retries": self.retries,
                           "broker": self.broker, "kwargs": self.kwargs},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Delivery:
        data = json.loads(raw)
        return cls(tag=data["tag"], task=data["task"], task_id=data["id"],
                   exchange=data.get("exchange") or "", routing_key=data.get("routing_key") or "",
                   message_id=data.get("message_id"), retries=int(data.get("retries") or 0),
                   broker=data.get("broker") or "", kwargs=data.get("kwargs"))


def broker_id(broker_url: str) -> str:
    """A short name of a broker that does not show its credentials."""
    return hashlib.sha256(broker_url.encode()).hexdigest()[:16]


class DeliveryRegistry:
    """The deliveries this process holds, in its hash on the bus's Redis.

    A failed write costs only the fast takeover of that message (the broker's own redelivery
    still covers it), never the turn: errors are logged, not raised.

    ``hold``/``forget`` write at once. A worker uses ``hold_soon``/``forget_soon`` instead,
    written behind (worker/writebehind.py) by a writer ``start_writer`` starts: Celery builds
    each request on its consumer's path to the next message, where one round trip per message
    held a burst of a thousand turns to ~100 messages a second on a busy gevent worker. A turn
    waits for its own delivery to be written before it starts (``TurnRequest``), so a turn
    never runs unlisted.
    """

    def __init__(self, client: redis.Redis, worker: str) -> None:
        self._redis = client
        self.worker = worker
        self._key = deliveries_key(worker)
        # Tag -> the delivery to hold, or None to forget it.
        self._writes: WriteBehind[Delivery | None] = WriteBehind(self._send,
                                                                 name="delivery-registry")

    def hold(self, delivery: Delivery) -> None:
        try:
            self._redis.hset(self._key, delivery.tag, delivery.as_json())
        except redis.RedisError as exc:
            log.warning("could not register delivery %s: %s", delivery.task_id, exc)

    def forget(self, tag: str) -> None:
        try:
            self._redis.hdel(self._key, tag)
        except redis.RedisError as exc:
            log.warning("could not unregister delivery %s: %s", tag, exc)

    def hold_soon(self, delivery: Delivery) -> threading.Event:
        """List ``delivery`` with the writer's next round trip; the event is set once that
        round trip is over (it is logged if it failed), or once a forget overtook it."""
        return self._writes.put(delivery.tag, delivery)

    def forget_soon(self, tag: str) -> None:
        self._writes.put(tag, None)

    def start_writer(self) -> None:
        self._writes.start()

    def stop_writer(self, timeout: float = 5.0) -> None:
        """Send what is queued, then stop the writer; later writes go out at once."""
        self._writes.close(timeout)

    def write_pending(self) -> None:
        """Send every queued write in one round trip."""
        self._writes.flush()

    def _send(self, batch: dict[str, Delivery | None]) -> None:
        holds = {tag: d.as_json() for tag, d in batch.items() if d is not None}
        forgets = [tag for tag, d in batch.items() if d is None]
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                if holds:
                    pipe.hset(self._key, mapping=holds)
                if forgets:
                    pipe.hdel(self._key, *forgets)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not update %d deliveries: %s", len(batch), exc)


class TakeoverWatcher:
    """Finds workers whose alive key lapsed and hands their deliveries on, every ``interval``.

    ``hand_on`` puts one claimed delivery back on its queue (False: it was no longer there, or
    belongs to another broker); ``record`` notes a takeover on the turn's message row and says
    whether the turn was running (not merely queued).
    """

    def __init__(self, client: redis.Redis, worker: str, *, interval: float,
                 hand_on: Callable[[Delivery], bool],
                 record: Callable[[str, str], bool]) -> None:
        self._redis = client
        self.worker = worker
        self._interval = interval
        self._hand_on = hand_on
        self._record = record
        self._claim = client.register_script(_CLAIM_SCRIPT)
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="takeover-watcher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=self._interval + 5)

    def _run(self) -> None:
        while not self._closed.wait(self._interval):
            try:
                self.scan()
            except redis.RedisError as exc:
                log.warning("looking for dead workers failed (%s); trying again", exc)
            except Exception:
                log.exception("looking for dead workers failed")

    def scan(self) -> int:
        """Take over every dead worker's deliveries; return how many were handed on."""
        others = [name.decode() for name in self._redis.smembers(WORKERS_KEY)
                  if name.decode() != self.worker]
        if not others:
            return 0
        pipeline = self._redis.pipeline(transaction=False)
        for name in others:
            pipeline.exists(alive_key(name))
        dead = [name for name, alive in zip(others, pipeline.execute(), strict=True)
                if not alive]
        handed_on = 0
        own = deliveries_key(self.worker)
        for name in dead:
            claimed = self._claim(keys=[WORKERS_KEY, alive_key(name), deliveries_key(name),
                                        leases_key(name), own], args=[name]) or []
            for field, raw in zip(claimed[::2], claimed[1::2], strict=True):
                handed_on += self._take_over(name, Delivery.from_json(raw))
                # Handed on, or left to the broker's own redelivery: not this worker's to
                # hand on again. Until here a survivor of this one would have (and if this
                # fails, will: a second hand-on finds nothing to restore, or is a copy).
                try:
                    self._redis.hdel(own, field)
                except redis.RedisError as exc:
                    log.warning("could not mark task %s handed on: %s", field, exc)
        return handed_on

    def _take_over(self, dead: str, delivery: Delivery) -> int:
        started = time.monotonic()
        try:
            if not self._hand_on(delivery):
                log.info("task %s of dead worker %s was no longer waiting (acknowledged, or "
                         "held by another broker); nothing to hand on", delivery.task_id, dead)
                return 0
        except Exception:
            log.exception("could not hand on task %s of dead worker %s; the broker's own "
                          "redelivery is left", delivery.task_id, dead)
            return 0
        running = False
        if delivery.message_id is not None:
            try:
                running = self._record(delivery.message_id, dead)
            except Exception as exc:
                log.warning("could not record the takeover of turn %s: %s",
                            delivery.message_id, exc)
        kind = "running" if running else "queued"
        metrics.TAKEOVERS.labels(kind).inc()
        log.warning("takeover: %s turn %s (task %s) of dead worker %s handed on by worker %s "
                    "in %.0f ms", kind, delivery.message_id, delivery.task_id, dead,
                    self.worker, (time.monotonic() - started) * 1000)
        return 1
