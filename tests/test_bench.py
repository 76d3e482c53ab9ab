"""The load benchmark, run small: every phase must still start its processes, carry its turns and
measure them, so the driver cannot rot between the runs that fill docs/performance.md.

It runs on a Redis of its own (``--private-redis``): the benchmark flushes its databases, which
must never be the ones the rest of the suite is using.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import uuid
import weakref
from pathlib import Path

import pytest

from bench.load import (
    SCENARIOS,
    Phase,
    added_over_floor_row,
    collector_paused,
    main,
    parse_args,
    report,
    run,
    run_requests,
)
from bench.metrics import (
    LatencySample,
    RunTimeline,
    TurnTrace,
    latencies,
    max_overlap,
    percentile,
    trace_from_messages,
)
from bench.open_loop import arrivals
from bench.publish_designs import main as publish_designs_main
from bench.readers import PatternSubscriber, follow_stream, read_direct, stagger_of
from bench.relay import Relay
from bench.relay import main as relay_main
from bench.stream_path import main as stream_path_main
from bench.turn_costs import main as turn_costs_main
from bench.wakeup import main as wakeup_main
from bench.wakeup import measure, table
from config.settings import Settings
from stub_backend import StubServer
from tests.conftest import (
    PUBSUB_DB,
    REDIS_HOST,
    REDIS_PORT,
    ROOT,
    base_settings,
    new_postgres_schema,
)

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="the benchmark starts its own redis-server")


def test_a_tiny_load_runs_every_phase_and_measures_it() -> None:
    args = parse_args(["--scenario", "throughput", "--turns", "3", "--answer-tokens", "4",
                       "--token-delay", "0.01", "--prefork-turns", "2", "--warmup", "1",
                       "--concurrency", "8", "--private-redis", "--quiet"])

    phases = run(args)

    assert [phase.reader for phase in phases] == ["floor", "relay", "gevent", "threads",
                                                  "prefork"]
    for phase in phases:
        assert phase.ok == phase.asked, phase.problems()
        assert phase.turns_per_second > 0
        assert phase.sample.events and phase.sample.first_chunk and phase.sample.ends
    relay, workers = phases[1], phases[2:]
    assert relay.worker_cpu is not None and relay.worker_cpu > 0
    assert relay.commands.get("publish", 0) > 0 and "evalsha" not in relay.commands
    for phase in workers:
        assert phase.worker_cpu is not None and phase.worker_cpu > 0
        assert phase.rss_peak > 0 and phase.commands.get("evalsha", 0) > 0
    table = report(phases)
    assert "gevent ÷ prefork" in table and "gevent ÷ relay" in table
    added = next(line for line in table.splitlines() if "added over the floor" in line)
    assert added.split(" | ")[1] == "-"  # the floor adds nothing to itself
    assert "**turns/s**" in table


def test_worker_processes_side_by_side_share_one_queue_and_are_measured_together() -> None:
    args = parse_args(["--scenario", "throughput", "--turns", "6", "--answer-tokens", "3",
                       "--token-delay", "0.01", "--prefork-turns", "0", "--warmup", "1",
                       "--concurrency", "8", "--pools", "gevent", "--worker-processes", "1,2",
                       "--no-floor", "--private-redis", "--quiet"])

    one, two = run(args)

    assert (one.reader, two.reader) == ("gevent", "gevent x2")
    assert one.ok == one.asked == two.ok == two.asked == 6, two.problems()
    assert two.rss_idle > one.rss_idle * 1.5, "both processes' memory is counted"
    assert two.worker_cpu is not None and two.worker_cpu > 0


def test_the_open_loop_probe_reads_every_arrival_on_the_gateway(tmp_path: Path) -> None:
    out = tmp_path / "open-loop.json"
    completed = subprocess.run(
        [sys.executable, "-m", "bench.open_loop", "--rate", "6", "--seconds", "1.5",
         "--answer-tokens", "3", "--token-delay", "0.02", "--warmup", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT)})

    assert completed.returncode == 0, completed.stderr[-3000:]
    floor, worker = json.loads(out.read_text())
    assert (floor["reader"], worker["reader"]) == ("floor", "worker")
    assert floor["arrived"] == worker["arrived"] > 0, "both phases get the same arrivals"
    assert worker["ok"] == worker["arrived"] and floor["ok"] == floor["arrived"]
    assert worker["first_chunk_ms"]["p50"] > 0 and worker["cpu_seconds"]["gateway"] > 0
    assert "added over the floor" in completed.stdout


def test_open_loop_arrivals_are_a_seeded_poisson_process() -> None:
    first, again = arrivals(50, 200, seed=3), arrivals(50, 200, seed=3)

    gaps = [b - a for a, b in itertools.pairwise(first)]
    assert first == again and first != arrivals(50, 200, seed=4)
    assert 9_000 < len(first) < 11_000 and all(0 <= t < 200 for t in first)
    assert abs(statistics.mean(gaps) - 0.02) < 0.002
    assert abs(statistics.stdev(gaps) - 0.02) < 0.002, "exponential: sd equals the mean"


def test_main_exits_non_zero_when_a_turn_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    class Failed:
        ok, asked = 0, 1

        @staticmethod
        def summary() -> dict[str, int]:
            return {}

    monkeypatch.setattr("bench.load.run", lambda args: [Failed()])
    monkeypatch.setattr("bench.load.report", lambda phases: "")
    assert main(["--quiet"]) == 1


def test_a_coalesced_chunk_is_charged_from_its_newest_token() -> None:
    timeline = RunTimeline(ends=(2, 5, 9), emitted=(10.0, 10.1, 10.2), created=9.9,
                           finished=10.3, text="ab" + "cde" + "fghi")
    trace = TurnTrace("t", started_at=9.8)
    trace.add_delta(10.0005, "ab")
    trace.add_delta(10.25, "cdefghi")  # tokens 2 and 3 together, 50 ms after token 3
    trace.end_at = 10.31

    sample = latencies([trace], {"t": timeline})

    assert [round(value, 4) for value in sample.events] == [0.0005, 0.05]
    assert [round(value, 4) for value in sample.first_chunk] == [0.0005]
    assert [round(value, 4) for value in sample.pickups] == [0.1]
    assert [round(value, 4) for value in sample.ends] == [0.01]


def test_percentiles_and_overlap() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert percentile(list(range(1, 101)), 0.99) == 99
    assert math.isnan(percentile([], 0.5))
    assert max_overlap([(0, 10), (1, 6), (5, 11), (10.5, 12)]) == 3


def test_the_wakeup_probe_measures_each_pause_in_both_processes() -> None:
    rows = [measure(gap_ms, 30) for gap_ms in (0.0, 1.0)]

    assert [(row.gap_ms, row.messages) for row in rows] == [(0.0, 30), (1.0, 30)]
    for row in rows:
        assert 0 < row.round_trip_p50_us <= row.round_trip_p99_us
        assert row.client_cpu_us > 0 and row.echo_cpu_us > 0
    assert "| 1 ms | 30 |" in table(rows)


def test_the_wakeup_probe_refuses_a_negative_pause() -> None:
    with pytest.raises(SystemExit) as exited:
        wakeup_main(["--gaps-ms", "1,-2"])
    assert exited.value.code == 2


def _relay_bodies(stub_url: str, subscriber: PatternSubscriber, turns: int
                  ) -> tuple[Settings, dict[str, dict[str, object]]]:
    settings = base_settings(backend_url=stub_url)
    return settings, run_requests(settings, [subscriber.message_id(i) for i in range(turns)])


def test_the_relay_puts_every_run_on_its_channel_in_order(stub_server: StubServer) -> None:
    settings = base_settings()
    subscriber = PatternSubscriber(settings.pubsub_url, settings.channel_prefix,
                                   f"r{uuid.uuid4().hex[:6]}", shards=2).start()
    try:
        settings, bodies = _relay_bodies(stub_server.url, subscriber, 3)
        relay = Relay(stub_server.url, f"redis://{REDIS_HOST}:{REDIS_PORT}/{PUBSUB_DB}",
                      settings.channel_prefix)

        asyncio.run(asyncio.wait_for(relay.run(bodies), timeout=30))

        assert relay.confirmed == relay.events > 0, "the relay returned before Redis had all"
        assert subscriber.wait_for_ends(list(bodies), timeout=10)
    finally:
        subscriber.close()
    assert relay.failures == []
    for key in bodies:
        trace = trace_from_messages(key, subscriber.messages_of(key))
        assert trace.ok, trace.problems
        assert trace.end_kind == "message_end" and len(trace.chunks) > 1
    assert relay.events == sum(len(subscriber.messages_of(key)) for key in bodies)


def test_the_relay_ends_a_refused_run_with_an_error_and_exits_non_zero(
        stub_server: StubServer, tmp_path: Path) -> None:
    settings = base_settings()
    subscriber = PatternSubscriber(settings.pubsub_url, settings.channel_prefix,
                                   f"r{uuid.uuid4().hex[:6]}", shards=1).start()
    try:
        refused = subscriber.message_id(0)
        bodies_file = tmp_path / "bodies.json"
        bodies_file.write_text(json.dumps({refused: {"not": "a run request"}}))

        code = relay_main(["--stub", stub_server.url,
                           "--redis-url", f"redis://{REDIS_HOST}:{REDIS_PORT}/{PUBSUB_DB}",
                           "--channel-prefix", settings.channel_prefix,
                           "--bodies", str(bodies_file)])

        assert subscriber.wait_for_ends([refused], timeout=10)
    finally:
        subscriber.close()
    assert code == 1
    [(_, raw)] = subscriber.messages_of(refused)
    event = json.loads(raw)
    assert event["event"] == "error" and event["code"] == "relay"
    assert "create answered 4" in event["message"]


def test_the_relay_refuses_bodies_that_are_not_an_object(tmp_path: Path) -> None:
    bodies_file = tmp_path / "bodies.json"
    bodies_file.write_text("[1, 2]")

    with pytest.raises(SystemExit) as exited:
        relay_main(["--stub", "http://127.0.0.1:9", "--redis-url", "redis://127.0.0.1:9/0",
                    "--channel-prefix", "x:", "--bodies", str(bodies_file)])

    assert exited.value.code == 2


def run_gevent_probe(module: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """A probe in its own process: it patches the standard library for gevent, as the worker
    does, so it cannot run in the test's."""
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent.parent)


