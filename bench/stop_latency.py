"""``python -m bench.stop_latency``: how fast a running turn stops after ``stop_turn``.

Starts the stub backend and a worker, streams N long turns at once, and stops each one after
it has published two chunks. Reports, from the ``stop_turn`` call, the time until the turn's
``message_end`` with ``status: stopped`` reaches a subscriber (the worker noticed, cancelled the
backend run, saved the partial answer and published the end), as median, p99 and max. The
target (issue 4) is that the worker notices within 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import redis
from celery import Celery

from bench.procs import start_stub, start_worker
from config.celery import celery_config
from config.settings import Settings
from worker.client import prepare_turn, stop_turn, submit_turn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--redis-dbs", default="13,14,15")
    parser.add_argument("--pool", default="gevent", choices=("gevent", "threads"),
                        help="the worker's pool (default: the Procfile's, gevent)")
    args = parser.parse_args()
    broker, results, bus_db = (int(db) for db in args.redis_dbs.split(","))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        stub, stub_url = start_stub(folder, answer_tokens=400, token_delay=0.05)
        settings = Settings(
            broker_url=f"redis://127.0.0.1:6379/{broker}",
            result_backend=f"redis://127.0.0.1:6379/{results}",
            pubsub_url=f"redis://127.0.0.1:6379/{bus_db}",
            database_url=f"sqlite:///{folder / 'turns.sqlite3'}",
            backend_url=stub_url, queue=f"stop-bench-{uuid.uuid4().hex[:8]}", metrics_port=0,
        )
        env = {f"AGENT_TURN_{key.upper()}": str(getattr(settings, key)) for key in (
            "broker_url", "result_backend", "pubsub_url", "database_url", "backend_url",
            "queue", "metrics_port")}
        worker = start_worker(folder, name=args.pool, pool=args.pool, concurrency=100,
                              queue=settings.queue, env=env)
        try:
            latencies = run(settings, args.turns)
        finally:
            worker.stop()
            stub.stop()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    print(f"{len(latencies)} turns stopped mid-stream ({args.pool} worker): "
          f"stop_turn -> message_end(stopped) "
          f"median {statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms")


def run(settings: Settings, turns: int) -> list[float]:
    bus = redis.Redis.from_url(settings.pubsub_url)
    pubsub = bus.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(settings.channel_for("*"))
    prepared = [prepare_turn({"tenant_id": "bench", "app_id": "bench", "user_id": "bench",
                              "query": f"stop me {n}"}, settings) for n in range(turns)]
    producer = Celery("stop-bench")
    producer.config_from_object(celery_config(settings))
    for turn in prepared:
        submit_turn(turn, celery_app=producer, settings=settings)
    ours = {turn.message_id for turn in prepared}
    chunks: dict[str, int] = {}
    stopped_at: dict[str, float] = {}
    latencies: list[float] = []
    deadline = time.monotonic() + 120
    while len(latencies) < turns:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(latencies)} of {turns} turns ended in 120 s")
        message = pubsub.get_message(timeout=1)
        if message is None or message["type"] != "pmessage":
            continue
        event = json.loads(message["data"])
        message_id = event["message_id"]
        if message_id not in ours:  # pub/sub channels are shared by every Redis database
            continue
        if event["event"] == "agent_message":
            chunks[message_id] = chunks.get(message_id, 0) + 1
            if chunks[message_id] == 2 and message_id not in stopped_at:
                stopped_at[message_id] = time.perf_counter()
                stop_turn(message_id=message_id, tenant_id="bench", app_id="bench",
                          user_id="bench", celery_app=producer, settings=settings)
        elif event["event"] == "message_end":
            if event.get("status") != "stopped" or message_id not in stopped_at:
                raise SystemExit(f"turn {message_id} ended without being stopped: {event}")
            latencies.append(time.perf_counter() - stopped_at[message_id])
    pubsub.close()
    return latencies


if __name__ == "__main__":
    main()
