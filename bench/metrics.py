"""What a benchmark phase measured, computed from timestamps: pure functions, no I/O.

The latency figures compare two clocks on the same machine (``time.time()`` in the stub, which
stamps each event's ``created_at`` as it appends it to the run, and in the reader, which stamps
each message as it comes off the socket), so they need no synchronisation.

Definitions (also in docs/performance.md):

- **event latency**: for each answer event a reader receives, its receive time minus the
  stub's emission time of the *newest* token it contains. A coalesced chunk holding tokens
  3 to 5 is charged from token 5's emission; the older tokens waited longer, by design of the
  coalescing window, and that wait is the window's, not the pipeline's.
- **time to first chunk, added**: receive time of a turn's first answer event minus the
  emission time of its first token. It includes whatever happened before the stream was read
  (task pick-up, database, run creation) only as far as it delayed the first token's delivery.
- **end latency**: receive time of ``message_end`` minus the emission of the run's terminal
  event: the cost of finishing a turn (final flush, saving the answer, publishing the end).
- **pick-up**: the run's first event's emission minus the time the driver enqueued the turn
  (or, for the floor, sent the create request): queueing plus everything before the run exists.
- **steady**: the event latencies of tokens emitted while every turn of the load was streaming
  (after the last turn's first token, before the first turn's last token): the latency *at* N
  concurrent turns, without the start-up burst of N turns arriving at once.
"""

from __future__ import annotations

import bisect
import json
import math
import resource
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

END_EVENTS = frozenset({"message_end", "error"})


def process_cpu_seconds() -> float:
    """User and system CPU of this process so far (its threads and greenlets included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of unsorted values; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Distribution:
    """Median, 99th percentile and maximum of a sample, in the sample's unit."""

    count: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        return cls(len(values), percentile(values, 0.50), percentile(values, 0.99),
                   max(values) if values else math.nan)


def parse_created_at(stamp: str) -> float:
    """The stub's ``created_at`` (``2025-01-01T12:00:00.123456Z``) as Unix seconds."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class RunTimeline:
    """When the stub emitted each answer token of one run, by cumulative answer length.

    ``ends[i]`` is the length of the answer once token ``i`` is appended, ``emitted[i]`` the
    emission time of that token; ``finished`` the emission time of the terminal event.
    """

    ends: tuple[int, ...]
    emitted: tuple[float, ...]
    created: float | None
    finished: float | None
    text: str

    @classmethod
    def from_envelopes(cls, envelopes: Iterable[dict[str, Any]]) -> RunTimeline:
        ends: list[int] = []
        emitted: list[float] = []
        parts: list[str] = []
        created = finished = None
        length = 0
        for envelope in envelopes:
            if created is None:
                created = parse_created_at(envelope["created_at"])
            delta = envelope.get("agent_message_delta")
            if isinstance(delta, str) and delta:
                length += len(delta)
                parts.append(delta)
                ends.append(length)
                emitted.append(parse_created_at(envelope["created_at"]))
            if envelope.get("type") in ("run_succeeded", "run_failed", "run_cancelled"):
                finished = parse_created_at(envelope["created_at"])
        return cls(tuple(ends), tuple(emitted), created, finished, "".join(parts))

    def newest_token_at(self, answer_length: int) -> float:
        """Emission time of the newest token inside the first ``answer_length`` characters."""
        index = bisect.bisect_right(self.ends, answer_length) - 1
        if index < 0:
            raise ValueError(f"no whole token within the first {answer_length} characters")
        return self.emitted[index]


@dataclass
class TurnTrace:
    """What one reader saw of one turn: each answer event's receive time and running length."""

    key: str
    started_at: float | None = None  # when the driver asked for the turn (enqueue or create)
    chunks: list[tuple[float, int]] = field(default_factory=list)
    text: str = ""
    end_at: float | None = None
    end_kind: str | None = None
    end_answer: str | None = None
    problems: list[str] = field(default_factory=list)

    def add_delta(self, received_at: float, delta: str) -> None:
        self.text += delta
        self.chunks.append((received_at, len(self.text)))

    @property
    def ok(self) -> bool:
        return self.end_kind == "message_end" and not self.problems

    @property
    def first_chunk_at(self) -> float | None:
        return self.chunks[0][0] if self.chunks else None


