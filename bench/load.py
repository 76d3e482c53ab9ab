"""The load driver: N concurrent streaming turns through a worker, beside a prefork worker and
a direct read of the backend (the floor), with one results table at the end.

``scripts/bench`` (or ``.venv/bin/python -m bench.load``) runs, per scenario:

1. **floor** — the driver creates the runs on the stub and reads their SSE streams itself;
2. **one worker per pool in --pools** (gevent, the Procfile's, and threads) — the worker as the
   Procfile starts it, fed N turns at once through the producer helper, its channels read by
   a pattern subscriber;
3. **prefork** (the throughput scenario) — the same worker with ``--pool prefork
   --concurrency 2``, Celery's default on this 2-core machine, fed a few turns: it runs two at
   a time, so its rate is two answers per answer time whatever N is.

``--worker-processes 1,2`` runs each I/O pool once with one process and once with two on the same
queue (production runs one per core). ``python -m bench.open_loop`` is the open-loop scenario:
turns arriving one by one at a rate, read on the gateway as a browser reads them.

Scenarios (``--scenario``, default all): ``latency`` (200 turns, every token its own event),
``capacity`` (1,000 turns streaming together) and ``throughput`` (1,000 turns of 10-second
answers, beside prefork).

Isolation: Redis databases 13, 14, 15 (broker, results, pub/sub; ``--redis-dbs``), which the
driver flushes first; a queue, a SQLite file and ports of its own; a temporary folder with every
child's log. ``--private-redis`` starts a Redis of its own instead, so ``INFO commandstats``
counts nothing but the benchmark's commands. See docs/performance.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import redis
import requests
from celery import Celery

from bench.metrics import (
    Distribution,
    LatencySample,
    RunTimeline,
    TurnTrace,
    commands_delta,
    latencies,
    max_overlap,
    trace_from_messages,
)
from bench.probes import Monitor, ProcessProbe, command_stats, server_cpu_seconds
from bench.procs import (
    Child,
    free_port,
    relay_cpu_seconds,
    start_private_redis,
    start_relay,
    start_stub,
    start_worker,
)
from bench.readers import SUBSCRIBER_NAME_PREFIX, PatternSubscriber, read_direct
from config.celery import celery_config
from config.settings import Settings
from worker.client import prepare_turn, submit_turn
from worker.composition import build_run_request, load_template


@dataclass(frozen=True)
class Scenario:
    """One load: how many turns at once, and the answer the stub streams for each."""

    name: str
    turns: int
    answer_tokens: int
    token_delay: float
    window_ms: float
    why: str
    prefork_turns: int = 0

    @property
    def answer_seconds(self) -> float:
        return self.answer_tokens * self.token_delay


SCENARIOS = {
    "latency": Scenario(
        "latency", turns=200, answer_tokens=100, token_delay=0.1, window_ms=0.0,
        why="200 turns at once, each 10 events/s, with coalescing off (window 0 ms) so that "
            "every token is its own event and the latency is the pipeline's alone"),
    "capacity": Scenario(
        "capacity", turns=1000, answer_tokens=100, token_delay=0.4, window_ms=40.0,
        why="1,000 turns at once with answers long enough (40 s) for all of them to be "
            "streaming together, at the production coalescing window (40 ms)"),
    "throughput": Scenario(
        "throughput", turns=1000, answer_tokens=50, token_delay=0.2, window_ms=40.0,
        prefork_turns=4,
        why="1,000 turns at once, 10-second answers, production window; the prefork worker "
            "gets 4 turns (it runs 2 at a time, so that is two answers back to back)"),
}


@dataclass
class Phase:
    """What one reader (floor, or a worker with one pool) measured under one scenario."""

    scenario: Scenario
    reader: str
    concurrency: int
    asked: int
    traces: list[TurnTrace]
    wall_seconds: float
    sample: LatencySample
    stub_cpu: float
    redis_cpu: float
    driver_cpu: float
    worker_cpu: float | None = None
    rss_idle: int = 0
    rss_peak: int = 0
    threads_peak: int = 0
    fds_peak: int = 0
    backlog_peak: int = 0
    in_flight_peak: int = 0
    commands: dict[str, int] = field(default_factory=dict)
    log_warnings: int = 0

    @property
    def ok(self) -> int:
        return sum(trace.ok for trace in self.traces)

    @property
    def turns_per_second(self) -> float:
        return self.ok / self.wall_seconds if self.wall_seconds > 0 else math.nan

    def per_turn(self, value: float | None) -> float:
        return math.nan if value is None or not self.asked else value / self.asked

    @property
    def rss_per_turn(self) -> float:
        if not self.in_flight_peak or not self.rss_peak:
            return math.nan
        return (self.rss_peak - self.rss_idle) / self.in_flight_peak

    @property
    def chunks_per_turn(self) -> float:
        return sum(len(trace.chunks) for trace in self.traces) / max(1, len(self.traces))

    def problems(self) -> list[str]:
        return [f"{trace.key}: {'; '.join(trace.problems) or 'no end'}"
                for trace in self.traces if not trace.ok]

    def summary(self) -> dict[str, Any]:
        """The phase as JSON-friendly numbers (``--json``)."""
        def dist(values: Sequence[float]) -> dict[str, float]:
            return {key: value * 1000 for key, value in asdict(Distribution.of(values)).items()
                    if key != "count"}
        return {
            "scenario": asdict(self.scenario), "reader": self.reader,
            "concurrency": self.concurrency, "asked": self.asked, "ok": self.ok,
            "wall_seconds": self.wall_seconds, "turns_per_second": self.turns_per_second,
            "chunks_per_turn": self.chunks_per_turn,
            "event_latency_ms": dist(self.sample.events),
            "event_latency_all_streaming_ms": dist(self.sample.steady),
            "first_chunk_added_ms": dist(self.sample.first_chunk),
            "end_latency_ms": dist(self.sample.ends),
            "pickup_ms": dist(self.sample.pickups),
            "worker_cpu_seconds": self.worker_cpu, "stub_cpu_seconds": self.stub_cpu,
            "redis_cpu_seconds": self.redis_cpu, "driver_cpu_seconds": self.driver_cpu,
            "rss_idle_bytes": self.rss_idle, "rss_peak_bytes": self.rss_peak,
            "rss_per_in_flight_turn_bytes": self.rss_per_turn,
            "in_flight_peak": self.in_flight_peak, "threads_peak": self.threads_peak,
            "fds_peak": self.fds_peak, "subscriber_backlog_peak_bytes": self.backlog_peak,
            "redis_commands": self.commands, "worker_log_warnings": self.log_warnings,
            "problems": self.problems()[:20],
        }


@dataclass
class Bench:
    """Where the benchmark runs: its Redis, its databases, its folder, its options."""

    redis_host: str
    redis_port: int
    dbs: tuple[int, int, int]
    folder: Path
    shards: int
    warmup: int
    worker_env: dict[str, str]
    verbose: bool = True

    def url(self, db: int) -> str:
        return f"redis://{self.redis_host}:{self.redis_port}/{db}"

    def admin(self) -> redis.Redis:
        return redis.Redis(host=self.redis_host, port=self.redis_port, db=self.dbs[0],
                           socket_timeout=10)

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)

    def settings_values(self, **values: Any) -> dict[str, Any]:
        broker, results, pubsub = self.dbs
        return {"broker_url": self.url(broker), "result_backend": self.url(results),
                "pubsub_url": self.url(pubsub), **values}


# Phases -----------------------------------------------------------------------------------


def turn_fields(index: int, message_id: str) -> dict[str, Any]:
    return {"tenant_id": "bench-tenant", "app_id": "bench-app", "user_id": f"user-{index}",
            "conversation_id": f"conv-{message_id}", "message_id": message_id,
            "query": f"benchmark turn {index}"}


def run_requests(settings: Settings, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The run request the worker would send for each benchmark turn, keyed by message id."""
    template = load_template(settings.composition_template)
    return {key: build_run_request(prepare_turn(turn_fields(index, key), settings), template,
                                   settings, session_snapshot=None, run_number=1)
            for index, key in enumerate(keys)}


