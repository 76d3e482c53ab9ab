"""The load benchmark, run small: every phase must still start its processes, carry its turns and
measure them, so the driver cannot rot between the runs that fill docs/performance.md.

It runs on a Redis of its own (``--private-redis``): the benchmark flushes its databases, which
must never be the ones the rest of the suite is using.
"""

from __future__ import annotations

import math
import shutil

import pytest

from bench.load import main, parse_args, report, run
from bench.metrics import RunTimeline, TurnTrace, latencies, max_overlap, percentile
from bench.wakeup import main as wakeup_main
from bench.wakeup import measure, table

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="the benchmark starts its own redis-server")


def test_a_tiny_load_runs_every_phase_and_measures_it() -> None:
    args = parse_args(["--scenario", "throughput", "--turns", "3", "--answer-tokens", "4",
                       "--token-delay", "0.01", "--prefork-turns", "2", "--warmup", "1",
                       "--concurrency", "8", "--private-redis", "--quiet"])

    phases = run(args)

    assert [phase.reader for phase in phases] == ["floor", "gevent", "threads", "prefork"]
    for phase in phases:
        assert phase.ok == phase.asked, phase.problems()
        assert phase.turns_per_second > 0
        assert phase.sample.events and phase.sample.first_chunk and phase.sample.ends
    for phase in phases[1:]:
        assert phase.worker_cpu is not None and phase.worker_cpu > 0
        assert phase.rss_peak > 0 and phase.commands.get("evalsha", 0) > 0
    table = report(phases)
    assert "gevent ÷ prefork" in table and "**turns/s**" in table


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