def test_the_stream_path_probe_reads_and_publishes_every_token(tmp_path: Path) -> None:
    figures = tmp_path / "path.json"

    done = run_gevent_probe("bench.stream_path", "--turns", "3", "--answer-tokens", "5",
                            "--token-delay", "0.02", "--json", str(figures))

    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(figures.read_text())
    assert [(row["mode"], row["failures"]) for row in rows] == [("read", 0), ("publish", 0)]
    assert rows[0]["events"] == rows[1]["events"] >= 3 * 5  # every token, counted per run
    for row in rows:
        assert row["cpu_us_per_event"] > 0
        assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
    assert f"| publish | 3 | {rows[1]['events']} |" in done.stdout


def test_the_turn_costs_probe_charges_each_stage_of_real_turns(tmp_path: Path) -> None:
    figures = tmp_path / "costs.json"

    done = run_gevent_probe("bench.turn_costs", "--turns", "3", "--answer-tokens", "2",
                            "--token-delay", "0.01", "--json", str(figures))

    assert done.returncode == 0, done.stdout + done.stderr
    costs = json.loads(figures.read_text())
    stages = costs["stages_ms_per_turn"]
    assert {"database", "backend call", "publishing", "opening the event stream"} <= set(stages)
    assert all(ms > 0 for ms in stages.values())
    assert sum(stages.values()) < costs["cpu_ms_per_turn"]
    # Every turn made its writes and round trips: 4 transactions, a create, a published end.
    assert costs["sql_per_turn"]["commits"] == 4
    assert "round trips" not in costs["sql_per_turn"]  # counted on PostgreSQL only
    assert costs["calls_per_turn"]["backend call: create_run"] == 1
    assert costs["calls_per_turn"]["publishing: end"] == 1
    # The start is one round trip (owner, stop flag, lease), and a first attempt reads no
    # replay log: nothing can be on its client's screen yet.
    assert costs["calls_per_turn"]["redis: the start (owner, stop flag, lease): _start"] == 1
    assert not [call for call in costs["calls_per_turn"]
                if call.endswith((": record_owner", ": client_text", ": stop_requested",
                                  ": acquire"))]
    assert costs["redis_commands_per_turn"]["evalsha"] >= 3
    assert "| **whole turn** |" in done.stdout