def run_floor(bench: Bench, scenario: Scenario, stub: Child, stub_url: str) -> Phase:
    """The floor: the driver reads every run's stream straight from the stub."""
    settings = Settings(**bench.settings_values(backend_url=stub_url))
    tag = f"f{uuid.uuid4().hex[:6]}"
    keys = [f"{tag}-{index}" for index in range(scenario.turns)]
    bodies = run_requests(settings, keys)
    traces = {key: TurnTrace(key) for key in keys}
    stub_probe, admin, me = ProcessProbe(stub.pid), bench.admin(), psutil.Process()
    bench.say(f"[{scenario.name}] floor: {scenario.turns} direct streams")
    before = _costs(stub_probe, admin, me)
    started = time.time()
    run_ids = asyncio.run(read_direct(stub_url, bodies, traces, _timeout(scenario, 10**9),
                                      stagger=scenario.token_delay))
    after = _costs(stub_probe, admin, me)
    timelines = fetch_timelines(stub_url, run_ids)
    _reset_stub(stub_url)
    return _phase(scenario, "floor", scenario.turns, list(traces.values()), started,
                  timelines, before, after, concurrency=scenario.turns)


def run_relay(bench: Bench, scenario: Scenario, stub: Child, stub_url: str) -> Phase:
    """The relay floor: the worker's three hops (relay, Redis, subscriber) with no worker in
    them (``bench.relay``)."""
    settings = Settings(**bench.settings_values(backend_url=stub_url))
    subscriber = PatternSubscriber(settings.pubsub_url, settings.channel_prefix,
                                   f"r{uuid.uuid4().hex[:6]}", bench.shards).start()
    keys = [subscriber.message_id(index) for index in range(scenario.turns)]
    bodies = run_requests(settings, keys)
    bodies_path = bench.folder / f"relay-{scenario.name}.json"
    bodies_path.write_text(json.dumps(bodies))
    stub_probe, admin, me = ProcessProbe(stub.pid), bench.admin(), psutil.Process()
    bench.say(f"[{scenario.name}] relay: {scenario.turns} streams onto Redis channels")
    try:
        before = _costs(stub_probe, admin, me)
        started = time.time()
        relay = start_relay(bench.folder, name=scenario.name, stub_url=stub_url,
                            redis_url=settings.pubsub_url,
                            channel_prefix=settings.channel_prefix, bodies=bodies_path,
                            stagger=scenario.token_delay)
        subscriber.wait_for_ends(keys, _timeout(scenario, scenario.turns))
        relay.process.wait(30)
        after = _costs(stub_probe, admin, me)
    finally:
        subscriber.close()
    phase = _subscribed_phase(scenario, "relay", subscriber, dict.fromkeys(keys, started),
                              stub_url, started, before, after, concurrency=scenario.turns)
    phase.worker_cpu = relay_cpu_seconds(relay.log_text())
    return phase


