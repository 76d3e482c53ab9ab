"""Where a worker's event latency comes from: the streaming path alone, piece by piece.

``bench.load`` measures whole workers. This takes the worker's own clients out of Celery and
runs them on gevent, as the worker does, in one process: N greenlets each open a run on the stub
with ``AgentBackendClient`` and follow its stream, and in the ``publish`` mode hand every delta to
``EventBus`` (coalescing off) exactly as a turn does. Compared with ``bench.load``'s floor and
relay it says how much of the latency is reading the stream on gevent and requests, and how much
publishing adds, with no task queue, database or progress reports around them.

    python -m bench.stream_path --turns 200 --modes read,publish

Latency is the time a greenlet has a delta in hand minus the stub's emission time of that token
(``created_at``), for tokens emitted while every stream was open; CPU is this process's.
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything imports socket, ssl or threading
    from gevent import monkey

    monkey.patch_all()

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

MODES = ("read", "publish")


@dataclass(frozen=True)
class PathFigures:
    mode: str
    turns: int
    events: int
    cpu_us_per_event: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    failures: int
    # Publish mode: deltas published per publish round trip (GroupCommit's sharing).
    events_per_round_trip: float = float("nan")


def measure(mode: str, *, stub_url: str, redis_url: str, turns: int) -> PathFigures:
    import gevent
    import redis

    from bench.load import fetch_timelines, run_requests
    from bench.metrics import percentile, process_cpu_seconds
    from config.settings import Settings
    from worker.backend import AgentBackendClient
    from worker.publisher import EventBus, TurnIds

    settings = Settings(backend_url=stub_url, pubsub_url=redis_url, coalesce_window_ms=0)
    pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=turns + 8)
    bus = EventBus.from_settings(redis.Redis(connection_pool=pool), settings)
    backend = AgentBackendClient(stub_url, token=None, connect_timeout=5, read_timeout=30,
                                 max_reconnects=0, reconnect_delay=0.1,
                                 max_frame_bytes=settings.max_frame_bytes,
                                 pool_size=turns + 8)
    received: dict[str, list[float]] = {}
    failures: list[str] = []

    def follow(key: str, run_id: str) -> None:
        publisher = bus.turn(TurnIds(f"task-{key}", key, f"conv-{key}"))
        stamps = received[key] = []
        for event in backend.stream_events(run_id, message_id=key):
            if event.terminal:
                if event.type != "run_succeeded":
                    failures.append(f"{key}: {event.type}")
                return
            if event.answer_delta:
                stamps.append(time.time())
                if mode == "publish":
                    publisher.delta(event.answer_delta)

    bodies = run_requests(settings, [f"path-{uuid.uuid4().hex[:8]}" for _ in range(turns)])
    run_ids = {key: backend.create_run(body, message_id=key) for key, body in bodies.items()}
    cpu_before, trips_before = process_cpu_seconds(), bus._commit.round_trips
    greenlets = [gevent.spawn(follow, key, run_id) for key, run_id in run_ids.items()]
    gevent.joinall(greenlets, timeout=300)
    cpu = process_cpu_seconds() - cpu_before
    trips = bus._commit.round_trips - trips_before
    failures += [f"{g}: {g.exception!r}" for g in greenlets if g.exception is not None]
    failures += [f"{g}: still running" for g in greenlets if not g.ready()]
    gevent.killall([g for g in greenlets if not g.ready()], timeout=5)
    backend.close()
    pool.disconnect()

    timelines = fetch_timelines(stub_url, run_ids)
    failures += [f"{key}: {len(stamps)} deltas of {len(timelines[key].emitted)} tokens"
                 for key, stamps in received.items() if len(stamps) != len(timelines[key].emitted)]
    all_open_from = max((tl.emitted[0] for tl in timelines.values() if tl.emitted), default=0)
    all_open_to = min((tl.emitted[-1] for tl in timelines.values() if tl.emitted), default=0)
    latencies = [stamp - timelines[key].emitted[i]
                 for key, stamps in received.items() for i, stamp in enumerate(stamps)
                 if all_open_from <= timelines[key].emitted[i] <= all_open_to]
    events = sum(len(stamps) for stamps in received.values())
    return PathFigures(
        mode=mode, turns=turns, events=events,
        cpu_us_per_event=cpu / events * 1e6 if events else float("nan"),
        latency_p50_ms=percentile(latencies, 0.5) * 1000,
        latency_p90_ms=percentile(latencies, 0.9) * 1000,
        latency_p99_ms=percentile(latencies, 0.99) * 1000,
        failures=len(failures),
        events_per_round_trip=events / trips if trips else float("nan"),
    )



def table(rows: Sequence[PathFigures]) -> str:
    out = ["| mode | turns | events | worker-side CPU per event, µs "
           "| latency p50 / p90 / p99, ms | events per publish round trip | failed |",
           "| --- " * 7 + "|"]
    out += [f"| {row.mode} | {row.turns:,} | {row.events:,} | {row.cpu_us_per_event:.0f} "
            f"| {row.latency_p50_ms:.1f} / {row.latency_p90_ms:.1f} / {row.latency_p99_ms:.1f} "
            f"| {row.events_per_round_trip:.2f} | {row.failures} |" for row in rows]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.procs import start_private_redis, start_stub

    parser = argparse.ArgumentParser(prog="python -m bench.stream_path",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--answer-tokens", type=int, default=100)
    parser.add_argument("--token-delay", type=float, default=0.1)
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not modes or any(mode not in MODES for mode in modes):
        parser.error(f"--modes takes {', '.join(MODES)}")
    if args.turns < 1:
        parser.error("--turns must be at least 1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="agent-turn-path-") as name:
        folder = Path(name)
        redis_child, port = start_private_redis(folder)
        try:
            for mode in modes:  # a fresh stub per mode: the same load on the same stub state
                stub, stub_url = start_stub(folder, answer_tokens=args.answer_tokens,
                                            token_delay=args.token_delay)
                try:
                    rows.append(measure(mode, stub_url=stub_url,
                                        redis_url=f"redis://127.0.0.1:{port}/0",
                                        turns=args.turns))
                finally:
                    stub.stop()
        finally:
            redis_child.stop()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2))
    return 1 if any(row.failures for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
