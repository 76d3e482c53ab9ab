"""The relay floor: the least any worker could add, measured on this machine.

The direct read (``read_direct``) has one process between the stub and the stamp. A worker's
path has three: the worker, Redis and the subscriber, each of which must wake for every event.
This relay is that path with no worker logic in it: one asyncio process that creates the runs,
reads their SSE streams on plain sockets and writes each delta to the turn's channel as a
``PUBLISH`` on one Redis connection, without waiting for the reply (a reader task drains them).
No task queue, no database, no seq counter or replay log, no coalescing. What the subscriber
sees from it is what the hops themselves cost, so the worker's own share is its latency minus
this one's, not minus the direct read's.

``python -m bench.relay --stub URL --redis-url URL --channel-prefix P --bodies FILE`` reads
``{message_id: run request}`` from FILE, relays every run at once and exits when all have ended
(``bench.load`` runs it as the ``relay`` phase).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.readers import BROKEN_STREAM, RUN_ENDS, open_run_stream, run_events, staggered


def _publish_command(channel: str, message: dict[str, Any]) -> bytes:
    payload = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
    name = channel.encode()
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(name), name, len(payload), payload)


class Relay:
    """Every run's deltas onto its channel, as the worker's would be, with nothing else done."""

    def __init__(self, stub_url: str, redis_url: str, channel_prefix: str) -> None:
        stub, bus = urlsplit(stub_url), urlsplit(redis_url)
        self._stub = (stub.hostname or "127.0.0.1", stub.port or 80)
        self._redis = (bus.hostname or "127.0.0.1", bus.port or 6379)
        self._prefix = channel_prefix
        self._writer: asyncio.StreamWriter | None = None
        self.events = 0
        self.confirmed = 0  # publishes Redis has answered
        self._replied = asyncio.Event()  # set by each reply; the end waits for the last one
        self.failures: list[str] = []

    async def run(self, bodies: dict[str, dict[str, object]], *, stagger: float = 0.0) -> None:
        reader, self._writer = await asyncio.open_connection(*self._redis)
        drain = asyncio.create_task(self._drain_replies(reader))
        try:
            await asyncio.gather(*(self._relay(*run) for run in staggered(bodies, stagger)))
            # Written is not sent: the last runs' ends may still sit in the transport's buffer,
            # and closing the loop would drop them. Redis's reply to each is the proof it ran.
            async with asyncio.timeout(30):
                while self.confirmed < self.events and not drain.done():
                    self._replied.clear()
                    await self._replied.wait()
        finally:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def _drain_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while await reader.readline():
                self.confirmed += 1
                self._replied.set()
        finally:
            self._replied.set()

    def _publish(self, key: str, message: dict[str, Any]) -> None:
        assert self._writer is not None
        self._writer.write(_publish_command(self._prefix + key, message))
        self.events += 1

    async def _relay(self, key: str, body: dict[str, object], delay: float) -> None:
        await asyncio.sleep(delay)
        seq, text = 0, []

        def publish(event: str, **fields: Any) -> None:
            nonlocal seq
            seq += 1
            self._publish(key, {"event": event, "message_id": key, **fields, "seq": seq})

        writer = None
        try:
            _, reader, writer = await open_run_stream(*self._stub, body)
            async for _, envelope in run_events(reader):
                delta = envelope.get("agent_message_delta")
                if delta:
                    text.append(delta)
                    publish("agent_message", answer=delta)
                kind = envelope.get("type")
                if kind == "run_succeeded":
                    publish("message_end", answer="".join(text))
                elif kind in RUN_ENDS:
                    publish("error", code=kind, message=str(envelope.get("data")))
        except BROKEN_STREAM as exc:
            self.failures.append(f"{key}: {type(exc).__name__}: {exc}")
            publish("error", code="relay", message=f"{type(exc).__name__}: {exc}")
        finally:
            if writer is not None:
                writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--stub", required=True, help="the stub backend's URL")
    parser.add_argument("--redis-url", required=True, help="the Redis to publish on")
    parser.add_argument("--channel-prefix", required=True)
    parser.add_argument("--stagger", type=float, default=0.0,
                        help="seconds over which the runs' starts are spread (bench.readers)")
    parser.add_argument("--bodies", type=Path, required=True,
                        help="JSON object: message id → run request")
    args = parser.parse_args(argv)
    bodies = json.loads(args.bodies.read_text())
    if not isinstance(bodies, dict):
        parser.error("--bodies must hold a JSON object of message id → run request")
    relay = Relay(args.stub, args.redis_url, args.channel_prefix)
    print(f"relaying {len(bodies)} runs", flush=True)
    asyncio.run(relay.run(bodies, stagger=args.stagger))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"relayed {len(bodies)} runs, {relay.events} events ({relay.confirmed} confirmed by "
          f"Redis), {len(relay.failures)} failed, "
          f"cpu_seconds={usage.ru_utime + usage.ru_stime:.4f}", flush=True)
    for failure in relay.failures[:10]:
        print(f"failed: {failure}", flush=True)
    return 1 if relay.failures or relay.confirmed < relay.events else 0


if __name__ == "__main__":
    sys.exit(main())