def run_worker(bench: Bench, scenario: Scenario, stub: Child, stub_url: str, *, pool: str,
               concurrency: int, turns: int, processes: int = 1) -> Phase:
    """N turns at once through ``processes`` worker processes with the given pool, each of
    ``concurrency`` slots, on one queue (as production runs one per core)."""
    reader = pool if processes == 1 else f"{pool} x{processes}"
    name = f"{scenario.name}-{pool}-{processes}"
    tag = f"b{uuid.uuid4().hex[:6]}"
    values = bench.settings_values(
        backend_url=stub_url, queue=f"bench_{tag}",
        database_url=f"sqlite:///{bench.folder / (name + '.sqlite3')}",
        coalesce_window_ms=scenario.window_ms, worker_concurrency=concurrency)
    settings = Settings(**values)
    env = {f"AGENT_TURN_{key.upper()}": str(value) for key, value in values.items()}
    env["AGENT_TURN_METRICS_PORT"] = str(free_port())  # its own, beside any other worker's
    env.update(bench.worker_env)
    admin = bench.admin()
    admin.delete(settings.queue)
    bench.say(f"[{scenario.name}] {processes} {pool} worker(s), concurrency {concurrency}: "
              f"{turns} turns")
    workers = []
    for number in range(processes):
        env["AGENT_TURN_METRICS_PORT"] = str(free_port())
        workers.append(start_worker(bench.folder, name=f"{name}-{number}", pool=pool,
                                    concurrency=concurrency, queue=settings.queue, env=env))
    producer = Celery("bench-producer")
    producer.config_from_object(celery_config(settings))
    subscriber = PatternSubscriber(settings.pubsub_url, settings.channel_prefix, tag,
                                   bench.shards).start()
    worker_probe, stub_probe, me = ProcessProbe(*(w.pid for w in workers)), \
        ProcessProbe(stub.pid), psutil.Process()
    keys = [subscriber.message_id(index) for index in range(turns)]
    starts: dict[str, float] = {}
    try:
        warm = [subscriber.message_id(index) for index in range(turns, turns + bench.warmup)]
        for index, key in enumerate(warm, start=turns):
            submit_turn(turn_fields(index, key), celery_app=producer, settings=settings)
        if not subscriber.wait_for_ends(warm, _timeout(scenario, concurrency, len(warm))):
            raise RuntimeError("the warm-up turns did not end:\n"
                               + "\n".join(w.log_tail() for w in workers))
        time.sleep(0.5)
        rss_idle = worker_probe.sample().rss_bytes
        before = _costs(stub_probe, admin, me, worker_probe)
        monitor = Monitor(worker_probe, redis_client=admin,
                          subscriber_prefix=SUBSCRIBER_NAME_PREFIX)
        with monitor:
            started = time.time()
            for index, key in enumerate(keys):
                starts[key] = time.time()
                submit_turn(turn_fields(index, key), celery_app=producer, settings=settings)
            bench.say(f"  enqueued in {time.time() - started:.2f}s")
            subscriber.wait_for_ends(keys, _timeout(scenario, concurrency, turns))
            time.sleep(0.3)  # anything published after an end would be a bug: catch it
        after = _costs(stub_probe, admin, me, worker_probe)
    finally:
        subscriber.close()
        for each in workers:
            each.stop()
        producer.close()
    phase = _subscribed_phase(scenario, reader, subscriber, {key: starts.get(key) for key in keys},
                              stub_url, started, before, after, concurrency=concurrency)
    phase.rss_idle, phase.rss_peak = rss_idle, monitor.peaks.rss_bytes
    phase.threads_peak, phase.fds_peak = monitor.peaks.threads, monitor.peaks.open_files
    phase.backlog_peak = monitor.peaks.subscriber_backlog
    phase.in_flight_peak = max_overlap((t.first_chunk_at or t.end_at, t.end_at)
                                       for t in phase.traces if t.end_at is not None)
    phase.log_warnings = sum(1 for each in workers for line in each.log_text().splitlines()
                             if "WARNING" in line or "ERROR" in line or "CRITICAL" in line)
    return phase


