"""The two-turn demo: the whole stack on one machine, a conversation streaming in the terminal.

``scripts/demo`` runs this after installing and making sure Redis answers. It starts the stub
backend and a worker as child processes (reusing a stub that already answers on the configured
URL), sends two turns of one conversation as a web tier would, prints each answer as its chunks
arrive on the turn's channel, and stops what it started.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import redis
import requests

from config.settings import PROJECT_ROOT, Settings, get_settings
from worker.client import prepare_turn, submit_turn

DEMO_QUERIES = ("Hello! My name is Ada.", "What did I just tell you?")


def _stub_answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/_stub/runs", timeout=1).status_code == 200
    except requests.RequestException:
        return False


@contextmanager
def _child(command: list[str], log_path: Path, ready: str, env: dict[str, str]) -> Iterator[None]:
    """Run a child process until the block ends; wait for ``ready`` in its output first."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while ready.encode() not in log_path.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise SystemExit(f"{command[2]} did not start (log {log_path}):\n{tail}")
            time.sleep(0.1)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def _stream_turn(settings: Settings, bus: redis.Redis, fields: dict[str, str]) -> str:
    turn = prepare_turn(fields, settings)
    pubsub = bus.pubsub()
    pubsub.subscribe(settings.channel_for(turn.message_id))
    pubsub.get_message(timeout=2)
    submitted = submit_turn(turn, settings=settings)
    print(f"\nuser      > {turn.query}")
    print("assistant > ", end="", flush=True)
    deadline = time.monotonic() + 60
    chunks = 0
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if message is None:
            continue
        event = json.loads(message["data"])
        if event["event"] == "agent_message":
            chunks += 1
            print(event["answer"], end="", flush=True)
        elif event["event"] == "message_replace":
            print(f"\n[replaced] {event['answer']}", end="", flush=True)
        elif event["event"] == "message_end":
            usage = event["metadata"].get("usage") or {}
            print(f"\n            ({chunks} chunks, {event['seq']} events, "
                  f"{usage.get('total_tokens', '?')} tokens; task {submitted.task_id})")
            pubsub.close()
            return turn.conversation_id
        elif event["event"] == "error":
            pubsub.close()
            raise SystemExit(f"\nthe turn failed: {event['code']}: {event['message']}")
    pubsub.close()
    raise SystemExit("\nno answer within 60 s: is the worker running? (see var/demo-worker.log)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answer-tokens", type=int, default=40,
                        help="how long the stub's answers are, in tokens (default 40)")
    args = parser.parse_args()
    settings = get_settings()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    logs = PROJECT_ROOT / "var"
    with ExitStack() as stack:
        if not _stub_answers(settings.backend_url):
            port = str(urlsplit(settings.backend_url).port or 8790)
            stack.enter_context(_child(
                [sys.executable, "-m", "stub_backend", "--port", port,
                 "--answer-tokens", str(args.answer_tokens), "--token-delay", "0.03"],
                logs / "demo-stub.log", "listening on", env))
        stack.enter_context(_child(
            [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool", "gevent",
             "--loglevel", "INFO", "--concurrency", "8", "--hostname", f"demo-{os.getpid()}@%h"],
            logs / "demo-worker.log", "ready.", env))
        print(f"stub backend {settings.backend_url}, worker on queue {settings.queue!r}, "
              f"store {settings.database_url}")
        bus = redis.Redis.from_url(settings.pubsub_url, socket_timeout=5)
        conversation_id = None
        for query in DEMO_QUERIES:
            fields = {"tenant_id": "demo-tenant", "app_id": "demo-app", "user_id": "demo-user",
                      "query": query}
            if conversation_id:
                fields["conversation_id"] = conversation_id
            conversation_id = _stream_turn(settings, bus, fields)
        print(f"\nconversation {conversation_id}: two turns, the second built on the first's "
              "snapshot (see '[turn 2]').")


if __name__ == "__main__":
    main()
