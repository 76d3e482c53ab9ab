"""The latency the SSE gateway adds to each event: ``python -m bench.gateway_latency``.

Starts a gateway process on a free port (against ``AGENT_TURN_PUBSUB_URL``, the local Redis by
default), opens ``--clients`` SSE streams of one turn through it and one plain pub/sub
subscriber to the same turn, then publishes ``--events`` messages with the worker's own
``EventBus`` (so each goes through the real Lua script: seq, log and PUBLISH) every
``--interval-ms``, each stamped with its send time. For every event and client it reports:

- publish → SSE client: what a browser sees, Redis included;
- publish → direct subscriber: the same path without the gateway;
- added by the gateway: SSE client receive time minus the direct subscriber's, per event.

All clocks are this process's ``time.time_ns()`` on one machine. The clients and the direct
subscriber share one event loop, so a busy loop delays both alike; the publisher is a thread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import redis
import redis.asyncio as aioredis

from config.settings import get_settings
from gateway.tokens import mint_stream_token
from worker.ownership import owner_fingerprint, owner_key
from worker.publisher import EventBus, ReplayLogPolicy, TurnIds

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_gateway(pubsub_url: str, secret: str, port: int, log_path: Path
                   ) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AGENT_TURN_PUBSUB_URL": pubsub_url, "AGENT_TURN_GATEWAY_SECRET": secret,
           "AGENT_TURN_GATEWAY_PORT": str(port), "PYTHONPATH": str(ROOT)}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the gateway exited:\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"the gateway did not start:\n{log_path.read_text()[-2000:]}")


async def _sse_client(port: int, path: str, received: dict[int, int],
                      connected: asyncio.Event) -> None:
    """A lean SSE client on a bare socket, so that the client side adds as little as it can.

    uvicorn sends each frame as one HTTP chunk, so the frame's lines arrive whole between the
    chunk-size lines; only ``data:`` lines matter here.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 "Accept: text/event-stream\r\n\r\n".encode())
    status = await reader.readline()
    if b" 200 " not in status:
        raise SystemExit(f"the gateway answered {status!r}")
    while await reader.readline() not in (b"\r\n", b""):
        pass
    connected.set()
    try:
        while line := await reader.readline():
            if line.startswith(b"data: "):
                now = time.time_ns()
                event = json.loads(line[6:])
                received[event["seq"]] = now
                if event["event"] == "message_end":
                    return
    finally:
        writer.close()


async def _direct_subscriber(pubsub_url: str, channel: str, received: dict[int, int],
                             subscribed: asyncio.Event) -> None:
    client = aioredis.Redis.from_url(pubsub_url)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    await pubsub.get_message(timeout=5)
    subscribed.set()
    try:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30)
            if message is None:
                raise SystemExit("the direct subscriber heard nothing for 30 s")
            now = time.time_ns()
            event = json.loads(message["data"])
            received[event["seq"]] = now
            if event["event"] == "message_end":
                return
    finally:
        await pubsub.aclose()
        await client.aclose()


def _publish(pubsub_url: str, ids: TurnIds, events: int, interval: float,
             sent: dict[int, int]) -> None:
    settings = get_settings()
    bus = EventBus(redis.Redis.from_url(pubsub_url), channel_for=settings.channel_for,
                   replay_log=ReplayLogPolicy(ttl_seconds=600, ttl_after_end_seconds=60,
                                              max_events=events + 10))
    next_at = time.monotonic()
    for _ in range(events):
        sent_ns = time.time_ns()
        seq = bus.publish(ids, "agent_message", {"answer": "token ", "sent_ns": sent_ns})
        sent[seq] = sent_ns
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    sent[bus.publish(ids, "message_end", {"answer": "", "metadata": {"usage": None}})] = (
        time.time_ns())
    bus.redis.close()


def _summary(samples_ns: list[int]) -> str:
    ordered = sorted(samples_ns)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"median {statistics.median(ordered) / 1e6:7.3f} ms   p99 {p99 / 1e6:7.3f} ms   "
            f"max {ordered[-1] / 1e6:7.3f} ms   n={len(ordered)}")


async def _run(arguments: argparse.Namespace, url: str, token: str, ids: TurnIds,
               pubsub_url: str) -> dict[str, list[int]]:
    settings = get_settings()
    direct: dict[int, int] = {}
    per_client: list[dict[int, int]] = [{} for _ in range(arguments.clients)]
    connected = [asyncio.Event() for _ in range(arguments.clients)]
    subscribed = asyncio.Event()
    port = int(url.split(":")[2].split("/")[0])
    path = url[url.index("/", len("http://")):] + f"?token={token}"
    tasks = [asyncio.create_task(_sse_client(port, path, received, ready))
             for received, ready in zip(per_client, connected, strict=True)]
    tasks.append(asyncio.create_task(_direct_subscriber(
        pubsub_url, settings.channel_for(ids.message_id), direct, subscribed)))
    await asyncio.wait_for(asyncio.gather(subscribed.wait(),
                                          *(ready.wait() for ready in connected)), 30)
    sent: dict[int, int] = {}
    await asyncio.to_thread(_publish, pubsub_url, ids, arguments.events,
                            arguments.interval_ms / 1000, sent)
    await asyncio.wait_for(asyncio.gather(*tasks), 60)

    measured = [seq for seq in sorted(sent) if seq > arguments.warmup and seq in direct]
    samples: dict[str, list[int]] = {"through the gateway": [], "direct pub/sub": [],
                                     "added by the gateway": []}
    for seq in measured:
        samples["direct pub/sub"].append(direct[seq] - sent[seq])
        for received in per_client:
            samples["through the gateway"].append(received[seq] - sent[seq])
            samples["added by the gateway"].append(received[seq] - direct[seq])
    lost = sum(len(sent) - len(received) for received in per_client)
    if lost:
        raise SystemExit(f"{lost} events never reached an SSE client")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_latency",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--warmup", type=int, default=50, help="first events not measured")
    parser.add_argument("--pubsub-url", default=get_settings().pubsub_url)
    arguments = parser.parse_args()

    secret = secrets.token_hex(16)
    port = _free_port()
    log_path = ROOT / "var" / "bench-gateway.log"
    log_path.parent.mkdir(exist_ok=True)
    ids = TurnIds(task_id=str(uuid.uuid4()), message_id=f"bench-{uuid.uuid4().hex[:12]}",
                  conversation_id=str(uuid.uuid4()))
    owner = owner_fingerprint("bench", "bench", "bench")
    token = mint_stream_token(secret.encode(), message_id=ids.message_id, user_id="bench",
                              owner=owner, ttl_seconds=3600)
    # Recorded as the worker records a turn's owner before its first event, so that the
    # gateway relays the bench's turn to the token's owner from the start.
    recorder = redis.Redis.from_url(arguments.pubsub_url)
    recorder.set(owner_key(ids.message_id), owner, ex=3600)
    recorder.close()
    url = f"http://127.0.0.1:{port}/v1/turns/{ids.message_id}/events"
    gateway = _start_gateway(arguments.pubsub_url, secret, port, log_path)
    try:
        samples = asyncio.run(_run(arguments, url, token, ids, arguments.pubsub_url))
    finally:
        gateway.terminate()
        try:
            gateway.wait(timeout=10)
        except subprocess.TimeoutExpired:
            gateway.kill()
    print(f"{arguments.clients} SSE clients + 1 direct subscriber, {arguments.events} events "
          f"every {arguments.interval_ms:g} ms (first {arguments.warmup} not measured)")
    for name, values in samples.items():
        print(f"  {name:<22} {_summary(values)}")


if __name__ == "__main__":
    main()