@dataclass(frozen=True)
class _Costs:
    stub_cpu: float
    redis_cpu: float
    driver_cpu: float
    commands: dict[str, int]
    worker_cpu: float | None
    at: float


def _costs(stub: ProcessProbe, admin: redis.Redis, me: psutil.Process,
           worker: ProcessProbe | None = None) -> _Costs:
    times = me.cpu_times()
    return _Costs(stub.sample().cpu_seconds, server_cpu_seconds(admin), times.user + times.system,
                  command_stats(admin), worker.sample().cpu_seconds if worker else None,
                  time.time())


def _subscribed_phase(scenario: Scenario, reader: str, subscriber: PatternSubscriber,
                      starts: dict[str, float | None], stub_url: str, started: float,
                      before: _Costs, after: _Costs, *, concurrency: int) -> Phase:
    """A phase whose turns the pattern subscriber received, one per key of ``starts``."""
    traces = []
    for key, started_at in starts.items():
        trace = trace_from_messages(key, subscriber.messages_of(key))
        trace.started_at = started_at
        traces.append(trace)
    timelines = fetch_timelines(stub_url, None, list(starts))
    _reset_stub(stub_url)
    return _phase(scenario, reader, len(starts), traces, started, timelines, before, after,
                  concurrency=concurrency)


def _phase(scenario: Scenario, reader: str, asked: int, traces: list[TurnTrace],
           started: float, timelines: dict[str, RunTimeline], before: _Costs, after: _Costs,
           *, concurrency: int) -> Phase:
    ends = [trace.end_at for trace in traces if trace.end_at is not None]
    wall = (max(ends) if ends else after.at) - started
    for trace in traces:
        timeline = timelines.get(trace.key)
        if trace.ok and timeline is not None and trace.text != timeline.text:
            trace.problems.append("the streamed text differs from the stub's answer")
    worker_cpu = None
    if before.worker_cpu is not None and after.worker_cpu is not None:
        worker_cpu = after.worker_cpu - before.worker_cpu
    return Phase(
        scenario=scenario, reader=reader, concurrency=concurrency, asked=asked, traces=traces,
        wall_seconds=wall, sample=latencies(traces, timelines),
        stub_cpu=after.stub_cpu - before.stub_cpu, redis_cpu=after.redis_cpu - before.redis_cpu,
        driver_cpu=after.driver_cpu - before.driver_cpu, worker_cpu=worker_cpu,
        commands=commands_delta(before.commands, after.commands),
    )