def test_the_turn_costs_probe_counts_a_postgresql_turns_round_trips(tmp_path: Path) -> None:
    figures = tmp_path / "costs.json"
    url, drop = new_postgres_schema()
    try:
        done = run_gevent_probe("bench.turn_costs", "--turns", "2", "--answer-tokens", "2",
                                "--token-delay", "0.01", "--database-url", url,
                                "--json", str(figures))
    finally:
        drop()

    assert done.returncode == 0, done.stdout + done.stderr
    sql = json.loads(figures.read_text())["sql_per_turn"]
    # Four transactions: each statement is a round trip, and so are a BEGIN and a COMMIT for
    # each transaction but the run id's (one statement, in autocommit). Nothing else: no ping
    # before a transaction (docs/performance.md). A new round trip in a turn fails this test.
    assert (sql["statements"], sql["commits"]) == (12, 4)
    assert sql["round trips"] == sql["statements"] + 2 * 3 == 18


@pytest.mark.parametrize("argv", [["--turns", "0"], ["--answer-tokens", "0"],
                                  ["--token-delay", "-1"]])
def test_the_turn_costs_probe_refuses_bad_options(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        turn_costs_main(argv, run=lambda **_: pytest.fail("must not run"))
    assert exited.value.code == 2


@pytest.mark.parametrize("argv", [["--modes", "read,teleport"], ["--turns", "0"]])
def test_the_stream_path_probe_refuses_bad_options(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        stream_path_main(argv)
    assert exited.value.code == 2


def test_added_latency_is_the_readers_percentiles_minus_the_floors() -> None:
    def phase(reader: str, steady_ms: list[float]) -> Phase:
        sample = LatencySample(events=[], steady=[ms / 1000 for ms in steady_ms],
                               first_chunk=[], ends=[], pickups=[])
        return Phase(scenario=SCENARIOS["latency"], reader=reader, concurrency=1, asked=1,
                     traces=[], wall_seconds=1.0, sample=sample, stub_cpu=0.0, redis_cpu=0.0,
                     driver_cpu=0.0)
    floor = phase("floor", [1.0] * 98 + [5.0, 5.0])
    worker = phase("gevent", [2.5] * 98 + [9.0, 9.0])

    label, show, _ = added_over_floor_row(floor)

    assert "added over the floor" in label
    assert show(worker) == "1.5 / 4.0"
    assert show(floor) == "-"
    assert added_over_floor_row(None)[1](worker) == "-"


def test_the_driver_does_not_collect_during_a_phase_and_collects_after_it() -> None:
    collected = []

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    with pytest.raises(RuntimeError), collector_paused():
        assert not gc.isenabled()
        weakref.finalize(Cycle(), collected.append, True)
        assert collected == []
        raise RuntimeError("a phase that fails")

    assert gc.isenabled()
    assert collected == [True]


def test_a_stream_closed_before_its_terminal_event_fails_only_its_own_turn() -> None:
    """A connection the stub closes mid-run is that turn's failure, not an exception that
    stops every other run read beside it (it once cut a relay phase short by 23 turns)."""
    event = b'data: {"type": "run_started", "agent_message_delta": "Hi"}\n\n'
    trace = TurnTrace("closed")

    async def follow_closed_stream() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"%x\r\n%s\r\n" % (len(event), event))
        reader.feed_eof()
        await follow_stream(reader, trace)

    asyncio.run(follow_closed_stream())

    assert trace.text == "Hi" and not trace.ok
    assert trace.problems == ["StreamRefused: the stub closed the connection before a "
                              "terminal event"]


def test_the_floor_starts_its_runs_spread_over_one_token_interval(
        stub_server: StubServer) -> None:
    """The stub paces each run from its own start, so runs started together stay in step; the
    floor spreads its starts as a worker's pick-up does, so it does not read bursts of N."""
    settings = base_settings(backend_url=stub_server.url)
    keys = [f"stagger-{uuid.uuid4().hex[:6]}-{index}" for index in range(4)]
    traces = {key: TurnTrace(key) for key in keys}

    run_ids = asyncio.run(read_direct(stub_server.url, run_requests(settings, keys), traces,
                                      timeout=30, stagger=0.2))

    assert len(run_ids) == 4 and all(trace.ok for trace in traces.values())
    starts = [traces[key].started_at for key in keys]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert all(0.04 <= gap < 0.1 for gap in gaps), gaps  # 0.2 s / 4 runs apart
    assert [stagger_of(index, 4, 0.2) for index in range(4)] == pytest.approx([0, 0.05, 0.1, 0.15])


def test_the_replay_memory_probe_measures_a_compacted_and_a_whole_log() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.replay_memory", "--tokens", "80", "--token-delay",
         "0.005"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})

    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in completed.stdout.splitlines()
            if line.startswith("| compacted") or line.startswith("| whole")}
    compacted, whole = rows["compacted"], rows["whole"]
    assert int(compacted[3]) <= 3 < int(whole[3]), "a replace and the end, beside a step"
    assert int(compacted[1].replace(",", "")) < int(whole[1].replace(",", ""))
    assert int(compacted[4]) > 0, "resumes were checked"


