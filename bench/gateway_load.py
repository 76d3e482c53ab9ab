"""``python -m bench.gateway_load``: the gateway under many turns at once.

N SSE streams, each on a turn of its own, through one gateway (``--workers`` processes of it,
as uvicorn runs it in production), while a publisher sends ``--rate`` events per second on each
turn for ``--seconds``, then its ``message_end``. Everything runs as separate processes on this
machine, against a Redis of its own (so nothing else shares its pub/sub buffers):

- the **publisher** calls the worker's own publish script (``worker/publisher.py``: seq, replay
  log, PUBLISH), pipelined, each turn on a random phase within its interval, so it costs little
  and spreads its load as independent turns do;
- the **clients** (``--client-procs`` processes) speak HTTP/1.1 on raw asyncio sockets and only
  split frames and read two numbers from each, so they are not the limit either.

Reported: events delivered of those expected, streams complete (every seq once, in order, then
the end), latency publish → client (p50 / p99 / max), the gateway's CPU per delivered frame
and per second, its RSS per open stream, and the publisher's and clients' CPU beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import random
import re
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import redis

from bench.procs import ROOT, free_port, start_child, start_private_redis
from gateway.tokens import mint_stream_token
from worker.ownership import owner_fingerprint, owner_key
from worker.publisher import (
    _PUBLISH_SCRIPT,
    replay_log_key,
    seq_key,
)

SECRET = "gateway-load-bench-secret"
OWNER = owner_fingerprint("bench", "bench", "bench")
_SEQ = re.compile(rb'"seq":(\d+)')
_SENT = re.compile(rb'"t":(\d+)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=5.0, help="events per second per turn")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="how long a turn streams, on average (each from 0.5x to 1.5x)")
    parser.add_argument("--workers", type=int, default=1, help="gateway processes")
    parser.add_argument("--client-procs", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        result = run(Path(scratch), args)
    print_result(result)
    if args.json:
        print(json.dumps(result))


def run(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    redis_child, redis_port = start_private_redis(folder)
    pubsub_url = f"redis://127.0.0.1:{redis_port}/0"
    port = free_port()
    env = {"AGENT_TURN_PUBSUB_URL": pubsub_url, "AGENT_TURN_GATEWAY_SECRET": SECRET,
           "AGENT_TURN_GATEWAY_PORT": str(port),
           "AGENT_TURN_GATEWAY_FIRST_EVENT_TIMEOUT_SECONDS": "600"}
    gateway = start_child("gateway", [sys.executable, "-m", "gateway", "--workers",
                                      str(args.workers)], folder / "gateway.log",
                          lambda log: log.count("Application startup complete") >= args.workers,
                          env=env)
    try:
        turns = [f"msg-{uuid.uuid4().hex[:16]}" for _ in range(args.streams)]
        bus = redis.Redis.from_url(pubsub_url)
        pipeline = bus.pipeline(transaction=False)
        for message_id in turns:
            pipeline.set(owner_key(message_id), OWNER, ex=3600)
        pipeline.execute()
        gateway_tree = _tree(gateway.pid)
        rss_before = sum(p.memory_info().rss for p in gateway_tree)
        shares = [turns[n::args.client_procs] for n in range(args.client_procs)]
        context = multiprocessing.get_context("spawn")
        opened = context.Barrier(args.client_procs + 1)
        results = context.Queue()
        clients = [context.Process(target=_client_process, daemon=True,
                                   args=(share, port, opened, results, args.seconds + 120))
                   for share in shares]
        for client in clients:
            client.start()
        opened.wait(timeout=120)
        time.sleep(0.5)
        gateway_tree = _tree(gateway.pid)
        rss_open = sum(p.memory_info().rss for p in gateway_tree)
        cpu_before = _cpu(gateway_tree)
        publisher = context.Process(target=_publish, daemon=True,
                                    args=(pubsub_url, turns, args.rate, args.seconds, results))
        backlog = _BacklogSampler(bus)
        backlog.start()
        publisher.start()
        publisher.join(args.seconds + 120)
        collected = [results.get(timeout=args.seconds + 180) for _ in range(args.client_procs + 1)]
        cpu_after = _cpu(gateway_tree)
        for client in clients:
            client.join(10)
        backlog.stop()
        health = _health(port)
        limit = bus.config_get("client-output-buffer-limit")["client-output-buffer-limit"]
        connections_lost = gateway.log_text().count("pub/sub connection lost")
    finally:
        gateway.stop()
        redis_child.stop()
    published = next(r for r in collected if r["kind"] == "publisher")
    client_results = [r for r in collected if r["kind"] == "clients"]
    latencies = sorted(x for r in client_results for x in r["latencies_ms"])
    delivered = sum(r["frames"] for r in client_results)
    expected = published["events"]
    gateway_cpu = cpu_after - cpu_before
    return {
        "streams": args.streams, "rate": args.rate, "seconds": args.seconds,
        "workers": args.workers, "expected": expected, "delivered": delivered,
        "complete": sum(r["complete"] for r in client_results),
        "latency_p50_ms": _percentile(latencies, 0.50),
        "latency_p99_ms": _percentile(latencies, 0.99),
        "latency_max_ms": round(latencies[-1], 1) if latencies else None,
        "gateway_cpu_s": round(gateway_cpu, 2),
        "gateway_us_per_frame": round(gateway_cpu / delivered * 1e6, 1) if delivered else None,
        "frames_per_s": round(delivered / published["wall_s"]),
        "rss_per_stream_kb": round((rss_open - rss_before) / args.streams / 1024, 1),
        "publisher_cpu_s": round(published["cpu_s"], 2),
        "clients_cpu_s": round(sum(r["cpu_s"] for r in client_results), 2),
        "cut_streams": health.get("cut_streams"), "writes": health.get("writes"),
        "direct_writes": health.get("direct_writes"),
        "pubsub_output_buffer_peak_kb": round(backlog.peak / 1024, 1),
        "pubsub_output_buffer_limit": _pubsub_limit(limit),
        "pubsub_connections_lost": connections_lost,
        "frames_sent": health.get("frames_sent"),
        "worst_ms_by_second": {second: round(max(r["worst_by_second"].get(second, 0)
                                                 for r in client_results), 1)
                               for second in sorted({s for r in client_results
                                                     for s in r["worst_by_second"]})},
    }


def _pubsub_limit(limits: str) -> str:
    """The ``pubsub`` class of ``client-output-buffer-limit`` ("normal 0 0 0 slave ... pubsub
    33554432 8388608 60"): hard limit, soft limit, soft seconds."""
    words = limits.split()
    return " ".join(words[words.index("pubsub"):][:4]) if "pubsub" in words else limits


class _BacklogSampler(threading.Thread):
    """The most Redis held, at any 250 ms sample, in the output buffers of the gateway's pub/sub
    connections: what the gateway has not read yet. Redis closes a connection whose buffer
    passes ``client-output-buffer-limit pubsub`` (32 MB, or 8 MB for 60 s, by default)."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(name="backlog-sampler", daemon=True)
        self._client = client
        self._done = threading.Event()
        self.peak = 0

    def run(self) -> None:
        while not self._done.wait(0.25):
            held = sum(int(entry.get("omem", 0)) for entry in self._client.client_list(
                _type="pubsub") if str(entry.get("name", "")).startswith(
                "agent-turn-gateway-pubsub"))
            self.peak = max(self.peak, held)

    def stop(self) -> None:
        self._done.set()
        self.join(5)


def print_result(r: dict[str, Any]) -> None:
    print(f"{r['streams']} streams x {r['rate']:g} events/s for {r['seconds']:g} s, "
          f"{r['workers']} gateway process(es)")
    print("| delivered / expected | complete streams | latency p50 / p99 / max, ms | "
          "gateway CPU per frame | frames/s | gateway RSS per stream | publisher CPU | "
          "clients CPU | cut | pub/sub backlog in Redis, peak | pub/sub connections lost |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {r['delivered']:,} / {r['expected']:,} | {r['complete']:,} / {r['streams']:,} | "
          f"{r['latency_p50_ms']} / {r['latency_p99_ms']} / {r['latency_max_ms']} | "
          f"{r['gateway_us_per_frame']} µs ({r['gateway_cpu_s']} s) | {r['frames_per_s']:,} | "
          f"{r['rss_per_stream_kb']} KB | {r['publisher_cpu_s']} s | {r['clients_cpu_s']} s | "
          f"{r['cut_streams']} | {r['pubsub_output_buffer_peak_kb']:,} KB (limit "
          f"{r['pubsub_output_buffer_limit']}) | {r['pubsub_connections_lost']} |")


def _tree(pid: int) -> list[psutil.Process]:
    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def _health(port: int) -> dict[str, Any]:
    import httpx

    try:
        return dict(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json())
    except Exception:
        return {}


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 1)


# The publisher ------------------------------------------------------------------------------


def _publish(url: str, turns: list[str], rate: float, seconds: float, results: Any) -> None:
    """Each turn's events on its own schedule (a random phase in its interval, a length drawn
    between half and one and a half ``seconds``, so that turns end over time as real ones do),
    due events sent together in pipelined script calls; then each turn's end."""
    gc.disable()  # as the clients: its pauses would show as the gateway's latency
    client = redis.Redis.from_url(url)
    script = client.register_script(_PUBLISH_SCRIPT)
    script.sha = client.script_load(_PUBLISH_SCRIPT)
    interval = 1.0 / rate
    start = time.monotonic() + 0.2
    lengths = {message_id: max(1, round(seconds * rate * random.uniform(0.5, 1.5)))
               for message_id in turns}
    schedule = sorted((start + random.uniform(0, interval) + k * interval, k, message_id)
                      for message_id in turns for k in range(lengths[message_id] + 1))
    cpu_start = time.process_time()
    sent = 0
    index = 0
    numbers = iter(range(1, 10**9))
    while index < len(schedule):
        now = time.monotonic()
        due_until = index
        while due_until < len(schedule) and schedule[due_until][0] <= now:
            due_until += 1
        if due_until == index:
            time.sleep(max(0.0, min(0.005, schedule[index][0] - now)))
            continue
        pipeline = client.pipeline(transaction=False)
        for _, k, message_id in schedule[index:due_until]:
            event = "message_end" if k == lengths[message_id] else "agent_message"
            body = (f'{{"event":"{event}","id":"{message_id}","message_id":"{message_id}",'
                    f'"t":{time.time_ns()},"answer":"token {k} "')
            keys = [seq_key(message_id), replay_log_key(message_id)]
            args = [f"agent-turn:events:{message_id}", body, 3600,
                    300 if event == "message_end" else 3600 if k == 1 else "", 100_000,
                    f"bench:{next(numbers)}", "", "o" if event == "message_end" else "t", ""]
            pipeline.evalsha(script.sha, len(keys), *keys, *args)
        pipeline.execute()
        sent += due_until - index
        index = due_until
    results.put({"kind": "publisher", "events": sent, "wall_s": time.monotonic() - start,
                 "cpu_s": time.process_time() - cpu_start})


