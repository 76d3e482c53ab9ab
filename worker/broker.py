"""kombu's Redis transport, keeping one Redis client per channel instead of one per command.

kombu's Redis channel builds a new ``redis.Redis`` for every command it sends outside its
consumer (``Channel.conn_or_acquire``): acknowledgements, the unacked index, task events,
retries. Building one sets up its response callbacks, ~46 µs each here, about ten per turn:
3% of the gevent worker's samples at a thousand turns. A ``redis.Redis`` holds no connection of
its own, it borrows one from its pool per command, so one per channel serves every caller; it is
built again when kombu replaces the channel's pool (after a lost connection).

Used for ``redis://`` brokers only (``config/celery.py``): a ``rediss://`` URL keeps kombu's own
transport, whose TLS set-up hangs on the URL's scheme.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _kept_client: redis.Redis | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the consumer's own (BRPOP, pub/sub): kombu manages it
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._kept_client
        if client is None or client.connection_pool is not pool:
            client = self._kept_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


def restore_unacked(channel: kombu_redis.Channel, tag: str) -> bool:
    """Put one unacknowledged message back at the head of its queue, now, under a new
    delivery tag; False if it is no longer unacknowledged (acknowledged, or restored already).

    kombu restores a message only once the visibility timeout has passed; a takeover
    (worker/takeover.py) restores a dead worker's message at once. The new tag matters when
    the "dead" worker was only paused: its late acknowledgement of the old tag must not erase
    the record of the copy another worker now holds.
    """
    with channel.conn_or_acquire() as client, client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(channel.unacked_key)
                raw = pipe.hget(channel.unacked_key, tag)
                if raw is None:
                    pipe.reset()
                    return False
                message, exchange, routing_key = json.loads(raw)
                message.setdefault("properties", {})["delivery_tag"] = str(uuid.uuid4())
                pipe.multi()
                pipe.zrem(channel.unacked_index_key, tag)
                pipe.hdel(channel.unacked_key, tag)
                channel._do_restore_message(message, exchange, routing_key, pipe,
                                            leftmost=False)
                pipe.execute()
                return True
            except redis.WatchError:
                continue
