"""``python -m bench.replay_memory``: the Redis memory a long turn leaves behind.

Starts the stub backend and two workers, one with finished turns' logs compacted (the
default) and one with them kept whole (``AGENT_TURN_REPLAY_LOG_COMPACT_ON_END=false``), each
on its own queue and bus database, and streams one turn of ``--tokens`` tokens at
``--token-delay`` through each, at once. While they stream, the replay log's size is sampled;
after the end, every key the turn left on the bus (log, head: seq and last publish,
owner) is measured with ``MEMORY USAGE ... SAMPLES 0``. Then a client's view is checked: for
a sample of resume points, the compacted log read after that seq on top of what the client
had ends with exactly the final answer. The target (issue 15): at most 64 KB for a finished
2,000-token turn at 20 ms per token while its log is retained.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from bench.procs import start_stub, start_worker
from config.celery import celery_config
from config.settings import Settings
from worker.client import prepare_turn, submit_turn
from worker.ownership import owner_key
from worker.publisher import replay_log_key, seq_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--token-delay", type=float, default=0.02)
    parser.add_argument("--redis-dbs", default="6,7,8,9",
                        help="broker, results, and the two workers' bus databases")
    args = parser.parse_args()
    broker, results, compacted_db, whole_db = (int(db) for db in args.redis_dbs.split(","))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        stub, stub_url = start_stub(folder, answer_tokens=args.tokens,
                                    token_delay=args.token_delay)
        runs = {"compacted": (compacted_db, True), "whole": (whole_db, False)}
        settings: dict[str, Settings] = {}
        workers = []
        try:
            for name, (bus_db, compact) in runs.items():
                settings[name] = Settings(
                    broker_url=f"redis://127.0.0.1:6379/{broker}",
                    result_backend=f"redis://127.0.0.1:6379/{results}",
                    pubsub_url=f"redis://127.0.0.1:6379/{bus_db}",
                    database_url=f"sqlite:///{folder / f'{name}.sqlite3'}",
                    backend_url=stub_url, queue=f"memory-{name}-{uuid.uuid4().hex[:6]}",
                    metrics_port=0, replay_log_compact_on_end=compact,
                    turn_deadline_seconds=args.tokens * args.token_delay * 3 + 60,
                )
                env = {f"AGENT_TURN_{key.upper()}": str(getattr(settings[name], key))
                       for key in ("broker_url", "result_backend", "pubsub_url",
                                   "database_url", "backend_url", "queue", "metrics_port",
                                   "replay_log_compact_on_end", "turn_deadline_seconds")}
                workers.append(start_worker(folder, name=name, pool="gevent", concurrency=8,
                                            queue=settings[name].queue, env=env))
            results_by_run: dict[str, dict[str, Any]] = {}
            threads = [threading.Thread(target=lambda n=name: results_by_run.update(
                {n: measure(settings[n], args.tokens * args.token_delay * 3 + 60)}))
                for name in runs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            for worker in workers:
                worker.stop()
            stub.stop()
    print(f"one turn of {args.tokens} tokens at {args.token_delay * 1000:.0f} ms per token; "
          "Redis memory (MEMORY USAGE, SAMPLES 0), bytes")
    print("| log | live log at its largest | log after the end | every key after the end "
          "| log entries after the end | resumes checked |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in runs:
        r = results_by_run[name]
        print(f"| {name} | {r['live_peak']:,} | {r['log_after']:,} | {r['all_after']:,} | "
              f"{r['entries_after']:,} | {r['resumes_checked']} |")


def measure(settings: Settings, timeout: float) -> dict[str, Any]:
    bus = redis.Redis.from_url(settings.pubsub_url, socket_timeout=10)
    turn = prepare_turn({"tenant_id": "bench", "app_id": "bench", "user_id": "bench",
                         "query": "a long answer"}, settings)
    pubsub = bus.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(settings.channel_for(turn.message_id))
    producer = Celery("memory-bench")
    producer.config_from_object(celery_config(settings))
    submit_turn(turn, celery_app=producer, settings=settings)
    log = replay_log_key(turn.message_id)
    live: list[dict[str, Any]] = []
    peak, next_sample = 0, time.monotonic()
    deadline = time.monotonic() + timeout
    while not live or live[-1]["event"] not in ("message_end", "error"):
        if time.monotonic() > deadline:
            raise SystemExit(f"the turn did not end within {timeout:.0f} s")
        message = pubsub.get_message(timeout=0.2)
        if message is not None:
            live.append(json.loads(message["data"]))
        if time.monotonic() >= next_sample:
            peak = max(peak, int(bus.memory_usage(log, samples=0) or 0))
            next_sample = time.monotonic() + 0.5
    pubsub.close()
    keys = [log, seq_key(turn.message_id), owner_key(turn.message_id)]
    sizes = [int(bus.memory_usage(key, samples=0) or 0) for key in keys]
    kept = [json.loads(fields[b"data"]) for _, fields in bus.xrange(log)]
    answer = live[-1].get("answer")
    checked = 0
    for after in sorted({0, 1, len(live) // 3, len(live) // 2, len(live) - 2, len(live) - 1,
                         *range(0, len(live), max(1, len(live) // 50))}):
        text = _text(live[:after])
        if _text([e for e in kept if e["seq"] > after], text) != answer:
            raise SystemExit(f"a client resuming after seq {after} would not end with the "
                             "final answer")
        checked += 1
    bus.close()
    producer.close()
    return {"live_peak": peak, "log_after": sizes[0], "all_after": sum(sizes),
            "entries_after": len(kept), "resumes_checked": checked}


def _text(events: list[dict[str, Any]], text: str = "") -> str:
    for event in events:
        if event["event"] == "agent_message":
            text += event["answer"]
        elif event["event"] == "message_replace":
            text = event["answer"]
    return text


if __name__ == "__main__":
    main()