def trace_from_messages(key: str, messages: Sequence[tuple[float, bytes]]) -> TurnTrace:
    """Rebuild a turn from its pub/sub messages (receive time, raw JSON), checking the contract.

    A turn is correct when ``seq`` runs 1, 2, 3 … without a gap, exactly one end event comes
    last, and the end's answer equals the text the deltas built (``message_replace`` resets it).
    """
    trace = TurnTrace(key)
    expected_seq = 1
    for received_at, raw in messages:
        event = json.loads(raw)
        if event.get("seq") != expected_seq:
            trace.problems.append(f"seq {event.get('seq')} where {expected_seq} was due")
        expected_seq = event.get("seq", expected_seq) + 1
        kind = event.get("event")
        if trace.end_kind is not None:
            trace.problems.append(f"{kind} after the end")
        if kind == "agent_message":
            trace.add_delta(received_at, event["answer"])
        elif kind == "message_replace":
            trace.text = event["answer"]
            trace.problems.append("message_replace")  # the stub's answer never needs one
        elif kind in END_EVENTS:
            trace.end_at, trace.end_kind = received_at, kind
            trace.end_answer = event.get("answer")
            if kind == "error":
                trace.problems.append(f"error {event.get('code')}: {event.get('message')}")
    if trace.end_kind == "message_end" and trace.end_answer != trace.text:
        trace.problems.append("the end's answer differs from the streamed text")
    return trace


@dataclass(frozen=True)
class LatencySample:
    """The latencies of a set of turns, in seconds."""

    events: list[float]
    first_chunk: list[float]
    ends: list[float]
    pickups: list[float]
    steady: list[float]


def latencies(traces: Iterable[TurnTrace], timelines: dict[str, RunTimeline]) -> LatencySample:
    """Event, first-chunk, end and pick-up latencies of the turns that have a timeline."""
    events: list[float] = []
    first_chunk: list[float] = []
    ends: list[float] = []
    pickups: list[float] = []
    steady: list[float] = []
    measured = [(trace, timelines[trace.key]) for trace in traces
                if trace.chunks and timelines.get(trace.key) is not None
                and timelines[trace.key].emitted]
    all_streaming_from = max((tl.emitted[0] for _, tl in measured), default=math.inf)
    all_streaming_to = min((tl.emitted[-1] for _, tl in measured), default=-math.inf)
    for trace, timeline in measured:
        if trace.started_at is not None and timeline.created is not None:
            pickups.append(timeline.created - trace.started_at)
        for received_at, length in trace.chunks:
            emitted_at = timeline.newest_token_at(length)
            events.append(received_at - emitted_at)
            if all_streaming_from <= emitted_at <= all_streaming_to:
                steady.append(received_at - emitted_at)
        first_chunk.append(trace.chunks[0][0] - timeline.emitted[0])
        if trace.end_at is not None and timeline.finished is not None:
            ends.append(trace.end_at - timeline.finished)
    return LatencySample(events, first_chunk, ends, pickups, steady)


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The largest number of intervals open at one instant."""
    points = []
    for start, end in intervals:
        points.append((start, 1))
        points.append((end, -1))
    points.sort(key=lambda point: (point[0], point[1]))
    open_now = peak = 0
    for _, change in points:
        open_now += change
        peak = max(peak, open_now)
    return peak


# What the driver itself sends while it measures (its probes), not the load's cost.
PROBE_COMMANDS = frozenset({"info", "client|list"})


def commands_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Per-command call counts between two ``INFO commandstats`` readings, busiest first,
    without the driver's own probes."""
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after
             if name not in PROBE_COMMANDS}
    return dict(sorted(((n, c) for n, c in delta.items() if c > 0), key=lambda item: -item[1]))
