"""Writes queued by key and sent together by a writer (worker/writebehind.py).

``send`` here records its batches; the users of the module are tested against a real Redis
where they live: the broker's unacked records in tests/test_broker.py, the delivery registry in
tests/test_takeover.py, the progress reports in tests/test_progress.py.
"""

from __future__ import annotations

import logging
import threading

import pytest

from worker.writebehind import WriteBehind

BOUND_SECONDS = 5.0


class Batches:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[dict[str, str | None]] = []
        self.fail = fail
        self.arrived = threading.Event()

    def __call__(self, batch: dict[str, str | None]) -> None:
        self.sent.append(dict(batch))
        self.arrived.set()
        if self.fail:
            raise RuntimeError("the store refused the batch")


def test_values_queued_together_go_out_in_one_send_in_the_order_last_queued() -> None:
    batches = Batches()
    writes: WriteBehind[str | None] = WriteBehind(batches, name="test")
    first = writes.put("a", "1")
    writes.put("b", "2")
    writes.put("a", "3")  # replaces the unsent value and moves behind "b"

    assert not first.is_set() and writes.written("a") is first
    writes.flush()

    assert batches.sent == [{"b": "2", "a": "3"}]
    assert list(batches.sent[0]) == ["b", "a"]
    assert first.is_set() and writes.written("a") is None
    writes.flush()
    assert len(batches.sent) == 1, "nothing queued, nothing sent"


def test_a_value_overtaken_before_it_went_out_still_releases_its_waiter() -> None:
    batches = Batches()
    writes: WriteBehind[str | None] = WriteBehind(batches, name="test")
    held = writes.put("tag", "delivery")
    writes.put("tag", None)  # undone before the writer came round

    writes.flush()

    assert batches.sent == [{"tag": None}] and held.is_set()


def test_the_writer_sends_what_is_queued_without_being_asked() -> None:
    batches = Batches()
    writes: WriteBehind[str | None] = WriteBehind(batches, name="test")
    writes.start()
    try:
        written = writes.put("a", "1")
        assert written.wait(BOUND_SECONDS)
        assert batches.sent == [{"a": "1"}]
    finally:
        writes.close(BOUND_SECONDS)


def test_close_sends_what_is_queued_ends_the_writer_and_later_values_go_out_at_once() -> None:
    batches = Batches()
    writes: WriteBehind[str | None] = WriteBehind(batches, name="test")
    writes.start()
    writer = writes._writer
    assert writer is not None

    writes.close(BOUND_SECONDS)
    writer.join(BOUND_SECONDS)
    assert not writer.is_alive()
    late = writes.put("late", "1")

    assert late.is_set() and batches.sent[-1] == {"late": "1"}
    writes.start()
    assert writes._writer is None, "a closed writer stays closed"


def test_a_failing_send_releases_its_waiters_and_the_writer_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    batches = Batches(fail=True)
    writes: WriteBehind[str | None] = WriteBehind(batches, name="test-writes")
    writes.start()
    try:
        with caplog.at_level(logging.ERROR, logger="worker.writebehind"):
            first = writes.put("a", "1")
            assert first.wait(BOUND_SECONDS), "a failed write does not hold its waiter"
            batches.arrived.clear()
            second = writes.put("b", "2")
            assert second.wait(BOUND_SECONDS) and batches.arrived.is_set()
        assert "test-writes: a batch of writes failed" in caplog.text
        assert writes._writer is not None and writes._writer.is_alive()
    finally:
        batches.fail = False
        writes.close(BOUND_SECONDS)


def test_withdraw_drops_an_unsent_value_and_waits_for_one_being_sent() -> None:
    entered, proceed = threading.Event(), threading.Event()
    sent: list[dict[str, str]] = []

    def send(batch: dict[str, str]) -> None:
        entered.set()
        assert proceed.wait(BOUND_SECONDS), "the test never let the send through"
        sent.append(dict(batch))

    writes: WriteBehind[str] = WriteBehind(send, name="test")
    writes.start()
    try:
        writes.put("a", "1")
        assert entered.wait(BOUND_SECONDS)  # "a" is being sent
        queued = writes.put("b", "1")
        writes.withdraw("b")
        assert queued.is_set() and writes.written("b") is None, "a dropped value holds no one"
        withdrawn = threading.Event()
        waiter = threading.Thread(target=lambda: (writes.withdraw("a"), withdrawn.set()))
        waiter.start()
        assert not withdrawn.wait(0.2), "withdraw returned while its value was being sent"
        proceed.set()
        assert withdrawn.wait(BOUND_SECONDS)
        waiter.join(BOUND_SECONDS)
    finally:
        proceed.set()
        writes.close(BOUND_SECONDS)

    assert sent == [{"a": "1"}]


def test_a_value_on_its_way_counts_as_not_written_until_its_round_trip_is_over() -> None:
    entered, proceed = threading.Event(), threading.Event()

    def send(batch: dict[str, str]) -> None:
        entered.set()
        assert proceed.wait(BOUND_SECONDS), "the test never let the send through"

    writes: WriteBehind[str] = WriteBehind(send, name="test")
    writes.start()
    try:
        queued = writes.put("tag", "delivery")
        assert entered.wait(BOUND_SECONDS)  # the writer took the batch; Redis has not got it
        on_its_way = writes.written("tag")
        assert on_its_way is queued and not on_its_way.is_set(), \
            "a waiter (the broker's ack) would go on before the record is written"
        proceed.set()
        assert on_its_way.wait(BOUND_SECONDS)
        assert writes.written("tag") is None
    finally:
        proceed.set()
        writes.close(BOUND_SECONDS)