# The clients --------------------------------------------------------------------------------


def _client_process(turns: list[str], port: int, opened: Any, results: Any,
                    timeout: float) -> None:
    # No collector pauses in the instruments: a pause here would be charged to the gateway.
    gc.disable()
    asyncio.run(_clients(turns, port, opened, results, timeout))


async def _clients(turns: list[str], port: int, opened: Any, results: Any,
                   timeout: float) -> None:
    latencies: list[float] = []
    worst: dict[int, float] = {}  # second of the run -> its worst latency, ms
    started_ns = time.time_ns()
    counts = {"frames": 0, "complete": 0}
    ready = 0
    all_open = asyncio.Event()

    async def stream(message_id: str) -> None:
        nonlocal ready
        token = mint_stream_token(SECRET.encode(), message_id=message_id, user_id="bench",
                                  owner=OWNER, ttl_seconds=3600)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        writer.write(f"GET /v1/turns/{message_id}/events?token={token} HTTP/1.1\r\n"
                     f"Host: bench\r\nAccept: text/event-stream\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise SystemExit(f"stream refused: {head[:200]!r}")
        ready += 1
        if ready == len(turns):
            all_open.set()
        buffer = b""
        expected_seq = 1
        in_order = True
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            now = time.time_ns()
            buffer += chunk
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                sent = _SENT.search(frame)
                if sent is None:
                    continue  # chunk sizes, pings
                seq = int(_SEQ.search(frame).group(1))  # type: ignore[union-attr]
                in_order = in_order and seq == expected_seq
                expected_seq = seq + 1
                counts["frames"] += 1
                if counts["frames"] % 4 == 0:
                    latency = (now - int(sent.group(1))) / 1e6
                    latencies.append(latency)
                    second = int((now - started_ns) / 1e9)
                    worst[second] = max(worst.get(second, 0.0), latency)
                if b'"event":"message_end"' in frame:
                    counts["complete"] += in_order
                    writer.close()
                    return
        writer.close()

    cpu_start = time.process_time()
    tasks = [asyncio.create_task(stream(message_id)) for message_id in turns]
    await asyncio.wait_for(all_open.wait(), 120)
    await asyncio.get_running_loop().run_in_executor(None, opened.wait, 120)
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    results.put({"kind": "clients", "frames": counts["frames"], "complete": counts["complete"],
                 "latencies_ms": latencies, "cpu_s": time.process_time() - cpu_start,
                 "worst_by_second": worst})


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    main()
