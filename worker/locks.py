"""One turn at a time per conversation: a Redis lease with an owner token.

Two turns of one conversation must not run at once, or the second would start from a snapshot
the first is about to replace. The lease is ``SET key token NX PX ttl``: it expires by itself when
its holder dies, the holder renews it while the turn runs (``TurnSupervisor``), and only the
holder's token can renew or release it. Expiry can still let a paused holder overlap a newcomer;
the session store's snapshot version check is the fence that keeps such a late writer from
overwriting the newer snapshot.

In a worker (``serve_as``) a dead holder's leases are not left to expire: the worker's alive key,
renewed every quarter of its TTL, is the proof of life, and a survivor frees a dead worker's
leases as soon as that key lapses (worker/takeover.py). Its leases therefore live
``LEASE_TTL_FACTOR`` times longer and are renewed when a quarter of that has passed: the renewal
that runs every fraction of a second costs one write per worker, not one script per turn.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import NoScriptError

from worker.errors import EventBusUnavailable
from worker.takeover import WORKERS_KEY, alive_key, leases_key

# KEYS[1]: the lease; KEYS[2] (when given): the worker's leases hash. ARGV: token, TTL in ms.
# A resent acquire whose first reply was lost finds the lease held by its own token.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if KEYS[2] then redis.call('HSET', KEYS[2], KEYS[1], ARGV[1]) end
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if KEYS[2] then redis.call('HDEL', KEYS[2], KEYS[1]) end
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# A worker's lease TTL over its alive key's (the module docstring).
LEASE_TTL_FACTOR = 10


@dataclass(frozen=True, slots=True)
class Lease:
    key: str
    token: str


class ConversationLocks:
    def __init__(self, client: redis.Redis, *, ttl_seconds: float,
                 worker: str | None = None) -> None:
        self._redis = client
        self._alive_ttl_ms = self._ttl_ms = int(ttl_seconds * 1000)
        # In a worker, when each lease taken here is next due for renewal (monotonic seconds).
        self._due: dict[Lease, float] = {}
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._worker: str | None = None
        self._lease_list: list[str] = []
        if worker is not None:
            self.serve_as(worker)

    def serve_as(self, worker: str) -> None:
        """List this process's leases under its worker name, and prove it alive on renewal."""
        self._worker = worker
        self._lease_list = [leases_key(worker)]
        self._alive_key = alive_key(worker)
        self._ttl_ms = self._alive_ttl_ms * LEASE_TTL_FACTOR

    @staticmethod
    def key_for(conversation_id: str) -> str:
        return f"agent-turn:conversation-lock:{conversation_id}"

    def acquire(self, conversation_id: str, holder: str) -> Lease | None:
        """The lease, or None while another turn of the conversation holds it."""
        lease = Lease(self.key_for(conversation_id), f"{holder}:{uuid.uuid4().hex}")
        return lease if self._take(lease) else None

    def acquire_on(self, pipe: redis.client.Pipeline, conversation_id: str,
                   holder: str) -> Callable[[Any], Lease | None]:
        """Queue ``acquire`` on ``pipe`` (a turn's start sends it with its other commands);
        the returned function reads its reply from the pipeline's replies."""
        lease = Lease(self.key_for(conversation_id), f"{holder}:{uuid.uuid4().hex}")
        pipe.evalsha(self._acquire.sha, 1 + len(self._lease_list), lease.key,
                     *self._lease_list, lease.token, self._ttl_ms)

        def took(reply: Any) -> Lease | None:
            if isinstance(reply, NoScriptError):  # Redis restarted or its scripts were flushed
                return lease if self._take(lease) else None
            if isinstance(reply, Exception):
                raise EventBusUnavailable(f"taking the conversation lock failed: {reply}")
            if reply and self._worker is not None:
                self._due[lease] = self._next_due()
            return lease if reply else None

        return took

    def _take(self, lease: Lease) -> bool:
        try:
            taken = bool(self._acquire(keys=[lease.key, *self._lease_list],
                                       args=[lease.token, self._ttl_ms]))
        except redis.RedisError as exc:
            raise EventBusUnavailable(f"taking the conversation lock failed: {exc}") from exc
        if taken and self._worker is not None:
            self._due[lease] = self._next_due()
        return taken

    def _next_due(self) -> float:
        return time.monotonic() + self._ttl_ms / 4000

    def holding_message(self, conversation_id: str) -> str | None:
        """The message id whose turn holds the conversation's lease now, if any."""
        try:
            token = self._redis.get(self.key_for(conversation_id))
        except redis.RedisError as exc:
            raise EventBusUnavailable(f"reading the conversation lock failed: {exc}") from exc
        return token.decode().rpartition(":")[0] if token else None

    def holds(self, lease: Lease) -> bool:
        """Whether the lease is still this token's: the check before a turn's last writes."""
        try:
            return self._redis.get(lease.key) == lease.token.encode()
        except redis.RedisError as exc:
            raise EventBusUnavailable(f"reading the conversation lock failed: {exc}") from exc

    def renew(self, leases: list[Lease]) -> list[Lease]:
        """Extend the worker's alive key and those of the leases a quarter of whose TTL has
        passed, in one round trip; return those that had lapsed or are another's now."""
        now = time.monotonic()
        if self._worker is not None:
            leases = [lease for lease in leases if self._due.get(lease, 0.0) <= now]
        if not leases and self._worker is None:
            return []
        pipeline = self._redis.pipeline(transaction=False)
        if self._worker is not None:
            pipeline.set(self._alive_key, "1", px=self._alive_ttl_ms)
            pipeline.sadd(WORKERS_KEY, self._worker)
        for lease in leases:
            self._renew(keys=[lease.key], args=[lease.token, self._ttl_ms], client=pipeline)
        results = pipeline.execute()[2 if self._worker is not None else 0:]
        lost = []
        for lease, renewed in zip(leases, results, strict=True):
            if not renewed:
                lost.append(lease)
            elif self._worker is not None:
                self._due[lease] = self._next_due()
        return lost

    def retake(self, lease: Lease) -> bool:
        """Take a lapsed lease again with its own token, unless another holds it now."""
        return self._take(lease)

    def release(self, lease: Lease) -> None:
        # The lease expires by itself; a failed release only delays the next turn.
        self._due.pop(lease, None)
        with contextlib.suppress(redis.RedisError):
            self._release(keys=[lease.key, *self._lease_list], args=[lease.token])
