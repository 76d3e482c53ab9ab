"""``python -m bench.open_loop``: turns arriving as users send them, time to first chunk as a
browser sees it.

The other scenarios start N turns at once. Users do not: they arrive one by one, at a rate. Here
turns arrive as a Poisson process (``--rate`` per second for ``--seconds``, exponential gaps from
a fixed seed, so both phases get the same arrivals) and each is followed the way a browser follows
it:

1. **floor** — at each arrival the driver creates the run on the stub itself and reads its SSE
   stream: time to first token = first answer event off the socket minus arrival.
2. **worker** — at each arrival the driver enqueues the turn with ``submit_turn`` (as a web tier
   does), then opens the turn's SSE stream on a gateway process (``python -m gateway``, the
   Procfile's) with the token ``submit_turn`` returned: time to first chunk = first
   ``agent_message`` frame at that client minus the moment before the enqueue. Every stream is
   checked: seqs without a gap, one ``message_end``, whose answer is the text the chunks built.

"Added over the floor" is the worker's p50 minus the floor's p50, and its p99 minus the floor's
p99: what Celery, the worker, Redis and the gateway add to what a client reading the model
directly gets. Everything runs on one private Redis (``INFO commandstats`` and CPU see only this
benchmark), a SQLite file and ports of its own, in a temporary folder (``--keep`` keeps it).
The stub and the driver run without collector pauses; worker and gateway as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import random
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import redis
from celery import Celery

from bench.load import _reset_stub, run_requests, turn_fields
from bench.metrics import TurnTrace, max_overlap, percentile
from bench.probes import ProcessProbe, command_stats, server_cpu_seconds
from bench.procs import (
    Child,
    free_port,
    start_child,
    start_private_redis,
    start_stub,
    start_worker,
)
from bench.readers import BROKEN_STREAM, StreamRefused, follow_stream, open_run_stream
from config.celery import celery_config
from config.settings import Settings
from worker.client import submit_turn

SECRET = "bench-open-loop-" + uuid.uuid4().hex


@dataclass
class Turn:
    """One arrival and what its reader saw."""

    key: str
    due: float  # seconds after the phase's start
    arrived_at: float = math.nan  # time.time() when the driver acted on it
    first_chunk_at: float | None = None
    end_at: float | None = None
    chunks: int = 0
    problems: list[str] = field(default_factory=list)
    ok: bool = False

    @property
    def first_chunk(self) -> float | None:
        return None if self.first_chunk_at is None else self.first_chunk_at - self.arrived_at


@dataclass
class OpenLoopPhase:
    reader: str
    turns: list[Turn]
    cpu: dict[str, float]
    commands: int
    wall_seconds: float

    @property
    def first_chunks(self) -> list[float]:
        return [t.first_chunk for t in self.turns if t.ok and t.first_chunk is not None]

    def summary(self) -> dict[str, Any]:
        values = self.first_chunks
        return {
            "reader": self.reader, "arrived": len(self.turns),
            "ok": sum(t.ok for t in self.turns), "wall_seconds": self.wall_seconds,
            "first_chunk_ms": {name: percentile(values, q) * 1000
                               for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
            | {"max": max(values, default=math.nan) * 1000},
            "in_flight_peak": max_overlap((t.arrived_at, t.end_at) for t in self.turns
                                          if t.end_at is not None),
            "cpu_seconds": self.cpu, "redis_commands": self.commands,
            "problems": [f"{t.key}: {'; '.join(t.problems) or 'no end'}"
                         for t in self.turns if not t.ok][:20],
        }


def arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Poisson arrival times in [0, seconds): exponential gaps of mean 1/rate."""
    chooser, times, at = random.Random(seed), [], 0.0
    while True:
        at += chooser.expovariate(rate)
        if at >= seconds:
            return times
        times.append(at)


