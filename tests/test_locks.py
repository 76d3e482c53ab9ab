"""The conversation lease on real Redis: one holder, owner-only renew and release, expiry."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from tests.conftest import REDIS_PORT, TcpProxy, retrying_redis_through, wait_until
from worker.locks import ConversationLocks, Lease


@pytest.fixture
def locks(redis_client: redis.Redis) -> ConversationLocks:
    return ConversationLocks(redis_client, ttl_seconds=30)


def new_conversation() -> str:
    return f"conv-{uuid.uuid4().hex[:12]}"


def test_a_second_turn_of_the_conversation_does_not_get_the_lease(
    locks: ConversationLocks,
) -> None:
    conversation = new_conversation()

    first = locks.acquire(conversation, "msg-1")
    second = locks.acquire(conversation, "msg-2")

    assert first is not None and second is None
    assert locks.acquire(new_conversation(), "msg-3") is not None, "other conversations run"


def test_only_the_holder_releases_the_lease(locks: ConversationLocks,
                                            redis_client: redis.Redis) -> None:
    conversation = new_conversation()
    held = locks.acquire(conversation, "msg-1")
    assert held is not None
    impostor = type(held)(held.key, "msg-2:not-the-token")

    locks.release(impostor)
    assert locks.acquire(conversation, "msg-2") is None
    locks.release(held)

    assert redis_client.exists(held.key) == 0
    assert locks.acquire(conversation, "msg-2") is not None


def test_renew_reports_the_leases_that_were_lost(locks: ConversationLocks,
                                                 redis_client: redis.Redis) -> None:
    kept = locks.acquire(new_conversation(), "msg-1")
    lost = locks.acquire(new_conversation(), "msg-2")
    assert kept is not None and lost is not None
    redis_client.delete(lost.key)  # expired while its holder was paused

    assert locks.renew([kept, lost]) == [lost]
    assert redis_client.pttl(kept.key) > 25_000
    assert locks.retake(lost) and redis_client.get(lost.key) == lost.token.encode()
    redis_client.set(kept.key, "msg-9:someone-else")
    assert not locks.retake(kept), "a lease another holds now is not taken back"


def a_worker_holding_a_lease(redis_client: redis.Redis, *, ttl_seconds: float
                             ) -> tuple[str, ConversationLocks, Lease]:
    """A worker's locks, named as a worker names them, holding one conversation's lease."""
    worker = f"test-worker-{uuid.uuid4().hex[:6]}"
    locks = ConversationLocks(redis_client, ttl_seconds=ttl_seconds, worker=worker)
    lease = locks.acquire(new_conversation(), "msg-1")
    assert lease is not None
    return worker, locks, lease


def test_a_workers_leases_are_listed_under_its_name_and_renewal_proves_it_alive(
    redis_client: redis.Redis,
) -> None:
    from worker.takeover import WORKERS_KEY, alive_key, leases_key

    worker, locks, lease = a_worker_holding_a_lease(redis_client, ttl_seconds=30)
    assert redis_client.hget(leases_key(worker), lease.key) == lease.token.encode()

    assert locks.renew([lease]) == []
    assert redis_client.pttl(alive_key(worker)) > 25_000
    assert redis_client.sismember(WORKERS_KEY, worker)
    locks.release(lease)
    assert not redis_client.hexists(leases_key(worker), lease.key)
    redis_client.srem(WORKERS_KEY, worker)
    redis_client.delete(alive_key(worker))


def test_a_lease_whose_holder_died_expires(redis_client: redis.Redis) -> None:
    locks = ConversationLocks(redis_client, ttl_seconds=0.2)
    conversation = new_conversation()
    assert locks.acquire(conversation, "msg-1") is not None  # never released

    wait_until(lambda: locks.acquire(conversation, "msg-2") is not None, timeout=5)


def test_an_acquire_whose_reply_was_lost_still_holds_the_lease(
    redis_client: redis.Redis,
) -> None:
    proxy = TcpProxy(REDIS_PORT)
    client = retrying_redis_through(proxy)
    locks = ConversationLocks(client, ttl_seconds=30)
    conversation = new_conversation()
    try:
        client.ping()
        proxy.lose_next_reply()
        lease = locks.acquire(conversation, "msg-1")  # SET ran; its reply was lost; resent
    finally:
        client.close()
        proxy.close()

    assert lease is not None, "the turn that took the lease must not wait for itself"
    assert redis_client.get(lease.key) == lease.token.encode()
    assert ConversationLocks(redis_client, ttl_seconds=30).acquire(conversation, "msg-2") is None


def test_a_workers_renewal_proves_it_alive_each_time_but_renews_a_lease_only_when_due(
    redis_client: redis.Redis,
) -> None:
    from worker.locks import LEASE_TTL_FACTOR
    from worker.takeover import WORKERS_KEY, alive_key

    worker, locks, lease = a_worker_holding_a_lease(redis_client, ttl_seconds=0.2)
    taken = time.monotonic()
    assert 0 < redis_client.pttl(lease.key) <= 200 * LEASE_TTL_FACTOR

    redis_client.set(lease.key, "msg-9:someone-else")  # taken over, say
    assert locks.renew([lease]) == [], "not due: not even read"
    assert 0 < redis_client.pttl(alive_key(worker)) <= 200
    wait_until(lambda: time.monotonic() >= taken + 0.2 * LEASE_TTL_FACTOR / 4, timeout=2)
    assert locks.renew([lease]) == [lease], "due: found in another's hands"
    redis_client.srem(WORKERS_KEY, worker)