def _timeout(scenario: Scenario, concurrency: int, turns: int | None = None) -> float:
    """Generous: the answers, run ``concurrency`` at a time, plus a minute."""
    rounds = math.ceil((turns or scenario.turns) / concurrency)
    return rounds * (scenario.answer_seconds + 2) + 60


def fetch_timelines(stub_url: str, run_ids: dict[str, str] | None,
                    keys: Sequence[str] = ()) -> dict[str, RunTimeline]:
    """Every run's event log, from the stub's paging API, as token emission timelines."""
    session = requests.Session()
    if run_ids is None:
        wanted = set(keys)
        listing = session.get(f"{stub_url}/_stub/runs", timeout=60)
        listing.raise_for_status()
        run_ids = {run["message_id"]: run["run_id"] for run in listing.json()["runs"]
                   if run["message_id"] in wanted}

    def events_of(run_id: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        after = "0-0"
        while True:
            page = session.get(f"{stub_url}/runs/{run_id}/events",
                               params={"after": after, "limit": 500}, timeout=30)
            page.raise_for_status()
            body = page.json()
            events.extend(body["events"])
            if len(body["events"]) < 500:
                return events
            after = body["next_cursor"]

    with ThreadPoolExecutor(8) as pool:
        logs = dict(zip(run_ids, pool.map(events_of, run_ids.values()), strict=True))
    session.close()
    return {key: RunTimeline.from_envelopes(events) for key, events in logs.items()}


@contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage-collector pause in the driver while it stamps what it receives.

    The driver keeps every message of a phase, so its full collections grow to ~50 ms by the
    end of one, and each would delay the stamps of every event in flight: the reader under test
    would be charged for the driver's pause. It collects after the phase instead.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


def _reset_stub(stub_url: str) -> None:
    requests.delete(f"{stub_url}/_stub/state", timeout=30).raise_for_status()


# The report --------------------------------------------------------------------------------


def _ms(values: Sequence[float]) -> str:
    if not values:
        return "-"
    dist = Distribution.of(values)
    return f"{dist.p50 * 1000:.1f} / {dist.p99 * 1000:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(top: float | None, bottom: float | None) -> str:
    if top is None or bottom is None or math.isnan(top) or math.isnan(bottom) or bottom == 0:
        return "-"
    ratio = top / bottom
    return f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:,.2f}x"


Row = tuple[str, Callable[[Phase], str], Callable[[Phase], float | None] | None]

ROWS: list[Row] = [
    ("turns ended correctly / asked", lambda p: f"{p.ok:,} / {p.asked:,}", None),
    ("concurrency (slots)", lambda p: f"{p.concurrency:,}", None),
    ("wall time, s (first enqueue → last end)", lambda p: _num(p.wall_seconds, 2), None),
    ("**turns/s**", lambda p: _num(p.turns_per_second, 2), lambda p: p.turns_per_second),
    ("answer events per turn", lambda p: _num(p.chunks_per_turn, 1), None),
    ("event latency p50 / p99, ms", lambda p: _ms(p.sample.events),
     lambda p: Distribution.of(p.sample.events).p50),
    ("**event latency, all N streaming, p50 / p99, ms**", lambda p: _ms(p.sample.steady),
     lambda p: Distribution.of(p.sample.steady).p50),
    ("first chunk, added, p50 / p99, ms", lambda p: _ms(p.sample.first_chunk),
     lambda p: Distribution.of(p.sample.first_chunk).p50),
    ("end latency p50 / p99, ms", lambda p: _ms(p.sample.ends), None),
    ("pick-up (enqueue → run created) p50 / p99, ms", lambda p: _ms(p.sample.pickups), None),
    ("**worker CPU s per turn**", lambda p: _num(p.per_turn(p.worker_cpu), 4),
     lambda p: p.per_turn(p.worker_cpu)),
    ("worker RSS idle → peak, MB",
     lambda p: f"{p.rss_idle / 2**20:,.0f} → {p.rss_peak / 2**20:,.0f}" if p.rss_peak else "-",
     None),
    ("peak turns in flight", lambda p: f"{p.in_flight_peak:,}" if p.rss_peak else "-", None),
    ("**RSS per in-flight turn, KB**", lambda p: _num(p.rss_per_turn / 1024, 0), None),
    ("worker threads / open fds, peak",
     lambda p: f"{p.threads_peak:,} / {p.fds_peak:,}" if p.rss_peak else "-", None),
    ("Redis commands per turn (scripts' included)",
     lambda p: _num(p.per_turn(sum(p.commands.values())), 1),
     lambda p: p.per_turn(sum(p.commands.values())) if p.reader != "floor" else None),
    ("stub CPU s per turn", lambda p: _num(p.per_turn(p.stub_cpu), 4), None),
    ("Redis server CPU s per turn", lambda p: _num(p.per_turn(p.redis_cpu), 4), None),
    ("driver CPU, % of one core", lambda p: _num(100 * p.driver_cpu / p.wall_seconds, 0),
     None),
    ("subscriber backlog in Redis, peak bytes",
     lambda p: f"{p.backlog_peak:,}" if p.reader != "floor" else "-", None),
    ("worker log warnings + errors",
     lambda p: f"{p.log_warnings:,}" if p.reader not in ("floor", "relay") else "-", None),
]


