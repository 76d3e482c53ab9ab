"""The demo: the whole stack on one machine, a conversation streaming in the terminal.

``scripts/demo`` runs this after installing and making sure Redis answers. It starts the stub
backend and a worker as child processes (reusing a stub that already answers on the configured
URL), sends turns as a web tier would, prints each answer as its chunks arrive on the turn's
channel, and stops what it started. Four turns: two of one conversation (the second built on
the first's snapshot), one where the agent thinks and calls a tool (its ``agent_thought``
steps printed as they grow), and one where the agent asks the user a question, which the demo
answers as the user would (``submit_human_input``); the answer's continuation streams on the
same message to one ``message_end``.
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
from typing import Any
from urllib.parse import urlsplit

import redis
import requests

from config.settings import PROJECT_ROOT, Settings, get_settings
from worker.client import prepare_turn, submit_human_input, submit_turn

DEMO_QUERIES = ("Hello! My name is Ada.", "What did I just tell you?")
# What the agent does in the last two turns, scripted on the stub backend (its control API,
# stub_backend/control.py): thinking, a call the tool refuses (a retry prompt), a call that
# returns; then a question with a field and two actions.
TOOL_QUERY = "What is the weather in Lisbon?"
TOOL_PROCESS = [
    {"thinking": "The user wants the weather; the weather tool knows it."},
    {"tool": "weather", "args": {"town": "Lisbn"}, "refused": "unknown town 'Lisbn'"},
    {"tool": "weather", "args": {"town": "Lisbon"}, "result": {"sky": "sunny", "celsius": 21}},
]
ASK_QUERY = "Book me a table for two."
ASK_PROCESS = [{"ask_human": {
    "title": "Booking", "question": "For what time should I book the table?",
    "fields": [{"name": "time", "label": "Time", "type": "text"}],
    "actions": [{"id": "book", "label": "Book it", "style": "primary"},
                {"id": "cancel", "label": "Never mind"}]}}]
DEMO_OWNER = {"tenant_id": "demo-tenant", "app_id": "demo-app", "user_id": "demo-user"}


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


def _show_step(event: dict[str, Any], shown: dict[str, str]) -> None:
    """Print a step when it first arrives and each time it grows (re-sent under its id)."""
    parts = [f"thought {event['thought'].strip()!r}" if event["thought"].strip() else "",
             f"tool {event['tool']}({event['tool_input']})" if event["tool"] else "",
             f"→ {event['observation']}" if event["observation"] else ""]
    line = " ".join(part for part in parts if part)
    if line and shown.get(event["id"]) != line:
        shown[event["id"]] = line
        print(f"\n  [step {event['position']}] {line}", end="", flush=True)


def _stream_turn(settings: Settings, bus: redis.Redis, fields: dict[str, str],
                 process: list[dict[str, Any]] | None = None, celery_app: Any = None) -> str:
    """Send one turn, print its events as they arrive; answer its question if it asks one."""
    turn = prepare_turn(fields, settings)
    if process is not None:
        requests.post(f"{settings.backend_url}/_stub/messages/{turn.message_id}",
                      json={"process": process}, timeout=5).raise_for_status()
    pubsub = bus.pubsub()
    pubsub.subscribe(settings.channel_for(turn.message_id))
    pubsub.get_message(timeout=2)
    submitted = submit_turn(turn, settings=settings, celery_app=celery_app)
    print(f"\nuser      > {turn.query}")
    print("assistant > ", end="", flush=True)
    deadline = time.monotonic() + 60
    chunks = 0
    steps: dict[str, str] = {}
    after_step = False
    try:
        while time.monotonic() < deadline:
            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is None:
                continue
            event = json.loads(message["data"])
            if event["event"] == "agent_message":
                chunks += 1
                if after_step:
                    print("\nassistant > ", end="")
                    after_step = False
                print(event["answer"], end="", flush=True)
            elif event["event"] == "agent_thought":
                _show_step(event, steps)
                after_step = True
            elif event["event"] == "message_replace":
                print(f"\n[replaced] {event['answer']}", end="", flush=True)
            elif event["event"] == "human_input_required":
                _answer_question(settings, turn.message_id, event, celery_app)
                print("assistant > ", end="", flush=True)
                after_step = False
            elif event["event"] == "message_end":
                usage = event["metadata"].get("usage") or {}
                print(f"\n            ({chunks} chunks, {len(steps)} steps, {event['seq']} "
                      f"events, {usage.get('total_tokens', '?')} tokens; "
                      f"task {submitted.task_id})")
                return turn.conversation_id
            elif event["event"] == "error":
                raise SystemExit(f"\nthe turn failed: {event['code']}: {event['message']}")
    finally:
        pubsub.close()
    raise SystemExit("\nno answer within 60 s: is the worker running? (see var/demo-worker.log)")


def _answer_question(settings: Settings, message_id: str, asked: dict[str, Any],
                     celery_app: Any) -> None:
    """Answer as the user would, with the first action offered: the web tier's part."""
    action = asked["actions"][0]["id"]
    values = {field["name"]: "8 pm" for field in asked["args"].get("fields") or []
              if isinstance(field, dict) and "name" in field}
    print(f"\n  [question] {asked['args'].get('question')} (expires at "
          f"{time.strftime('%H:%M:%S', time.localtime(asked['expires_at']))})")
    print(f"user      > [{action}] {json.dumps(values) if values else ''}")
    submit_human_input(message_id, asked["tool_call_id"], action, values, **DEMO_OWNER,
                       celery_app=celery_app, settings=settings)


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
            fields = {**DEMO_OWNER, "query": query}
            if conversation_id:
                fields["conversation_id"] = conversation_id
            conversation_id = _stream_turn(settings, bus, fields)
        print(f"\nconversation {conversation_id}: two turns, the second built on the first's "
              "snapshot (see '[turn 2]').")
        print("\nA turn where the agent thinks and calls a tool (its steps as they grow):")
        _stream_turn(settings, bus, {**DEMO_OWNER, "query": TOOL_QUERY}, TOOL_PROCESS)
        print("\nA turn where the agent asks the user, and the answer resumes it:")
        _stream_turn(settings, bus, {**DEMO_OWNER, "query": ASK_QUERY}, ASK_PROCESS)


if __name__ == "__main__":
    main()
