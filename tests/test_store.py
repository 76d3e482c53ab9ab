"""The session store on real databases: SQLite and PostgreSQL (the ``store`` fixture runs both).

What a turn relies on: one row per assistant message that counts attempts, a snapshot per
conversation guarded by compare-and-set on its version, and a success that writes the snapshot
and the answer together or not at all.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import POSTGRES_ADMIN_URL, TcpProxy, new_postgres_schema
from worker.errors import (
    AgentBackendError,
    HumanInputRefused,
    NotTheOwner,
    SnapshotConflict,
    TurnStoreUnavailable,
)
from worker.steps import AgentStep
from worker.store import MessageStatus, NewMessage, SessionStore, make_engine

LAYERS = ("execution_context", "prompt", "history", "llm")
OTHER_LAYERS = ("execution_context", "prompt", "memory", "llm")
USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
         "total_price": "0.0000800", "currency": "USD"}


def new_message(conversation_id: str | None = None, **overrides: Any) -> NewMessage:
    values: dict[str, Any] = {
        "message_id": f"msg-{uuid.uuid4().hex[:12]}",
        "conversation_id": conversation_id or f"conv-{uuid.uuid4().hex[:12]}",
        "tenant_id": "tenant-1",
        "app_id": "app-1",
        "user_id": "user-1",
        "task_id": f"task-{uuid.uuid4().hex[:8]}",
        "query": "hi",
    }
    values.update(overrides)
    return NewMessage(**values)


def snapshot_for(turn: int, names: tuple[str, ...] = LAYERS) -> dict[str, Any]:
    messages = []
    for number in range(1, turn + 1):
        messages += [{"role": "user", "content": f"question {number}"},
                     {"role": "assistant", "content": f"answer {number}"}]
    return {"schema_version": 1, "layers": [
        {"name": name, "lifecycle_state": "suspended",
         "runtime_state": {"messages": messages} if name == "history" else {}}
        for name in names
    ]}


def save(store: SessionStore, message: NewMessage, *, expected_version: int,
         snapshot: dict[str, Any] | None, answer: str = "the answer",
         layer_names: tuple[str, ...] = LAYERS, run_id: str = "run-1",
         usage: dict[str, Any] | None = None) -> None:
    store.save_success(
        message_id=message.message_id, conversation_id=message.conversation_id,
        tenant_id=message.tenant_id, app_id=message.app_id, expected_version=expected_version,
        snapshot=snapshot, layer_names=layer_names, answer=answer,
        usage=USAGE if usage is None else usage, run_id=run_id,
    )


# Attempts -----------------------------------------------------------------------------------


def test_first_attempt_creates_a_running_message_row(store: SessionStore) -> None:
    message = new_message(query="What is the weather like?")

    state = store.begin_attempt(message)

    assert state.status == MessageStatus.RUNNING
    assert state.attempts == 1
    assert (state.run_id, state.run_count, state.base_version) == (None, 0, None)
    assert (state.answer, state.usage) == (None, None)
    row = store.get_message(message.message_id)
    assert row is not None
    assert row.status == MessageStatus.RUNNING
    assert (row.conversation_id, row.tenant_id, row.app_id, row.user_id) == (
        message.conversation_id, "tenant-1", "app-1", "user-1")
    assert (row.task_id, row.query) == (message.task_id, "What is the weather like?")
    assert row.finished_at is None


def test_later_attempts_are_counted_and_take_the_new_task_id(store: SessionStore) -> None:
    message = new_message()
    store.begin_attempt(message)
    store.mark_unfinished(message.message_id, final=False, code="backend_unavailable",
                          error="HTTP 503")

    retry = new_message(message.conversation_id, message_id=message.message_id,
                        task_id="task-retry")
    state = store.begin_attempt(retry)
    third = store.begin_attempt(retry)

    assert (state.status, state.attempts) == (MessageStatus.RUNNING, 2)
    assert third.attempts == 3
    row = store.get_message(message.message_id)
    assert row is not None
    assert (row.status, row.attempts, row.task_id) == (MessageStatus.RUNNING, 3, "task-retry")


def test_a_succeeded_message_is_reported_as_succeeded_and_not_reset(store: SessionStore) -> None:
    message = new_message()
    store.begin_attempt(message)
    save(store, message, expected_version=0, snapshot=snapshot_for(1), answer="done",
         run_id="run-ok")

    state = store.begin_attempt(message)

    assert state.status == MessageStatus.SUCCEEDED
    assert state.attempts == 1
    assert (state.answer, state.run_id, state.usage) == ("done", "run-ok", USAGE)
    row = store.get_message(message.message_id)
    assert row is not None
    assert (row.status, row.attempts, row.answer) == (MessageStatus.SUCCEEDED, 1, "done")
    assert row.finished_at is not None


# Snapshots ----------------------------------------------------------------------------------


def test_an_unknown_conversation_has_no_snapshot_and_version_zero(store: SessionStore) -> None:
    loaded = store.load_snapshot("conv-never-seen", LAYERS)

    assert (loaded.snapshot, loaded.version) == (None, 0)


def test_save_success_writes_snapshot_and_message_together(store: SessionStore) -> None:
    message = new_message()
    store.begin_attempt(message)
    snapshot = snapshot_for(1)

    save(store, message, expected_version=0, snapshot=snapshot, answer="[turn 1] hello",
         run_id="run-a")

    row = store.get_message(message.message_id)
    assert row is not None
    assert row.status == MessageStatus.SUCCEEDED
    assert (row.answer, row.usage, row.run_id) == ("[turn 1] hello", USAGE, "run-a")
    assert (row.error, row.error_code) == (None, None)
    assert isinstance(row.finished_at, datetime)
    stored = store.get_snapshot(message.conversation_id)
    assert stored is not None
    assert (stored.version, stored.snapshot, tuple(stored.layer_names)) == (1, snapshot, LAYERS)
    assert (stored.tenant_id, stored.app_id) == ("tenant-1", "app-1")
    assert stored.last_message_id == message.message_id
    loaded = store.load_snapshot(message.conversation_id, LAYERS)
    assert (loaded.snapshot, loaded.version) == (snapshot, 1)


def test_an_attempt_without_a_run_to_rejoin_reads_its_snapshot_in_the_same_transaction(
        store: SessionStore) -> None:
    first = new_message()
    store.begin_attempt(first)
    save(store, first, expected_version=0, snapshot=snapshot_for(1), answer="first")
    second = new_message(first.conversation_id, query="and then?")

    fresh = store.begin_attempt(second, LAYERS)
    store.record_run(second.message_id, run_id="run-2", run_count=1, base_version=1)
    retry = store.begin_attempt(second, LAYERS)
    other_composition = store.begin_attempt(new_message(first.conversation_id), ("other",))

    assert fresh.snapshot is not None
    assert (fresh.snapshot.snapshot, fresh.snapshot.version) == (snapshot_for(1), 1)
    assert retry.snapshot is None, "a recorded run may be re-attached: nothing read for it"
    assert other_composition.snapshot is not None
    assert (other_composition.snapshot.snapshot, other_composition.snapshot.version) == (None, 1)


def test_a_success_for_a_message_without_a_row_saves_nothing(store: SessionStore) -> None:
    message = new_message()

    with pytest.raises(AgentBackendError, match="message row is missing"):
        save(store, message, expected_version=0, snapshot=snapshot_for(1))

    assert store.get_snapshot(message.conversation_id) is None
    assert store.get_message(message.message_id) is None


def test_a_second_turn_loads_version_one_and_saves_version_two(store: SessionStore) -> None:
    first = new_message()
    store.begin_attempt(first)
    save(store, first, expected_version=0, snapshot=snapshot_for(1), answer="first")

    second = new_message(first.conversation_id, query="and then?")
    store.begin_attempt(second)
    loaded = store.load_snapshot(second.conversation_id, LAYERS)
    assert (loaded.snapshot, loaded.version) == (snapshot_for(1), 1)
    save(store, second, expected_version=loaded.version, snapshot=snapshot_for(2),
         answer="second", run_id="run-2")

    after = store.load_snapshot(second.conversation_id, LAYERS)
    assert (after.snapshot, after.version) == (snapshot_for(2), 2)
    stored = store.get_snapshot(second.conversation_id)
    assert stored is not None and stored.last_message_id == second.message_id
    answers = [row.answer for row in store.list_messages(second.conversation_id)]
    assert answers == ["first", "second"]


def test_a_stale_save_conflicts_and_writes_nothing(store: SessionStore) -> None:
    conversation = f"conv-{uuid.uuid4().hex[:12]}"
    first, second, stale = (new_message(conversation) for _ in range(3))
    for message in (first, second, stale):
        store.begin_attempt(message)
    save(store, first, expected_version=0, snapshot=snapshot_for(1))
    save(store, second, expected_version=1, snapshot=snapshot_for(2))

    with pytest.raises(SnapshotConflict) as caught:
        save(store, stale, expected_version=1, snapshot=snapshot_for(9), answer="stale answer")

    assert caught.value.retryable
    assert caught.value.message_id == stale.message_id
    row = store.get_message(stale.message_id)
    assert row is not None
    assert row.status == MessageStatus.RUNNING
    assert (row.answer, row.usage, row.run_id, row.finished_at) == (None, None, None, None)
    stored = store.get_snapshot(conversation)
    assert stored is not None
    assert (stored.version, stored.snapshot) == (2, snapshot_for(2))
    assert stored.last_message_id == second.message_id


def test_two_first_saves_of_one_conversation_the_second_conflicts(store: SessionStore) -> None:
    conversation = f"conv-{uuid.uuid4().hex[:12]}"
    winner, loser = new_message(conversation), new_message(conversation)
    store.begin_attempt(winner)
    store.begin_attempt(loser)

    save(store, winner, expected_version=0, snapshot=snapshot_for(1), answer="winner")
    with pytest.raises(SnapshotConflict) as caught:
        save(store, loser, expected_version=0, snapshot=snapshot_for(1, LAYERS),
             answer="loser")

    assert caught.value.message_id == loser.message_id
    loser_row = store.get_message(loser.message_id)
    assert loser_row is not None
    assert (loser_row.status, loser_row.answer) == (MessageStatus.RUNNING, None)
    stored = store.get_snapshot(conversation)
    assert stored is not None
    assert (stored.version, stored.last_message_id) == (1, winner.message_id)


def test_the_store_still_works_after_a_conflict(store: SessionStore) -> None:
    conversation = f"conv-{uuid.uuid4().hex[:12]}"
    first, retried = new_message(conversation), new_message(conversation)
    store.begin_attempt(first)
    store.begin_attempt(retried)
    save(store, first, expected_version=0, snapshot=snapshot_for(1))
    with pytest.raises(SnapshotConflict):
        save(store, retried, expected_version=0, snapshot=snapshot_for(1))

    # The retry reloads and saves against the current version.
    loaded = store.load_snapshot(conversation, LAYERS)
    save(store, retried, expected_version=loaded.version, snapshot=snapshot_for(2),
         answer="after the conflict")

    row = store.get_message(retried.message_id)
    assert row is not None and (row.status, row.answer) == ("succeeded", "after the conflict")
    assert store.load_snapshot(conversation, LAYERS).version == 2


@pytest.mark.parametrize("expected_version", [0, 1])
def test_of_concurrent_saves_from_one_version_exactly_one_wins(store: SessionStore,
                                                              expected_version: int) -> None:
    conversation = f"conv-{uuid.uuid4().hex[:12]}"
    if expected_version:
        seed = new_message(conversation)
        store.begin_attempt(seed)
        save(store, seed, expected_version=0, snapshot=snapshot_for(1))
    racers = [new_message(conversation) for _ in range(6)]
    for message in racers:
        store.begin_attempt(message)
    barrier = threading.Barrier(len(racers), timeout=10)

    def race(message: NewMessage) -> str:
        barrier.wait()
        try:
            save(store, message, expected_version=expected_version,
                 snapshot=snapshot_for(2), answer=f"answer of {message.message_id}")
        except SnapshotConflict:
            return "conflict"
        return "saved"

    with ThreadPoolExecutor(len(racers)) as pool:
        outcomes = list(pool.map(race, racers, timeout=30))

    assert sorted(outcomes) == ["conflict"] * (len(racers) - 1) + ["saved"]
    winner = racers[outcomes.index("saved")]
    stored = store.get_snapshot(conversation)
    assert stored is not None
    assert (stored.version, stored.last_message_id) == (expected_version + 1, winner.message_id)
    statuses = {m.message_id: m.status for m in store.list_messages(conversation)}
    assert [m.message_id for m in racers if statuses[m.message_id] == "succeeded"] == [
        winner.message_id]


def test_a_snapshot_taken_under_other_layer_names_is_not_returned(store: SessionStore) -> None:
    message = new_message()
    store.begin_attempt(message)
    save(store, message, expected_version=0, snapshot=snapshot_for(1, OTHER_LAYERS),
         layer_names=OTHER_LAYERS)

    loaded = store.load_snapshot(message.conversation_id, LAYERS)
    same = store.load_snapshot(message.conversation_id, OTHER_LAYERS)

    assert (loaded.snapshot, loaded.version) == (None, 1)
    assert (same.snapshot, same.version) == (snapshot_for(1, OTHER_LAYERS), 1)


def test_a_success_without_snapshot_saves_the_message_and_keeps_the_snapshot(
    store: SessionStore,
) -> None:
    first = new_message()
    store.begin_attempt(first)
    save(store, first, expected_version=0, snapshot=snapshot_for(1))
    second = new_message(first.conversation_id)
    store.begin_attempt(second)

    save(store, second, expected_version=1, snapshot=None, answer="no snapshot this time")

    row = store.get_message(second.message_id)
    assert row is not None and (row.status, row.answer) == ("succeeded", "no snapshot this time")
    loaded = store.load_snapshot(first.conversation_id, LAYERS)
    assert (loaded.snapshot, loaded.version) == (snapshot_for(1), 1)


# Runs and failures --------------------------------------------------------------------------


def test_record_run_stores_run_id_run_count_and_base_version(store: SessionStore) -> None:
    message = new_message()
    store.begin_attempt(message)

    store.record_run(message.message_id, run_id="run-77", run_count=2, base_version=5)

    state = store.begin_attempt(message)
    assert (state.run_id, state.run_count, state.base_version) == ("run-77", 2, 5)
    row = store.get_message(message.message_id)
    assert row is not None and (row.run_id, row.run_count, row.base_version) == ("run-77", 2, 5)


def test_a_non_final_failure_marks_the_message_retrying(store: SessionStore) -> None:
    message = new_message()
    store.begin_attempt(message)

    store.mark_unfinished(message.message_id, final=False, code="stream_interrupted",
                          error="the stream broke")

    row = store.get_message(message.message_id)
    assert row is not None
    assert (row.status, row.error_code, row.error) == (
        MessageStatus.RETRYING, "stream_interrupted", "the stream broke")
    assert row.finished_at is None


def test_a_final_failure_marks_the_message_failed_and_finished(store: SessionStore) -> None:
    message = new_message()
    store.begin_attempt(message)

    store.mark_unfinished(message.message_id, final=True, code="model_error",
                          error="x" * 10_000)

    row = store.get_message(message.message_id)
    assert row is not None
    assert (row.status, row.error_code) == (MessageStatus.FAILED, "model_error")
    assert row.error == "x" * 4000
    assert isinstance(row.finished_at, datetime)


@pytest.mark.parametrize("final", [False, True])
def test_a_failure_never_downgrades_a_succeeded_message(store: SessionStore,
                                                        final: bool) -> None:
    message = new_message()
    store.begin_attempt(message)
    save(store, message, expected_version=0, snapshot=snapshot_for(1), answer="kept")

    store.mark_unfinished(message.message_id, final=final, code="event_bus_unavailable",
                          error="redis went away after the save")

    row = store.get_message(message.message_id)
    assert row is not None
    assert (row.status, row.answer, row.error_code, row.error) == (
        MessageStatus.SUCCEEDED, "kept", None, None)


# Unreachable databases ----------------------------------------------------------------------


def _assert_unavailable_on_begin_attempt(database_url: str) -> None:
    engine = make_engine(database_url, pool_size=1)
    try:
        message = new_message()
        with pytest.raises(TurnStoreUnavailable) as caught:
            SessionStore(engine).begin_attempt(message)
        assert caught.value.retryable
        assert caught.value.code == "store_unavailable"
        assert caught.value.message_id == message.message_id
    finally:
        engine.dispose()


def test_a_postgresql_server_that_cannot_be_reached_is_store_unavailable() -> None:
    _assert_unavailable_on_begin_attempt(
        "postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2")


def test_a_sqlite_file_that_cannot_be_opened_is_store_unavailable(tmp_path: Path) -> None:
    # The database path names a directory: SQLite cannot open it.
    (tmp_path / "turns.sqlite3").mkdir()

    _assert_unavailable_on_begin_attempt(f"sqlite:///{tmp_path / 'turns.sqlite3'}")


def test_a_sqlite_path_inside_a_file_is_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "not-a-directory").write_text("I am a file")

    with pytest.raises(TurnStoreUnavailable, match="cannot create the folder") as caught:
        make_engine(f"sqlite:///{tmp_path / 'not-a-directory' / 'turns.sqlite3'}")

    assert caught.value.retryable


def test_create_schema_on_an_unreachable_database_is_store_unavailable() -> None:
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2",
                         pool_size=1)
    try:
        with pytest.raises(TurnStoreUnavailable):
            SessionStore(engine).create_schema()
    finally:
        engine.dispose()


# PostgreSQL connections that died in the pool ---------------------------------------------


def _kill_the_pooled_connections(engine: Any, count: int) -> None:
    """Terminate the server side of ``count`` connections in ``engine``'s pool, as a PostgreSQL
    restart does, and wait (bounded) until the server has let them go."""
    with contextlib.ExitStack() as held:
        connections = [held.enter_context(engine.connect()) for _ in range(count)]
        pids = [c.execute(text("SELECT pg_backend_pid()")).scalar_one() for c in connections]
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            for pid in pids:
                assert connection.execute(text("SELECT pg_terminate_backend(:pid)"),
                                          {"pid": pid}).scalar_one()
            deadline = time.monotonic() + 10
            while connection.execute(text("SELECT count(*) FROM pg_stat_activity "
                                          "WHERE pid = ANY(:pids)"), {"pids": pids}).scalar_one():
                assert time.monotonic() < deadline, "the terminated backends did not go away"
                time.sleep(0.01)
    finally:
        admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    url, drop = new_postgres_schema()
    yield url
    drop()


# One store call of each kind: a turn's Core transaction, a single statement in autocommit, an
# ORM transaction, a read.
STORE_CALLS = {
    "claim": lambda store, message: store.claim(message),
    "record_run": lambda store, message: store.record_run(
        message.message_id, run_id="run-after-restart", run_count=1, base_version=0),
    "mark_unfinished": lambda store, message: store.mark_unfinished(
        message.message_id, final=False, code="backend_unavailable", error="blinked"),
    "get_message": lambda store, message: store.get_message(message.message_id),
}


@pytest.mark.parametrize("call", list(STORE_CALLS))
def test_a_transaction_on_a_connection_that_died_in_the_pool_runs_again_on_a_new_one(
    postgres_url: str, call: str, caplog: pytest.LogCaptureFixture
) -> None:
    # As after a PostgreSQL restart: every pooled connection is dead on the server side. The
    # pool does not ping (a round trip per transaction); the first statement finds the
    # connection dead, SQLAlchemy retires the pool's connections, and the store runs the
    # transaction again, once, on a new one. The caller never sees the outage.
    engine = make_engine(postgres_url, pool_size=2)
    try:
        store = SessionStore(engine)
        store.create_schema()
        message = new_message()
        store.begin_attempt(message)
        _kill_the_pooled_connections(engine, 2)

        with caplog.at_level("WARNING", logger="worker.store"):
            STORE_CALLS[call](store, message)

        retried = [r for r in caplog.records if "running the transaction again" in r.message]
        assert len(retried) == 1, caplog.text
        row = store.get_message(message.message_id)
        assert row is not None
        assert {"record_run": row.run_id == "run-after-restart",
                "mark_unfinished": row.status == MessageStatus.RETRYING}.get(call, True)
    finally:
        engine.dispose()


def test_a_database_that_stays_down_is_store_unavailable_after_one_more_try(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = TcpProxy(5432)
    engine = make_engine(postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
                         + "&connect_timeout=2", pool_size=1)
    try:
        store = SessionStore(engine)
        store.create_schema()
        message = new_message()
        store.begin_attempt(message)
        proxy.cut(60)  # the pooled connection breaks, and new ones are refused

        with caplog.at_level("WARNING", logger="worker.store"), \
                pytest.raises(TurnStoreUnavailable) as caught:
            store.record_run(message.message_id, run_id="run-1", run_count=1, base_version=0)

        assert caught.value.retryable and caught.value.message_id == message.message_id
        assert len([r for r in caplog.records
                    if "running the transaction again" in r.message]) == 1
    finally:
        engine.dispose()
        proxy.close()


# Content ------------------------------------------------------------------------------------


def test_unicode_answers_and_snapshots_round_trip(store: SessionStore) -> None:
    message = new_message(query="¿Qué tal? 你好 👋")
    store.begin_attempt(message)
    answer = "Grüße aus Köln — 日本語のテキスト, emoji 🚀🧪, RTL עברית, nul-free \u2028 end"
    snapshot = snapshot_for(1)
    snapshot["layers"][2]["runtime_state"]["messages"][1]["content"] = answer
    usage = {"currency": "€", "note": "ünïcödé"}

    save(store, message, expected_version=0, snapshot=snapshot, answer=answer, usage=usage)

    row = store.get_message(message.message_id)
    assert row is not None
    assert (row.answer, row.usage, row.query) == (answer, usage, "¿Qué tal? 你好 👋")
    assert store.load_snapshot(message.conversation_id, LAYERS).snapshot == snapshot


def test_a_large_answer_and_snapshot_round_trip(store: SessionStore) -> None:
    message = new_message()
    store.begin_attempt(message)
    answer = ("A long answer with ünïcode — 長い答え. " * 6000)[:200_000]
    snapshot = snapshot_for(150)

    save(store, message, expected_version=0, snapshot=snapshot, answer=answer)

    row = store.get_message(message.message_id)
    assert row is not None and row.answer == answer and len(row.answer) == 200_000
    assert store.load_snapshot(message.conversation_id, LAYERS).snapshot == snapshot



# Ownership ---------------------------------------------------------------------------------


def _rows(store: SessionStore, message: NewMessage) -> tuple[Any, Any]:
    return store.get_conversation(message.conversation_id), store.get_message(message.message_id)


def test_a_first_claim_makes_the_conversation_and_the_message_its_owners(
        store: SessionStore) -> None:
    message = new_message()

    store.claim(message)

    conversation, row = _rows(store, message)
    assert (conversation.tenant_id, conversation.app_id, conversation.user_id) == (
        "tenant-1", "app-1", "user-1")
    assert row.status == MessageStatus.QUEUED and row.attempts == 0
    store.claim(message)  # the owner's redelivery or retry claims again
    assert store.begin_attempt(message).attempts == 1


@pytest.mark.parametrize("other", [{"tenant_id": "tenant-2"}, {"app_id": "app-2"},
                                   {"user_id": "user-2"}])
def test_another_owner_naming_the_conversation_is_refused_and_writes_nothing(
        store: SessionStore, other: dict[str, str]) -> None:
    first = new_message()
    store.claim(first)
    intruder = new_message(first.conversation_id, **other)

    with pytest.raises(NotTheOwner) as refused:
        store.claim(intruder)

    assert refused.value.code == "conversation_not_found" and refused.value.status == 404
    assert store.get_message(intruder.message_id) is None
    assert [row.message_id for row in store.list_messages(first.conversation_id)] == [
        first.message_id]


def test_another_owner_naming_the_message_id_is_refused_and_writes_nothing(
        store: SessionStore) -> None:
    first = new_message()
    store.claim(first)
    intruder = new_message(message_id=first.message_id, tenant_id="tenant-2")

    with pytest.raises(NotTheOwner):
        store.claim(intruder)

    assert store.get_conversation(intruder.conversation_id) is None
    assert store.get_message(first.message_id).tenant_id == "tenant-1"


def test_a_message_id_reused_in_another_conversation_of_the_same_owner_is_refused(
        store: SessionStore) -> None:
    first = new_message()
    store.claim(first)

    with pytest.raises(NotTheOwner):
        store.claim(new_message(message_id=first.message_id))


def test_a_snapshot_left_without_an_owner_row_is_not_given_to_another_tenant(
        store: SessionStore) -> None:
    first = new_message()
    store.claim(first)
    store.begin_attempt(first)
    save(store, first, expected_version=0, snapshot=snapshot_for(1))
    with store.engine.begin() as connection:  # as a store from before ownership leaves it
        connection.exec_driver_sql("DELETE FROM conversations")

    with pytest.raises(NotTheOwner):
        store.claim(new_message(first.conversation_id, tenant_id="tenant-2"))
    store.claim(new_message(first.conversation_id))


def test_of_two_owners_racing_to_claim_one_new_message_id_exactly_one_wins(
        store: SessionStore) -> None:
    message_id = f"msg-{uuid.uuid4().hex[:12]}"
    claims = [new_message(message_id=message_id, tenant_id=f"tenant-{n}") for n in range(4)]
    start = threading.Barrier(len(claims))

    def claim(message: NewMessage) -> str:
        start.wait(timeout=10)
        try:
            store.claim(message)
        except NotTheOwner:
            return "refused"
        return "claimed"

    with ThreadPoolExecutor(len(claims)) as pool:
        outcomes = list(pool.map(claim, claims))

    assert sorted(outcomes) == ["claimed", "refused", "refused", "refused"]
    winner = claims[outcomes.index("claimed")]
    assert store.get_message(message_id).tenant_id == winner.tenant_id
    assert [store.get_conversation(c.conversation_id) is not None for c in claims] == [
        c is winner for c in claims]


# The agent's steps -----------------------------------------------------------------------


def _steps(*observations: str) -> list[AgentStep]:
    return [AgentStep(id=f"step-{n}", position=n, thought=f"thought {n}", tool="lookup",
                      tool_input='{"q": 1}', observation=observation)
            for n, observation in enumerate(observations, start=1)]


def test_steps_are_saved_with_the_answer_and_listed_in_order(store: SessionStore) -> None:
    message = new_message()
    store.begin_attempt(message)

    store.save_success(
        message_id=message.message_id, conversation_id=message.conversation_id,
        tenant_id=message.tenant_id, app_id=message.app_id, expected_version=0,
        snapshot=snapshot_for(1), layer_names=LAYERS, answer="a", usage=None, run_id="run-1",
        steps=_steps("one", "two ✓"))

    listed = store.list_steps(message.message_id)
    assert [(row.position, row.step_id, row.observation) for row in listed] == [
        (1, "step-1", "one"), (2, "step-2", "two ✓")]


def test_a_conflicting_success_saves_no_steps_either(store: SessionStore) -> None:
    message = new_message()
    store.begin_attempt(message)

    with pytest.raises(SnapshotConflict):
        store.save_success(
            message_id=message.message_id, conversation_id=message.conversation_id,
            tenant_id=message.tenant_id, app_id=message.app_id, expected_version=3,
            snapshot=snapshot_for(1), layer_names=LAYERS, answer="a", usage=None,
            run_id="run-1", steps=_steps("one"))

    assert store.list_steps(message.message_id) == []


def test_a_stopped_turn_keeps_the_steps_it_showed(store: SessionStore) -> None:
    message = new_message()
    store.begin_attempt(message)

    store.mark_stopped(message, partial_answer="part", steps=_steps("seen"))

    assert store.get_message(message.message_id).status == MessageStatus.STOPPED
    assert [row.observation for row in store.list_steps(message.message_id)] == ["seen"]


def test_a_later_attempts_steps_replace_the_earlier_ones(store: SessionStore) -> None:
    message = new_message()
    store.begin_attempt(message)
    store.save_steps(message.message_id, _steps("first", "attempt"))

    store.save_steps(message.message_id, _steps("retry"))

    assert [row.observation for row in store.list_steps(message.message_id)] == ["retry"]


# A question to the user --------------------------------------------------------------------


def _ask(store: SessionStore, *, expires_in: float = 60.0) -> NewMessage:
    message = new_message()
    store.claim(message)
    store.begin_attempt(message)
    store.mark_awaiting_input(
        message.message_id, pending={"question": {"tool_call_id": "call_1"}, "base_version": 0},
        partial_answer="Let me ask.", steps=_steps("asked"),
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in))
    return message


def _owner(message: NewMessage) -> tuple[str, str, str]:
    return message.tenant_id, message.app_id, message.user_id


def _accept(pending: dict[str, Any]) -> dict[str, Any]:
    return {"tool_call_id": pending["question"]["tool_call_id"], "values": {}}


def test_a_question_leaves_the_message_awaiting_input_with_what_resuming_takes(
        store: SessionStore) -> None:
    message = _ask(store)

    row = store.get_message(message.message_id)
    assert (row.status, row.answer) == ("awaiting_input", "Let me ask.")
    assert row.pending_input["question"] == {"tool_call_id": "call_1"}
    assert store.begin_attempt(message).status == "awaiting_input", "a redelivery starts nothing"
    later = replace(message, message_id=f"msg-{uuid.uuid4().hex[:8]}", task_id="task-later")
    assert store.claim(later) == message.message_id, "the next turn's claim sees the question"
    assert store.claim(message) is None, "its own message is not another's question"


def test_an_answer_is_taken_once_and_again_only_by_its_own_continuation(
        store: SessionStore) -> None:
    message = _ask(store)

    pending = store.take_answer(message.message_id, owner=_owner(message), task_id="resume-1",
                                accept=_accept)

    assert pending["answer"] == {"tool_call_id": "call_1", "values": {}}
    assert store.get_message(message.message_id).status == "running"
    again = store.take_answer(message.message_id, owner=_owner(message), task_id="resume-1",
                              accept=_accept)
    assert again["resume_task_id"] == "resume-1"
    with pytest.raises(HumanInputRefused):
        store.take_answer(message.message_id, owner=_owner(message), task_id="resume-2",
                          accept=_accept)


def test_an_answer_from_another_owner_or_to_no_question_is_refused_writing_nothing(
        store: SessionStore) -> None:
    message = _ask(store)
    with pytest.raises(HumanInputRefused):
        store.take_answer(message.message_id, owner=("tenant-2", "app-1", "user-1"),
                          task_id="t", accept=_accept)
    with pytest.raises(HumanInputRefused):
        store.take_answer("msg-unknown", owner=_owner(message), task_id="t", accept=_accept)

    def refuse(pending: dict[str, Any]) -> dict[str, Any]:
        raise HumanInputRefused("not an offered action")

    with pytest.raises(HumanInputRefused):
        store.take_answer(message.message_id, owner=_owner(message), task_id="t",
                          accept=refuse)
    assert store.get_message(message.message_id).status == "awaiting_input"


def test_an_expired_question_ends_the_message_once_and_takes_no_answer(
        store: SessionStore) -> None:
    message = _ask(store, expires_in=-1.0)
    waiting = _ask(store, expires_in=600.0)

    expired = store.expire_questions()

    assert [row.message_id for row in expired] == [message.message_id]
    assert store.expire_questions() == []
    row = store.get_message(message.message_id)
    assert (row.status, row.error_code) == ("failed", "human_input_expired")
    assert [step.observation for step in store.list_steps(message.message_id)] == ["asked"]
    with pytest.raises(HumanInputRefused):
        store.take_answer(message.message_id, owner=_owner(message), task_id="t",
                          accept=_accept)
    assert store.get_message(waiting.message_id).status == "awaiting_input"
