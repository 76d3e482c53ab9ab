"""Where a turn's own CPU goes, stage by stage: ``run_turn`` in one process, without Celery.

``bench.load`` says what a whole worker costs per turn; ``bench.stream_path`` what each streamed
event costs. This says what the rest of a turn costs and where: the database transactions, the
backend's create call, the Redis round trips of its start and end, the publishes. It runs
``run_turn`` on gevent, as the worker does, against the stub backend, a Redis of its own and a
SQLite file, one turn after another, and charges the process's CPU during each service call to
that call's stage. One at a time, so that no other turn's work lands in a stage: each wait for
Redis, the database or the backend costs the wake-up it costs a worker at low load.

    python -m bench.turn_costs --turns 300 --answer-tokens 2
    python -m bench.turn_costs --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test

Stages nest (a publish inside ``end`` is charged to ``end``); what no stage covers is reading
the event stream, the turn's own logic and the hub's work between calls. Celery's share (the
message, its acknowledgement, the result and the task events) is not in it: compare with
``bench.load``'s worker CPU per turn at the same answer length.
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything imports socket, ssl or threading
    from gevent import monkey

    monkey.patch_all()

import argparse
import collections
import functools
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.metrics import process_cpu_seconds

# (label, object path on the services, method names): the stages a turn's CPU is charged to.
STAGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("database", "store", ("claim", "begin_attempt", "record_run", "save_success",
                           "load_snapshot", "get_message", "save_steps", "mark_queued")),
    ("backend call", "backend", ("create_run", "get_run")),
    ("redis: owner, replay log reads", "bus", ("record_owner", "client_text", "last_seq")),
    ("stop flag (redis), supervisor", "supervisor", ("stop_requested", "register", "unregister")),
    ("redis: conversation lease", "locks", ("acquire", "release", "holds")),
)
# Turns run, after the timed ones, to count a PostgreSQL store's round trips.
ROUND_TRIP_TURNS = 20
PUBLISHER_METHODS = ("delta", "step", "flush", "replace", "end", "event", "error")



class StageClock:
    """Charges the process's CPU during each wrapped call to its stage (outermost call only)."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self._depth = 0

    def wrap(self, owner: Any, name: str, stage: str) -> None:
        method = getattr(owner, name)

        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return method(*args, **kwargs)
            self._depth += 1
            self.calls[f"{stage}: {name}"] += 1
            started = process_cpu_seconds()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[stage] += process_cpu_seconds() - started
                self._depth -= 1

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def measure(*, turns: int, answer_tokens: int, token_delay: float,
            database_url: str | None = None) -> dict[str, Any]:
    from bench.procs import start_private_redis, start_stub

    with tempfile.TemporaryDirectory(prefix="agent-turn-costs-") as name:
        folder = Path(name)
        redis_child, port = start_private_redis(folder)
        stub, stub_url = start_stub(folder, answer_tokens=answer_tokens, token_delay=token_delay)
        try:
            redis_url = f"redis://127.0.0.1:{port}"
            os.environ.update({
                "AGENT_TURN_BACKEND_URL": stub_url, "AGENT_TURN_PUBSUB_URL": f"{redis_url}/0",
                "AGENT_TURN_BROKER_URL": f"{redis_url}/1",
                "AGENT_TURN_RESULT_BACKEND": f"{redis_url}/2",
                "AGENT_TURN_DATABASE_URL": database_url or f"sqlite:///{folder / 'turns.sqlite3'}"})
            return _measure(turns, redis_url, folder)
        finally:
            stub.stop()
            redis_child.stop()


class RoundTrips:
    """Counts a PostgreSQL engine's round trips exactly: libpq traces each connection's protocol
    messages to a file, and every round trip ends with the server's ``ReadyForQuery``. That
    includes what no SQLAlchemy event shows: each transaction's ``BEGIN``, and pings.
    """

    def __init__(self, engine: Any, folder: Path) -> None:
        from sqlalchemy import event as sql_event

        self._folder = folder
        self._files: list[Any] = []
        engine.dispose()  # connections made before now would not be traced
        sql_event.listen(engine, "connect", self._trace)

    def _trace(self, dbapi_connection: Any, _record: Any) -> None:
        trace = (self._folder / f"libpq-{len(self._files)}.trace").open("w")
        self._files.append(trace)
        dbapi_connection.pgconn.trace(trace.fileno())

    def count(self) -> int:
        return sum(Path(trace.name).read_text().count("\tReadyForQuery\t")
                   for trace in self._files)


