"""kombu's Redis transport, with two changes for a consumer that takes a thousand turns at once.

- One Redis client per channel instead of one per command. kombu's Redis channel builds a new
  ``redis.Redis`` for every command it sends outside its consumer (``Channel.conn_or_acquire``):
  acknowledgements, the unacked index, task events, retries. Building one sets up its response
  callbacks, ~46 µs each here, about ten per turn: 3% of the gevent worker's samples at a
  thousand turns. A ``redis.Redis`` holds no connection of its own, it borrows one from its pool
  per command, so one per channel serves every caller; it is built again when kombu replaces
  the channel's pool (after a lost connection).
- Unacked records written in batches (``QoS``). kombu records each received message in its
  unacked hash and index with a round trip on the consumer's path to the next message; on a
  busy gevent worker each round trip waits for a turn of the hub, and that held a burst's
  intake to a hundred messages a second (docs/performance.md). Here the consumer queues the
  record and a writer sends all queued records in one round trip (worker/writebehind.py);
  whatever reads or removes a record waits for its write first.

Used for ``redis://`` brokers only (``config/celery.py``): a ``rediss://`` URL keeps kombu's own
transport, whose TLS set-up hangs on the URL's scheme.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from worker.writebehind import WriteBehind

log = logging.getLogger(__name__)

# How long an acknowledgement, a restore or a turn waits for a message's unacked record to be
# written before it goes on without (the write failed, or Redis is that slow).
RECORD_WAIT_SECONDS = 5.0


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, except that a received message's unacked record is written behind
    (worker/writebehind.py), in batches, off the consumer's path.

    The record is what brings a message back after its worker died (the visibility timeout,
    or a takeover: ``restore_unacked``), so nothing may act on it before it exists: an
    acknowledgement, a rejection and a restore each wait for the write, and a turn does too
    before it starts (``written``, used by ``TurnRequest``). A failed write is logged; the
    message then has no record, as with kombu when its own write fails.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._records: WriteBehind[str] = WriteBehind(self._send, name="unacked-records")

    def append(self, message: Any, delivery_tag: str) -> None:
        virtual.QoS.append(self, message, delivery_tag)  # kombu's bookkeeping, not its write
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        self._records.start()
        self._records.put(delivery_tag, record)

    def written(self, delivery_tag: str) -> threading.Event | None:
        """Set once the message's record is written; None if no write is outstanding."""
        return self._records.written(delivery_tag)

    def wait_written(self, delivery_tag: str) -> None:
        event = self.written(delivery_tag)
        if event is not None and not event.wait(RECORD_WAIT_SECONDS):
            log.warning("unacked record of delivery %s not written after %.1f s; going on",
                        delivery_tag, RECORD_WAIT_SECONDS)

    def ack(self, delivery_tag: str) -> None:
        self.wait_written(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self.wait_written(delivery_tag)
        super().reject(delivery_tag, requeue=requeue)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        self.wait_written(tag)
        super().restore_by_tag(tag, client=client, leftmost=leftmost)

    def restore_unacked(self, client: Any = None) -> None:
        self.write_pending()
        super().restore_unacked(client)

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        """The channel's close (and the process's exit): every queued record is written and the
        writer ends, whether or not kombu then restores. A record still queued here belongs to
        a message already taken off its queue; unwritten, nothing would bring it back. A
        record queued after this is written at once."""
        self._records.close(RECORD_WAIT_SECONDS)
        return super().restore_unacked_once(stderr)

    def write_pending(self) -> None:
        """Send every queued record in one round trip."""
        self._records.flush()

    def _send(self, batch: dict[str, str]) -> None:
        """One transaction, as kombu's own write."""
        now = time.time()
        try:
            with self.channel.conn_or_acquire() as client, client.pipeline() as pipe:
                pipe.zadd(self.unacked_index_key, dict.fromkeys(batch, now))
                pipe.hset(self.unacked_key, mapping=batch)
                pipe.execute()
        except Exception as exc:
            log.error("could not record %d received messages as unacknowledged: %s",
                      len(batch), exc)


class Channel(kombu_redis.Channel):
    QoS = QoS
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
