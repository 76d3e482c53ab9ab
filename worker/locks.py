"""One turn at a time per conversation: a Redis lease with an owner token.

Two turns of one conversation must not run at once, or the second would start from a snapshot
the first is about to replace. The lease is ``SET key token NX PX ttl``: it expires by itself when
its holder dies, the holder renews it while the turn runs (``TurnSupervisor``), and only the
holder's token can renew or release it. Expiry can still let a paused holder overlap a newcomer;
the session store's snapshot version check is the fence that keeps such a late writer from
overwriting the newer snapshot.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass

import redis

from worker.errors import EventBusUnavailable

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Lease:
    key: str
    token: str


class ConversationLocks:
    def __init__(self, client: redis.Redis, *, ttl_seconds: float) -> None:
        self._redis = client
        self._ttl_ms = int(ttl_seconds * 1000)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @staticmethod
    def key_for(conversation_id: str) -> str:
        return f"agent-turn:conversation-lock:{conversation_id}"

    def acquire(self, conversation_id: str, holder: str) -> Lease | None:
        """The lease, or None while another turn of the conversation holds it."""
        lease = Lease(self.key_for(conversation_id), f"{holder}:{uuid.uuid4().hex}")
        try:
            taken = self._redis.set(lease.key, lease.token, nx=True, px=self._ttl_ms)
            if not taken:
                # The client resends a command whose reply was lost; if the first SET took
                # the lease, the resent one finds it held, by this very token.
                taken = self._redis.get(lease.key) == lease.token.encode()
        except redis.RedisError as exc:
            raise EventBusUnavailable(f"taking the conversation lock failed: {exc}") from exc
        return lease if taken else None

    def renew(self, leases: list[Lease]) -> list[Lease]:
        """Extend the leases in one round trip; return those that were lost."""
        if not leases:
            return []
        pipeline = self._redis.pipeline(transaction=False)
        for lease in leases:
            self._renew(keys=[lease.key], args=[lease.token, self._ttl_ms], client=pipeline)
        results = pipeline.execute()
        return [lease for lease, renewed in zip(leases, results, strict=True) if not renewed]

    def release(self, lease: Lease) -> None:
        # The lease expires by itself; a failed release only delays the next turn.
        with contextlib.suppress(redis.RedisError):
            self._release(keys=[lease.key], args=[lease.token])