def _measure(turns: int, redis_url: str, folder: Path) -> dict[str, Any]:
    import redis
    from sqlalchemy import event as sql_event

    from config.settings import get_settings
    from worker import turn as turn_module
    from worker.payload import parse_turn
    from worker.publisher import TurnPublisher
    from worker.turn import get_services, run_turn

    get_settings.cache_clear()
    settings = get_settings()
    services = get_services(settings)
    clock = StageClock()
    for stage, attribute, names in STAGES:
        for name in names:
            clock.wrap(getattr(services, attribute), name, stage)
    for name in PUBLISHER_METHODS:
        clock.wrap(TurnPublisher, name, "publishing")
    clock.wrap(turn_module, "build_run_request", "building the run request")
    clock.wrap(turn_module, "_start", "redis: the start (owner, stop flag, lease)")
    # Outermost only: inside create_run a request is the backend call's; alone, it opens the
    # event stream (or reads a run's status).
    clock.wrap(services.backend, "_send", "opening the event stream")
    statements = collections.Counter[str]()

    def count(*_args: Any) -> None:
        statements["statements"] += 1

    def count_commit(*_args: Any) -> None:
        statements["commits"] += 1

    sql_event.listen(services.store.engine, "before_cursor_execute", count)
    sql_event.listen(services.store.engine, "commit", count_commit)

    def one_turn() -> None:
        suffix = uuid.uuid4().hex[:12]
        payload = parse_turn({"tenant_id": "bench", "app_id": "bench", "user_id": "bench",
                              "conversation_id": f"conv-{suffix}",
                              "message_id": f"msg-{suffix}", "query": "hi"}, settings)
        run_turn(payload, task_id=uuid.uuid4().hex, services=services)

    for _ in range(5):  # warm-up: imports, pools, the first connections
        one_turn()
    clock.reset()
    statements.clear()
    admin = redis.Redis.from_url(f"{redis_url}/0")
    before = admin.info("commandstats")
    started = process_cpu_seconds()
    for _ in range(turns):
        one_turn()
    total = process_cpu_seconds() - started
    sql_per_turn = {name: n / turns for name, n in statements.items()}
    if services.store.engine.dialect.name == "postgresql":
        # Counted apart from the timed turns: tracing costs CPU of its own.
        round_trips = RoundTrips(services.store.engine, folder)
        for _ in range(6):  # not a turn's: a new connection's set-up, and psycopg preparing
            one_turn()      # each statement on its sixth use (two round trips, once)
        before_trips = round_trips.count()
        for _ in range(ROUND_TRIP_TURNS):
            one_turn()
        sql_per_turn["round trips"] = (round_trips.count() - before_trips) / ROUND_TRIP_TURNS
    after = admin.info("commandstats")
    commands = {name.removeprefix("cmdstat_"): after[name]["calls"]
                - before.get(name, {"calls": 0})["calls"] for name in after}
    commands.pop("info", None)
    return {
        "turns": turns,
        "cpu_ms_per_turn": total / turns * 1000,
        "stages_ms_per_turn": {stage: seconds / turns * 1000
                               for stage, seconds in clock.seconds.most_common()},
        "calls_per_turn": {call: n / turns for call, n in sorted(clock.calls.items())},
        "redis_commands_per_turn": {name: n / turns for name, n in
                                    sorted(commands.items(), key=lambda kv: -kv[1]) if n},
        "sql_per_turn": sql_per_turn,
    }


def table(figures: dict[str, Any]) -> str:
    total = figures["cpu_ms_per_turn"]
    rows = ["| stage | CPU ms per turn | share |", "| --- | --- | --- |"]
    staged = 0.0
    for stage, ms in figures["stages_ms_per_turn"].items():
        staged += ms
        rows.append(f"| {stage} | {ms:.3f} | {ms / total:.0%} |")
    rows.append(f"| reading the stream, the turn's own logic, the hub | {total - staged:.3f} "
                f"| {(total - staged) / total:.0%} |")
    rows.append(f"| **whole turn** | **{total:.3f}** | 100% |")
    commands = ", ".join(f"{name} {n:.1f}"
                         for name, n in figures["redis_commands_per_turn"].items())
    sql = ", ".join(f"{name} {n:.1f}" for name, n in figures["sql_per_turn"].items())
    return "\n".join([*rows, "", f"Redis commands per turn: {commands}",
                      f"SQL per turn (round trips: PostgreSQL only, BEGINs included): {sql}"])


def main(argv: Sequence[str] | None = None, *,
         run: Callable[..., dict[str, Any]] = measure) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.turn_costs",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--answer-tokens", type=int, default=2)
    parser.add_argument("--token-delay", type=float, default=0.02)
    parser.add_argument("--database-url", help="the session store (default: a new SQLite file); "
                        "a PostgreSQL URL measures what production's database costs a turn")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.turns < 1:
        parser.error("--turns must be at least 1")
    if args.answer_tokens < 1 or args.token_delay < 0:
        parser.error("--answer-tokens must be at least 1 and --token-delay not negative")
    figures = run(turns=args.turns, answer_tokens=args.answer_tokens,
                  token_delay=args.token_delay, database_url=args.database_url)
    print(table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