@pytest.mark.parametrize(("batch", "script_checks"), [(1, 0.0), (10, 0.1)])
def test_the_publish_designs_probe_counts_each_designs_commands_and_checks_its_log(
    batch: int, script_checks: float, capsys: pytest.CaptureFixture[str]
) -> None:
    assert publish_designs_main(["--events", "200", "--per-turn", "20", "--rounds", "1",
                                 "--batch", str(batch)]) == 0

    rows = [[cell.strip() for cell in line.split("|")[1:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    # A pipeline with scripts asks SCRIPT EXISTS once per round trip (redis-py).
    assert {row[0]: float(row[1]) for row in rows} == pytest.approx({
        "today (worker/publisher.py)": 5 + script_checks, "client seq, fenced": 4 + script_checks,
        "no fence": 3 + script_checks, "relay (PUBLISH)": 1.0})
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)


def test_the_publish_designs_probe_refuses_bad_options() -> None:
    with pytest.raises(SystemExit):
        publish_designs_main(["--batch", "0"])


def test_the_gateway_load_probe_delivers_every_event_of_every_stream() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.gateway_load", "--streams", "20", "--rate", "10",
         "--seconds", "1", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT)})

    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["delivered"] == result["expected"] > 20 * 5
    assert result["complete"] == 20
    assert result["gateway_us_per_frame"] > 0 and result["cut_streams"] == {}