def added_over_floor_row(floor: Phase | None) -> Row:
    """What a reader adds to the floor's event latency, all N streaming: its p50 minus the
    floor's p50, its p99 minus the floor's p99 (the two runs' events are not paired, so this
    is a difference of percentiles). The issue's "added latency per event" target is this."""
    def show(phase: Phase) -> str:
        if floor is None or phase is floor or not phase.sample.steady or not floor.sample.steady:
            return "-"
        mine, base = Distribution.of(phase.sample.steady), Distribution.of(floor.sample.steady)
        return f"{(mine.p50 - base.p50) * 1000:.1f} / {(mine.p99 - base.p99) * 1000:.1f}"
    return ("**added over the floor, all N streaming, p50 / p99, ms**", show, None)


def report(phases: Sequence[Phase]) -> str:
    """Markdown: one table per scenario, readers side by side, then the ratios."""
    out: list[str] = []
    for scenario in dict.fromkeys(phase.scenario for phase in phases):
        group = [phase for phase in phases if phase.scenario == scenario]
        floor = next((p for p in group if p.reader == "floor"), None)
        prefork = next((p for p in group if p.reader == "prefork"), None)
        relay = next((p for p in group if p.reader == "relay"), None)
        main = next((p for p in group if p.reader not in ("floor", "relay", "prefork")), None)
        out.append(f"### {scenario.name}: {scenario.turns:,} turns x {scenario.answer_tokens} "
                   f"tokens every {scenario.token_delay * 1000:g} ms "
                   f"({scenario.answer_seconds:g} s answers), coalescing window "
                   f"{scenario.window_ms:g} ms\n")
        out.append(f"{scenario.why}.\n")
        columns = [p.reader for p in group]
        ratio_columns: list[tuple[str, Phase, Phase]] = []
        if main is not None and prefork is not None:
            ratio_columns.append((f"{main.reader} ÷ prefork", main, prefork))
        if main is not None and floor is not None:
            ratio_columns.append((f"{main.reader} ÷ floor", main, floor))
        if main is not None and relay is not None:
            ratio_columns.append((f"{main.reader} ÷ relay", main, relay))
        header = ["", *columns, *(name for name, _, _ in ratio_columns)]
        out.append("| " + " | ".join(header) + " |")
        out.append("| --- " * len(header) + "|")
        steady_at = next(i for i, row in enumerate(ROWS) if "all N streaming" in row[0]) + 1
        rows = [*ROWS[:steady_at], added_over_floor_row(floor), *ROWS[steady_at:]]
        for label, show, value in rows:
            cells = [label, *(show(p) for p in group)]
            for _, top, bottom in ratio_columns:
                cells.append(_ratio(value(top), value(bottom)) if value else "")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        for phase in group:
            problems = phase.problems()
            if problems:
                out.append(f"{phase.reader}: {len(problems)} turn(s) failed, e.g. "
                           + "; ".join(problems[:3]))
        out.append("")
    return "\n".join(out)