async def _at_each_arrival(turns: list[Turn], act: Any, timeout: float) -> None:
    """Run ``act(turn)`` for every turn at its due time, all concurrently, bounded in time."""
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(turn: Turn) -> None:
        await asyncio.sleep(max(0.0, start + turn.due - loop.time()))
        turn.arrived_at = time.time()
        try:
            await act(turn)
        except BROKEN_STREAM as exc:
            turn.problems.append(f"{type(exc).__name__}: {exc}")

    tasks = [asyncio.create_task(one(turn)) for turn in turns]
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()


def run_floor(stub_url: str, settings: Settings, schedule: list[float],
              timeout: float) -> list[Turn]:
    parts = urlsplit(stub_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    turns = [Turn(f"f{uuid.uuid4().hex[:6]}-{i}", due) for i, due in enumerate(schedule)]
    bodies = run_requests(settings, [t.key for t in turns])

    async def act(turn: Turn) -> None:
        trace = TurnTrace(turn.key)
        _, reader, writer = await open_run_stream(host, port, bodies[turn.key])
        try:
            await follow_stream(reader, trace)
        finally:
            writer.close()
        turn.first_chunk_at, turn.end_at = trace.first_chunk_at, trace.end_at
        turn.chunks, turn.problems = len(trace.chunks), trace.problems
        turn.ok = trace.ok

    asyncio.run(_at_each_arrival(turns, act, timeout))
    return turns


async def _read_gateway_stream(turn: Turn, port: int, message_id: str, token: str) -> None:
    """Follow one turn on the gateway as a browser would, checking what it gets."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    try:
        writer.write(f"GET /v1/turns/{message_id}/events?token={token} HTTP/1.1\r\n"
                     "Host: bench\r\nAccept: text/event-stream\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise StreamRefused(f"the gateway answered {head[:120]!r}")
        buffer, text, next_seq = b"", "", 1
        while True:
            chunk = await reader.read(1 << 16)
            if not chunk:
                turn.problems.append("the gateway closed the stream before message_end")
                return
            received_at = time.time()
            buffer += chunk
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                data = b"".join(line[6:] for line in frame.split(b"\n")
                                if line.startswith(b"data: "))
                if not data.startswith(b"{"):
                    continue  # pings, chunk-size lines of a chunked body
                event = json.loads(data)
                if event.get("seq") != next_seq:
                    turn.problems.append(f"seq {event.get('seq')} where {next_seq} was due")
                next_seq = event.get("seq", next_seq) + 1
                kind = event.get("event")
                if kind == "agent_message":
                    if turn.first_chunk_at is None:
                        turn.first_chunk_at = received_at
                    text += event["answer"]
                    turn.chunks += 1
                elif kind == "message_replace":
                    text = event["answer"]
                elif kind == "message_end":
                    turn.end_at = received_at
                    if event.get("answer") != text:
                        turn.problems.append("the end's answer is not the streamed text")
                    turn.ok = not turn.problems
                    return
                elif kind == "error":
                    turn.problems.append(f"error: {event.get('message')}")
                    return
    finally:
        writer.close()


class ThroughTheWorker:
    """Worker processes on one queue, fed by ``submit_turn``, each turn read on the gateway."""

    def __init__(self, folder: Path, values: dict[str, Any], *, processes: int,
                 concurrency: int, gateway_port: int) -> None:
        self.settings = Settings(**values)
        env = {f"AGENT_TURN_{key.upper()}": str(value) for key, value in values.items()}
        self.workers: list[Child] = []
        for number in range(processes):
            env["AGENT_TURN_METRICS_PORT"] = str(free_port())
            self.workers.append(start_worker(folder, name=f"open-loop-{number}", pool="gevent",
                                             concurrency=concurrency,
                                             queue=self.settings.queue, env=env))
        self.producer = Celery("bench-open-loop")
        self.producer.config_from_object(celery_config(self.settings))
        self.submitter = ThreadPoolExecutor(1, thread_name_prefix="submit")
        self.gateway_port = gateway_port
        self.tag = uuid.uuid4().hex[:6]

    async def _act(self, turn: Turn) -> None:
        index = int(turn.key.rsplit("-", 1)[1])
        submitted = await asyncio.get_running_loop().run_in_executor(
            self.submitter, lambda: submit_turn(turn_fields(index, turn.key),
                                                celery_app=self.producer,
                                                settings=self.settings))
        await _read_gateway_stream(turn, self.gateway_port, submitted.message_id,
                                   submitted.stream_token)

    def warm_up(self, turns: int) -> None:
        warm = [Turn(f"w{self.tag}-{i}", 0.05 * i) for i in range(turns)]
        asyncio.run(_at_each_arrival(warm, self._act, 60))
        if not all(t.ok for t in warm):
            raise RuntimeError(f"the warm-up turns failed: {[t.problems for t in warm]}\n"
                               + "\n".join(w.log_tail() for w in self.workers))

    def drive(self, schedule: list[float], timeout: float) -> list[Turn]:
        turns = [Turn(f"o{self.tag}-{i}", due) for i, due in enumerate(schedule)]
        asyncio.run(_at_each_arrival(turns, self._act, timeout))
        return turns

    def stop(self) -> None:
        self.submitter.shutdown()
        self.producer.close()
        for worker in self.workers:
            worker.stop()


def _cpu(probes: dict[str, ProcessProbe], me: psutil.Process,
         admin: redis.Redis) -> dict[str, float]:
    times = me.cpu_times()
    return {**{name: probe.sample().cpu_seconds for name, probe in probes.items()},
            "driver": times.user + times.system, "redis": server_cpu_seconds(admin)}


def _measured(reader: str, probes: dict[str, ProcessProbe], admin: redis.Redis,
              run: Any) -> OpenLoopPhase:
    me = psutil.Process()
    gc.collect()
    before, commands_before, started = _cpu(probes, me, admin), command_stats(admin), time.time()
    gc.disable()
    try:
        turns = run()
    finally:
        gc.enable()
    after, commands_after = _cpu(probes, me, admin), command_stats(admin)
    ends = [t.end_at for t in turns if t.end_at is not None]
    return OpenLoopPhase(
        reader, turns, {name: after[name] - before[name] for name in after},
        sum(commands_after.values()) - sum(commands_before.values()),
        (max(ends) if ends else time.time()) - started)


def start_gateway(folder: Path, pubsub_url: str, port: int) -> Child:
    env = {"AGENT_TURN_PUBSUB_URL": pubsub_url, "AGENT_TURN_GATEWAY_SECRET": SECRET,
           "AGENT_TURN_GATEWAY_PORT": str(port)}

    def answering(_: str) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    return start_child("gateway", [sys.executable, "-m", "gateway"], folder / "gateway.log",
                       answering, env=env)


def report(args: argparse.Namespace, phases: list[OpenLoopPhase]) -> str:
    floor = next((p for p in phases if p.reader == "floor"), None)
    lines = [f"### open loop: Poisson arrivals at {args.rate:g}/s for {args.seconds:g} s, "
             f"{args.answer_tokens} tokens every {args.token_delay * 1000:g} ms, window "
             f"{args.window_ms:g} ms", "",
             "| | " + " | ".join(p.reader for p in phases) + " |",
             "| --- |" + " --- |" * len(phases)]

    def row(name: str, cell: Any) -> None:
        lines.append(f"| {name} | " + " | ".join(cell(p) for p in phases) + " |")

    def ms(p: OpenLoopPhase, q: float) -> float:
        return percentile(p.first_chunks, q) * 1000

    row("turns ended correctly / arrived", lambda p: f"{sum(t.ok for t in p.turns):,} / "
        f"{len(p.turns):,}")
    row("peak turns in flight", lambda p: f"{p.summary()['in_flight_peak']:,}")
    row("**time to first chunk p50 / p90 / p99, ms**",
        lambda p: f"{ms(p, 0.5):.1f} / {ms(p, 0.9):.1f} / {ms(p, 0.99):.1f}")
    row("**added over the floor p50 / p99, ms**",
        lambda p: "-" if floor is None or p is floor else
        f"{ms(p, 0.5) - ms(floor, 0.5):.1f} / {ms(p, 0.99) - ms(floor, 0.99):.1f}")
    for name in ("worker", "gateway", "stub", "redis", "driver"):
        row(f"{name} CPU, % of one core / ms per turn", lambda p, name=name: "-"
            if name not in p.cpu else f"{100 * p.cpu[name] / p.wall_seconds:.0f} / "
            f"{1000 * p.cpu[name] / max(1, len(p.turns)):.2f}")
    row("Redis commands per turn", lambda p: f"{p.commands / max(1, len(p.turns)):.1f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.open_loop", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--rate", type=float, default=40.0, help="turns per second (40)")
    parser.add_argument("--seconds", type=float, default=60.0, help="arrivals for this long")
    parser.add_argument("--answer-tokens", type=int, default=50)
    parser.add_argument("--token-delay", type=float, default=0.2)
    parser.add_argument("--window-ms", type=float, default=40.0)
    parser.add_argument("--worker-processes", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the folder with the logs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    schedule = arrivals(args.rate, args.seconds, args.seed)
    timeout = args.seconds + args.answer_tokens * args.token_delay + 120
    phases: list[OpenLoopPhase] = []
    with ExitStack() as stack:
        folder = Path(tempfile.mkdtemp(prefix="bench-open-loop-"))
        print(f"benchmark folder {folder}; {len(schedule)} arrivals", file=sys.stderr)
        redis_child, redis_port = start_private_redis(folder)
        stack.callback(redis_child.stop)
        admin = redis.Redis(port=redis_port, socket_timeout=10)
        stub, stub_url = start_stub(folder, answer_tokens=args.answer_tokens,
                                    token_delay=args.token_delay)
        stack.callback(stub.stop)
        values = {"broker_url": f"redis://127.0.0.1:{redis_port}/0",
                  "result_backend": f"redis://127.0.0.1:{redis_port}/1",
                  "pubsub_url": f"redis://127.0.0.1:{redis_port}/2", "backend_url": stub_url,
                  "queue": f"bench_open_loop_{uuid.uuid4().hex[:6]}",
                  "database_url": f"sqlite:///{folder / 'open-loop.sqlite3'}",
                  "coalesce_window_ms": args.window_ms, "worker_concurrency": args.concurrency,
                  "gateway_secret": SECRET}
        if not args.no_floor:
            print("floor: the driver reads the stub", file=sys.stderr)
            phases.append(_measured("floor", {"stub": ProcessProbe(stub.pid)}, admin,
                                    lambda: run_floor(stub_url, Settings(**values), schedule,
                                                      timeout)))
            _reset_stub(stub_url)
        gateway_port = free_port()
        gateway = start_gateway(folder, values["pubsub_url"], gateway_port)
        stack.callback(gateway.stop)
        label = "worker" if args.worker_processes == 1 else f"worker x{args.worker_processes}"
        print(f"{label}: enqueued, read on the gateway", file=sys.stderr)
        side = ThroughTheWorker(folder, values, processes=args.worker_processes,
                                concurrency=args.concurrency, gateway_port=gateway_port)
        stack.callback(side.stop)
        side.warm_up(args.warmup)
        probes = {"worker": ProcessProbe(*(w.pid for w in side.workers)),
                  "stub": ProcessProbe(stub.pid), "gateway": ProcessProbe(gateway.pid)}
        phases.append(_measured(label, probes, admin,
                                lambda: side.drive(schedule, timeout)))
        if args.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            stack.callback(shutil.rmtree, folder, True)
    print(report(args, phases))
    if args.json:
        args.json.write_text(json.dumps([p.summary() for p in phases], indent=2))
    return 0 if all(t.ok for p in phases for t in p.turns) else 1


if __name__ == "__main__":
    sys.exit(main())