# Command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--turns", type=int, help="override the scenarios' number of turns")
    parser.add_argument("--answer-tokens", type=int, help="override: tokens per answer")
    parser.add_argument("--token-delay", type=float, help="override: seconds between tokens")
    parser.add_argument("--window-ms", type=float, help="override: coalescing window")
    parser.add_argument("--pools", default="gevent,threads",
                        help="comma-separated I/O pools for the worker (gevent,threads)")
    parser.add_argument("--worker-processes", default="1",
                        help="comma-separated numbers of worker processes to run each I/O pool "
                             "with, side by side, e.g. 1,2 (default 1)")
    parser.add_argument("--concurrency", type=int, default=1000,
                        help="the I/O-pool worker's concurrency (default 1000)")
    parser.add_argument("--prefork-turns", type=int,
                        help="turns for the prefork worker, 0 skips it (default: the "
                             "throughput scenario's 4, none elsewhere)")
    parser.add_argument("--no-floor", action="store_true", help="skip the direct read")
    parser.add_argument("--warmup", type=int, default=4, help="warm-up turns per worker")
    parser.add_argument("--shards", type=int, default=4, help="pub/sub connections")
    parser.add_argument("--redis-host", default="127.0.0.1")
    parser.add_argument("--redis-port", type=int, default=6379)
    parser.add_argument("--redis-dbs", default="13,14,15",
                        help="broker,results,pub/sub databases, flushed first (default 13,14,15)")
    parser.add_argument("--private-redis", action="store_true",
                        help="start a Redis of our own: command counts see no other client")
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the workers, e.g. AGENT_TURN_DB_POOL_SIZE=4")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--keep", action="store_true", help="keep the folder with the logs")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser.parse_args(argv)


def scenarios_from(args: argparse.Namespace) -> list[Scenario]:
    chosen = list(SCENARIOS.values()) if args.scenario == "all" else [SCENARIOS[args.scenario]]
    overrides = {name: value for name, value in {
        "turns": args.turns, "answer_tokens": args.answer_tokens,
        "token_delay": args.token_delay, "window_ms": args.window_ms,
        "prefork_turns": args.prefork_turns}.items()
        if value is not None}
    return [replace(scenario, **overrides) for scenario in chosen]


@contextmanager
def _folder(keep: bool) -> Iterator[Path]:
    if keep:
        yield Path(tempfile.mkdtemp(prefix="agent-turn-bench-"))
        return
    with tempfile.TemporaryDirectory(prefix="agent-turn-bench-") as name:
        yield Path(name)


def run(args: argparse.Namespace) -> list[Phase]:
    dbs = tuple(int(part) for part in args.redis_dbs.split(","))
    if len(dbs) != 3:
        raise SystemExit("--redis-dbs takes three numbers: broker,results,pub/sub")
    pools = [pool.strip() for pool in args.pools.split(",") if pool.strip()]
    worker_processes = [int(n) for n in args.worker_processes.split(",") if n.strip()]
    phases: list[Phase] = []
    with ExitStack() as stack:
        folder = stack.enter_context(_folder(args.keep))
        host, port = args.redis_host, args.redis_port
        if args.private_redis:
            redis_child, port = start_private_redis(folder)
            stack.callback(redis_child.stop)
            host = "127.0.0.1"
        bench = Bench(host, port, (dbs[0], dbs[1], dbs[2]), folder, args.shards, args.warmup,
                      dict(item.split("=", 1) for item in args.worker_env),
                      verbose=not args.quiet)
        bench.say(f"benchmark folder {folder}; Redis {host}:{port} dbs {args.redis_dbs}")
        for db in dbs:
            redis.Redis(host=host, port=port, db=db).flushdb()
        for scenario in scenarios_from(args):
            stub, stub_url = start_stub(folder, answer_tokens=scenario.answer_tokens,
                                        token_delay=scenario.token_delay)
            steps: list[Callable[[], Phase]] = []
            if not args.no_floor:
                steps += [partial(run_floor, bench, scenario, stub, stub_url),
                          partial(run_relay, bench, scenario, stub, stub_url)]
            steps += [partial(run_worker, bench, scenario, stub, stub_url, pool=pool,
                              concurrency=args.concurrency, turns=scenario.turns,
                              processes=processes)
                      for pool in pools for processes in worker_processes]
            if scenario.prefork_turns:
                steps.append(partial(run_worker, bench, scenario, stub, stub_url, pool="prefork",
                                     concurrency=2, turns=scenario.prefork_turns))
            try:
                for step in steps:
                    with collector_paused():
                        phases.append(step())
            finally:
                stub.stop()
    return phases


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    phases = run(args)
    print(report(phases))
    if args.json:
        args.json.write_text(json.dumps([phase.summary() for phase in phases], indent=2))
    return 0 if all(phase.ok == phase.asked for phase in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
