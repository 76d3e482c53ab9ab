"""The session store: each conversation's latest snapshot and each turn's assistant message.

SQLAlchemy 2 over SQLite (the default, one file) or PostgreSQL (production). Two promises:

- A turn's success is one transaction: the conversation's new snapshot and the assistant message
  (answer, usage, run id) land together or not at all.
- A stale snapshot never overwrites a newer one. Each snapshot row has a version; a turn saves
  only if the version it loaded is still current (compare-and-set), otherwise it gets
  ``SnapshotConflict`` and nothing is written.

Connection trouble surfaces as ``TurnStoreUnavailable`` (retryable), so a database that blinks
costs a retry, not an answer.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from sqlalchemy import (
    JSON,
    DateTime,
    Integer,
    String,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine, Row, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from worker.errors import (
    AgentBackendError,
    HumanInputRefused,
    NotTheOwner,
    SnapshotConflict,
    TurnStoreUnavailable,
)

if TYPE_CHECKING:
    from worker.steps import AgentStep

JsonColumn = JSON().with_variant(JSONB(), "postgresql")
log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


def _now() -> datetime:
    return datetime.now(UTC)


class MessageStatus(enum.StrEnum):
    """A turn's state machine: queued → running ⇄ retrying → succeeded | failed | stopped.

    A run that asks the user a question moves the message to ``awaiting_input``; the answer's
    continuation moves it back to ``running`` (and on), expiry to ``failed``.
    """

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    AWAITING_INPUT = "awaiting_input"


FINISHED_STATUSES = frozenset({MessageStatus.SUCCEEDED, MessageStatus.FAILED,
                               MessageStatus.STOPPED})


class Base(DeclarativeBase):
    pass


class Conversation(Base):
    """Who a conversation belongs to: the tenant, app and user of its first turn."""

    __tablename__ = "conversations"

    conversation_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128))
    app_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ConversationSnapshot(Base):
    """The newest session snapshot of a conversation, as the backend returned it."""

    __tablename__ = "conversation_snapshots"

    conversation_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128))
    app_id: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    layer_names: Mapped[list[str]] = mapped_column(JsonColumn)
    snapshot: Mapped[dict[str, Any]] = mapped_column(JsonColumn)
    last_message_id: Mapped[str] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class AssistantMessage(Base):
    """One turn's assistant message, and the state of producing it."""

    __tablename__ = "assistant_messages"

    message_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(String(128), index=True)
    tenant_id: Mapped[str] = mapped_column(String(128))
    app_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(128))
    task_id: Mapped[str] = mapped_column(String(255))
    query: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    answer: Mapped[str | None] = mapped_column(Text)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)
    run_id: Mapped[str | None] = mapped_column(String(128))
    run_count: Mapped[int] = mapped_column(Integer, default=0)
    # The snapshot version the recorded run started from: a run re-attached after a crash must
    # save against the version it was built on, not whatever is current by then.
    base_version: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # While a question is open, and through its continuation: the question, the answer once
    # given, the run's snapshot to resume from and the turn's payload (worker/questions.py).
    pending_input: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)
    input_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # How often a live worker took this turn over from a dead one, and the last dead worker's
    # name (worker/takeover.py): an operator's trace of a crash the user did not notice.
    takeovers: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    taken_over_from: Mapped[str | None] = mapped_column(String(255))


class AgentThought(Base):
    """One step of the agent's process shown with an assistant message (worker/steps.py).

    Saved with the message's ending: with the answer in one transaction on success, with the
    partial answer when stopped, on their own when the turn failed; the message's status says
    which, so a web tier renders a finished conversation's steps as the user saw them.
    """

    __tablename__ = "agent_thoughts"

    message_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    step_id: Mapped[str] = mapped_column(String(64))
    thought: Mapped[str] = mapped_column(Text)
    tool: Mapped[str] = mapped_column(String(256))
    tool_input: Mapped[str] = mapped_column(Text)
    observation: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


# The statements every turn runs, built once. A turn's start and end go through Core on a plain
# connection rather than an ORM session: the identity map, the unit of work and the per-call
# statement building cost more CPU than the SQL (docs/performance.md).
_conversations = Conversation.__table__
_snapshots = ConversationSnapshot.__table__
_messages = AssistantMessage.__table__
_thoughts = AgentThought.__table__
_CONVERSATION_FOR_UPDATE = select(_conversations).where(
    _conversations.c.conversation_id == bindparam("id")).with_for_update()
_MESSAGE_FOR_UPDATE = select(_messages).where(
    _messages.c.message_id == bindparam("id")).with_for_update()
_SNAPSHOT = select(_snapshots).where(_snapshots.c.conversation_id == bindparam("id"))
_OTHER_QUESTION = select(_messages.c.message_id).where(
    _messages.c.conversation_id == bindparam("conversation_id"),
    _messages.c.status == MessageStatus.AWAITING_INPUT.value,
    _messages.c.message_id != bindparam("message_id")).limit(1)
_INSERT_CONVERSATION = insert(_conversations)
_INSERT_MESSAGE = insert(_messages)
_INSERT_THOUGHTS = insert(_thoughts)
_DELETE_THOUGHTS = delete(_thoughts).where(_thoughts.c.message_id == bindparam("id"))
_INSERT_SNAPSHOT = insert(_snapshots)
# (Bound names differ from the columns': a bind named as its column is taken for the value.)
_BEGIN_ATTEMPT = update(_messages).where(_messages.c.message_id == bindparam("b_id")).values(
    attempts=_messages.c.attempts + 1, status=MessageStatus.RUNNING.value,
    task_id=bindparam("b_task_id"), updated_at=bindparam("b_now"))
# The usual attempt, in one statement: a message that is queued, running or retrying counts one
# more attempt and comes back as it now is. (None: a new, finished or waiting message.)
_BEGIN_USUAL_ATTEMPT = _BEGIN_ATTEMPT.where(_messages.c.status.not_in(
    [status.value for status in (*FINISHED_STATUSES, MessageStatus.AWAITING_INPUT)])).returning(
    *_messages.c)
_RECORD_RUN = update(_messages).where(_messages.c.message_id == bindparam("b_id")).values(
    run_id=bindparam("b_run_id"), run_count=bindparam("b_run_count"),
    base_version=bindparam("b_base_version"), updated_at=bindparam("b_now"))
_SUCCEED = update(_messages).where(_messages.c.message_id == bindparam("b_id")).values(
    status=MessageStatus.SUCCEEDED.value, answer=bindparam("b_answer"),
    usage=bindparam("b_usage"), run_id=bindparam("b_run_id"), error=None, error_code=None,
    updated_at=bindparam("b_now"), finished_at=bindparam("b_now"))
_REPLACE_SNAPSHOT = update(_snapshots).where(
    _snapshots.c.conversation_id == bindparam("b_id"),
    _snapshots.c.version == bindparam("b_expected")).values(
    snapshot=bindparam("b_snapshot"), layer_names=bindparam("b_layer_names"),
    version=bindparam("b_version"), last_message_id=bindparam("b_message_id"),
    updated_at=bindparam("b_now"))


@dataclass(frozen=True, slots=True)
class LoadedSnapshot:
    """What a turn starts from: the snapshot to send (or None) and the version it must replace."""

    snapshot: dict[str, Any] | None
    version: int


@dataclass(frozen=True, slots=True)
class MessageState:
    status: str
    attempts: int
    run_id: str | None
    run_count: int
    base_version: int | None
    answer: str | None
    usage: dict[str, Any] | None
    created_at: datetime
    error_code: str | None
    error: str | None
    pending_input: dict[str, Any] | None = None
    input_expires_at: datetime | None = None
    takeovers: int = 0
    taken_over_from: str | None = None
    # The snapshot a new run starts from, read in the same transaction when the attempt will
    # need one (``begin_attempt``): None when it may re-attach to a recorded run instead.
    snapshot: LoadedSnapshot | None = None


@dataclass(frozen=True, slots=True)
class NewMessage:
    message_id: str
    conversation_id: str
    tenant_id: str
    app_id: str
    user_id: str
    task_id: str
    query: str


def make_engine(database_url: str, *, pool_size: int = 10) -> Engine:
    """An engine fit for a threaded worker on SQLite or PostgreSQL."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            try:
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TurnStoreUnavailable(
                    f"session store error: cannot create the folder of {url.database}: "
                    f"{exc.strerror}"
                ) from exc
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=pool_size,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # No pre-ping: it is a round trip before every transaction, a fifth of what a turn's
    # transactions cost on PostgreSQL. A connection the server closed meanwhile fails its
    # transaction before the commit instead, and the store runs it again (``_once_more_if_stale``).
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_timeout=10)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers proceed while a turn commits; the busy timeout makes concurrent writers
    # queue instead of failing at once.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class _StaleConnection(TurnStoreUnavailable):
    """A pooled connection that the server had closed (a restart, an idle time-out, a
    terminated backend) failed its transaction before the commit was sent: nothing was written,
    so the transaction can run again."""


@contextmanager
def _stale_before_commit(message_id: str | None) -> Iterator[None]:
    try:
        yield
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        raise _StaleConnection(
            f"session store error: {type(exc.orig).__name__}: {str(exc.orig)[:200]}",
            message_id=message_id) from exc


def _once_more_if_stale(method: Callable[P, T]) -> Callable[P, T]:
    """Run a store method again, once, when its transaction met a stale pooled connection.

    This stands in for pinging each connection as it leaves the pool. SQLAlchemy, finding one
    connection dead, retires every connection the pool made before it, so after a database
    restart the second run gets a new connection, as a ping would have. Each decorated method
    is one transaction (or one read), so running it again repeats nothing that was written.
    A commit that fails is never run again: whether it landed is unknown.
    """

    @functools.wraps(method)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except _StaleConnection as stale:
            log.warning("%s; running the transaction again on a new connection", stale)
        return method(*args, **kwargs)

    return run


class SessionStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create_schema(self) -> None:
        """Bring the schema to the newest migration (see worker/migrate.py)."""
        from worker.migrate import upgrade

        with self._translate_errors():
            upgrade(self.engine)

    @contextmanager
    def _connection(self, message_id: str | None = None, *,
                    autocommit: bool = False) -> Iterator[Connection]:
        """One transaction on a plain connection, for the statements every turn runs.

        ``autocommit`` is for a single statement: it is its own transaction, and PostgreSQL
        is spared the round trips of a ``BEGIN`` and a ``COMMIT``.
        """
        with self._translate_errors(message_id), self.engine.connect() as connection:
            if autocommit:
                connection.execution_options(isolation_level="AUTOCOMMIT")
            with _stale_before_commit(message_id):
                yield connection
            connection.commit()

    @contextmanager
    def _transaction(self, message_id: str | None = None) -> Iterator[Session]:
        with self._translate_errors(message_id), Session(self.engine) as session:
            with _stale_before_commit(message_id):
                yield session
                session.flush()
            session.commit()

    @contextmanager
    def _reading(self, message_id: str | None = None) -> Iterator[Session]:
        """A session for reads; what it returns stays loaded after it closes."""
        with self._translate_errors(message_id), \
                Session(self.engine, expire_on_commit=False) as session, \
                _stale_before_commit(message_id):
            yield session

    @contextmanager
    def _translate_errors(self, message_id: str | None = None) -> Iterator[None]:
        try:
            yield
        except AgentBackendError:
            raise
        except IntegrityError as exc:
            raise SnapshotConflict(
                "a concurrent write to the same conversation or message won",
                message_id=message_id,
            ) from exc
        except DBAPIError as exc:
            raise TurnStoreUnavailable(
                f"session store error: {type(exc.orig).__name__}: {str(exc.orig)[:200]}",
                message_id=message_id,
            ) from exc
        except SQLAlchemyError as exc:
            raise TurnStoreUnavailable(f"session store error: {exc}"[:300],
                                       message_id=message_id) from exc

    @_once_more_if_stale
    def claim(self, new: NewMessage) -> str | None:
        """Make sure the turn's owner owns its conversation and its message, or refuse it;
        returns the id of another message of the conversation that waits for its user's answer,
        if one does (read in the same transaction, which a turn's start would otherwise pay for
        again).

        The first turn of a conversation makes the conversation its owner's, and the first task
        of a message id makes the message its (a ``queued`` row). A turn whose conversation or
        message is another owner's, or whose message id is already used in another
        conversation, raises ``NotTheOwner`` and writes nothing: every check is made on what
        was read before anything is inserted. Two first claims racing are ordered by the
        primary keys; the loser's insert fails, and its second pass is judged by the winner's
        rows.
        """
        for last_pass in (False, True):
            try:
                return self._claim_once(new)
            except SnapshotConflict:  # a concurrent first claim inserted the same key
                if last_pass:
                    raise
        raise AssertionError("unreachable")

    def _claim_once(self, new: NewMessage) -> str | None:
        owner = (new.tenant_id, new.app_id, new.user_id)
        with self._connection(new.message_id) as connection:
            conversation = connection.execute(_CONVERSATION_FOR_UPDATE,
                                              {"id": new.conversation_id}).first()
            message = connection.execute(_MESSAGE_FOR_UPDATE, {"id": new.message_id}).first()
            if conversation is not None and (conversation.tenant_id, conversation.app_id,
                                             conversation.user_id) != owner:
                raise _not_found(new)
            if message is not None and (message.conversation_id, message.tenant_id,
                                        message.app_id, message.user_id) \
                    != (new.conversation_id, *owner):
                raise _not_found(new)
            if conversation is None:
                snapshot = connection.execute(_SNAPSHOT, {"id": new.conversation_id}).first()
                if snapshot is not None and (snapshot.tenant_id, snapshot.app_id) != owner[:2]:
                    raise _not_found(new)
                connection.execute(_INSERT_CONVERSATION, {
                    "conversation_id": new.conversation_id, "tenant_id": new.tenant_id,
                    "app_id": new.app_id, "user_id": new.user_id, "created_at": _now()})
            if message is None:
                connection.execute(_INSERT_MESSAGE, _new_values(new, MessageStatus.QUEUED))
            if conversation is None:
                return None
            return connection.scalar(_OTHER_QUESTION, {"conversation_id": new.conversation_id,
                                                      "message_id": new.message_id})

    @_once_more_if_stale
    def get_conversation(self, conversation_id: str) -> Conversation | None:
        with self._reading() as session:
            return session.get(Conversation, conversation_id)

    @_once_more_if_stale
    def begin_attempt(self, new: NewMessage,
                      layer_names: tuple[str, ...] | None = None) -> MessageState:
        """Count one more attempt at a turn, creating its message row on the first.

        A finished turn (succeeded, failed for good or stopped), or one waiting for the
        user's answer, is returned as it is: a redelivered message must not start it again.
        Given the composition's ``layer_names``, an attempt that has no run to re-attach to
        also gets the snapshot its run starts from (``MessageState.snapshot``).
        """
        with self._connection(new.message_id) as connection:
            attempt = {"b_id": new.message_id, "b_task_id": new.task_id, "b_now": _now()}
            counted = connection.execute(_BEGIN_USUAL_ATTEMPT, attempt).first()
            row = None if counted else connection.execute(_MESSAGE_FOR_UPDATE,
                                                           {"id": new.message_id}).first()
            if counted is not None:
                state = _state_of(counted)
            elif row is None:
                values = _new_values(new, MessageStatus.RUNNING, attempts=1)
                connection.execute(_INSERT_MESSAGE, values)
                state = MessageState(status=MessageStatus.RUNNING, attempts=1, run_id=None,
                                     run_count=0, base_version=None, answer=None, usage=None,
                                     created_at=values["created_at"], error_code=None,
                                     error=None)
            elif row.status not in FINISHED_STATUSES \
                    and row.status != MessageStatus.AWAITING_INPUT:
                connection.execute(_BEGIN_ATTEMPT, attempt)
                state = replace(_state_of(row), attempts=row.attempts + 1,
                                status=MessageStatus.RUNNING)
            else:
                return _state_of(row)
            if layer_names is None or (state.run_id is not None
                                       and state.base_version is not None):
                return state
            loaded = _loaded(connection.execute(_SNAPSHOT, {"id": new.conversation_id}).first(),
                             layer_names)
            return replace(state, snapshot=loaded)

    @_once_more_if_stale
    def mark_queued(self, new: NewMessage) -> MessageState:
        """Record a turn waiting for its conversation; its first wait creates the row."""
        with self._transaction(new.message_id) as session:
            row = session.get(AssistantMessage, new.message_id, with_for_update=True)
            if row is None:
                row = _new_row(new, MessageStatus.QUEUED)
                session.add(row)
            return _state_of(row)

    @_once_more_if_stale
    def mark_stopped(self, new: NewMessage, *, partial_answer: str,
                     steps: Sequence[AgentStep] = ()) -> MessageState:
        """End a turn as stopped, keeping what was streamed; no snapshot is saved.

        A turn that had already finished keeps its ending; its state is returned either way.
        """
        now = _now()
        with self._transaction(new.message_id) as session:
            row = session.get(AssistantMessage, new.message_id, with_for_update=True)
            if row is None:
                row = _new_row(new, MessageStatus.STOPPED)
                session.add(row)
            elif row.status in FINISHED_STATUSES:
                return _state_of(row)
            _replace_steps(session, new.message_id, steps)
            row.status = MessageStatus.STOPPED
            row.answer = partial_answer
            row.updated_at = now
            row.finished_at = now
            return _state_of(row)

    @_once_more_if_stale
    def load_snapshot(self, conversation_id: str, layer_names: tuple[str, ...]) -> LoadedSnapshot:
        """The conversation's snapshot, unless it was taken under another composition."""
        with self._connection() as connection:
            return _loaded(connection.execute(_SNAPSHOT, {"id": conversation_id}).first(),
                           layer_names)

    @_once_more_if_stale
    def record_run(self, message_id: str, *, run_id: str, run_count: int,
                   base_version: int) -> None:
        with self._connection(message_id, autocommit=True) as connection:
            connection.execute(_RECORD_RUN, {
                "b_id": message_id, "b_run_id": run_id, "b_run_count": run_count,
                "b_base_version": base_version, "b_now": _now()})

    @_once_more_if_stale
    def record_takeover(self, message_id: str, dead_worker: str) -> bool:
        """Note on a running turn's row that a live worker took it over from ``dead_worker``;
        whether the turn was running (a queued or finished one is left as it is)."""
        with self._transaction(message_id) as session:
            result = session.execute(
                update(AssistantMessage)
                .where(AssistantMessage.message_id == message_id,
                       AssistantMessage.status == MessageStatus.RUNNING)
                .values(takeovers=AssistantMessage.takeovers + 1,
                        taken_over_from=dead_worker[:255], updated_at=_now()))
        return result.rowcount == 1

    @_once_more_if_stale
    def save_success(
        self,
        *,
        message_id: str,
        conversation_id: str,
        tenant_id: str,
        app_id: str,
        expected_version: int,
        snapshot: dict[str, Any] | None,
        layer_names: tuple[str, ...],
        answer: str,
        usage: dict[str, Any] | None,
        run_id: str,
        steps: Sequence[AgentStep] = (),
    ) -> None:
        """Save the new snapshot, the answer and its steps in one transaction, or none."""
        with self._connection(message_id) as connection:
            _replace_steps(connection, message_id, steps)
            if snapshot is not None:
                self._replace_snapshot(connection, conversation_id, tenant_id, app_id,
                                       expected_version, snapshot, layer_names, message_id)
            result = connection.execute(_SUCCEED, {
                "b_id": message_id, "b_answer": answer, "b_usage": usage, "b_run_id": run_id,
                "b_now": _now()})
            if result.rowcount != 1:
                # Raising inside the transaction rolls the snapshot back with it.
                raise AgentBackendError("the turn's message row is missing; nothing saved",
                                        message_id=message_id, run_id=run_id)

    @staticmethod
    def _replace_snapshot(connection: Connection, conversation_id: str, tenant_id: str,
                          app_id: str, expected_version: int, snapshot: dict[str, Any],
                          layer_names: tuple[str, ...], message_id: str) -> None:
        now = _now()
        if expected_version == 0:
            connection.execute(_INSERT_SNAPSHOT, {
                "conversation_id": conversation_id, "tenant_id": tenant_id, "app_id": app_id,
                "snapshot": snapshot, "layer_names": list(layer_names), "version": 1,
                "last_message_id": message_id, "updated_at": now})
            return
        result = connection.execute(_REPLACE_SNAPSHOT, {
            "b_id": conversation_id, "b_expected": expected_version, "b_snapshot": snapshot,
            "b_layer_names": list(layer_names), "b_version": expected_version + 1,
            "b_message_id": message_id, "b_now": now})
        if result.rowcount != 1:
            raise SnapshotConflict(
                f"conversation {conversation_id} moved past snapshot version {expected_version}",
                message_id=message_id,
            )

    @_once_more_if_stale
    def mark_unfinished(self, message_id: str, *, final: bool, code: str, error: str) -> None:
        """Record a failed attempt: ``final`` when no retry follows."""
        status = MessageStatus.FAILED if final else MessageStatus.RETRYING
        now = _now()
        with self._transaction(message_id) as session:
            session.execute(
                update(AssistantMessage)
                .where(AssistantMessage.message_id == message_id,
                       AssistantMessage.status.not_in(list(FINISHED_STATUSES)))
                .values(status=status, error_code=code, error=error[:4000], updated_at=now,
                        finished_at=now if final else None)
            )

    @_once_more_if_stale
    def mark_awaiting_input(self, message_id: str, *, pending: dict[str, Any],
                            partial_answer: str, steps: Sequence[AgentStep],
                            expires_at: datetime) -> None:
        """End a leg of the turn with a question: what resuming takes, in one transaction."""
        with self._transaction(message_id) as session:
            _replace_steps(session, message_id, steps)
            result = session.execute(
                update(AssistantMessage)
                .where(AssistantMessage.message_id == message_id,
                       AssistantMessage.status.not_in(list(FINISHED_STATUSES)))
                .values(status=MessageStatus.AWAITING_INPUT, pending_input=pending,
                        input_expires_at=expires_at, answer=partial_answer,
                        updated_at=_now()))
            if result.rowcount != 1:
                raise AgentBackendError("the turn's message row is missing or ended; nothing "
                                        "saved", message_id=message_id)

    @_once_more_if_stale
    def take_answer(self, message_id: str, *, owner: tuple[str, str, str], task_id: str,
                    accept: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Move a waiting message back to running with its answer, exactly once.

        ``accept`` checks the answer against the stored question and returns it (or raises,
        and nothing is written). The same continuation task, redelivered or retried, takes
        its answer again; any other finds the question closed (``HumanInputRefused``).
        """
        now = _now()
        with self._transaction(message_id) as session:
            row = session.get(AssistantMessage, message_id, with_for_update=True)
            if row is None or (row.tenant_id, row.app_id, row.user_id) != owner:
                raise HumanInputRefused("no such message is waiting for an answer",
                                        message_id=message_id)
            pending = dict(row.pending_input or {})
            if row.status not in FINISHED_STATUSES and pending.get("resume_task_id") == task_id:
                row.attempts += 1
                row.status = MessageStatus.RUNNING
                row.updated_at = now
                return pending
            if row.status != MessageStatus.AWAITING_INPUT:
                raise HumanInputRefused(f"the message is {row.status}, not awaiting input",
                                        message_id=message_id)
            expires_at = row.input_expires_at
            if expires_at is not None and expires_at.replace(tzinfo=expires_at.tzinfo or UTC) \
                    <= now:
                raise HumanInputRefused("the question has expired", message_id=message_id)
            pending["answer"] = accept(pending)
            pending["resume_task_id"] = task_id
            row.pending_input = pending
            row.status = MessageStatus.RUNNING
            row.task_id = task_id
            row.attempts += 1
            row.updated_at = now
            return pending

    def expire_questions(self, now: datetime | None = None) -> list[AssistantMessage]:
        """End every question past its expiry as failed; each is returned by one caller only."""
        now = now or _now()
        return [row for row in self._due_questions(now) if self._expire_question(row, now)]

    @_once_more_if_stale
    def _due_questions(self, now: datetime) -> list[AssistantMessage]:
        with self._reading() as session:
            return list(session.scalars(
                select(AssistantMessage)
                .where(AssistantMessage.status == MessageStatus.AWAITING_INPUT,
                       AssistantMessage.input_expires_at <= now)
                .limit(100)))

    @_once_more_if_stale
    def _expire_question(self, row: AssistantMessage, now: datetime) -> bool:
        """Whether this call ended the question (another caller may have ended it first)."""
        with self._transaction(row.message_id) as session:
            result = session.execute(
                update(AssistantMessage)
                .where(AssistantMessage.message_id == row.message_id,
                       AssistantMessage.status == MessageStatus.AWAITING_INPUT)
                .values(status=MessageStatus.FAILED, error_code="human_input_expired",
                        error="the question was not answered in time",
                        pending_input=None, updated_at=now, finished_at=now))
        return bool(result.rowcount == 1)

    @_once_more_if_stale
    def save_steps(self, message_id: str, steps: Sequence[AgentStep]) -> None:
        """Keep the steps a failed attempt showed (the next attempt's replace them)."""
        with self._transaction(message_id) as session:
            _replace_steps(session, message_id, steps)

    @_once_more_if_stale
    def list_steps(self, message_id: str) -> list[AgentThought]:
        """The message's steps in order, as its clients last saw them."""
        with self._reading(message_id) as session:
            return list(session.scalars(
                select(AgentThought).where(AgentThought.message_id == message_id)
                .order_by(AgentThought.position)))

    @_once_more_if_stale
    def get_message(self, message_id: str) -> AssistantMessage | None:
        with self._reading(message_id) as session:
            return session.get(AssistantMessage, message_id)

    @_once_more_if_stale
    def get_snapshot(self, conversation_id: str) -> ConversationSnapshot | None:
        with self._reading() as session:
            return session.get(ConversationSnapshot, conversation_id)

    @_once_more_if_stale
    def list_messages(self, conversation_id: str) -> list[AssistantMessage]:
        with self._reading() as session:
            return list(session.scalars(
                select(AssistantMessage)
                .where(AssistantMessage.conversation_id == conversation_id)
                .order_by(AssistantMessage.created_at)
            ))


def _replace_steps(executor: Session | Connection, message_id: str,
                   steps: Sequence[AgentStep]) -> None:
    executor.execute(_DELETE_THOUGHTS, {"id": message_id})
    if not steps:
        return
    now = _now()
    executor.execute(_INSERT_THOUGHTS, [
        {"message_id": message_id, "position": step.position, "step_id": step.id,
         "thought": step.thought, "tool": step.tool, "tool_input": step.tool_input,
         "observation": step.observation, "created_at": now} for step in steps])


def _not_found(new: NewMessage) -> NotTheOwner:
    return NotTheOwner(f"conversation {new.conversation_id} not found",
                       message_id=new.message_id)


def _new_values(new: NewMessage, status: MessageStatus, *, attempts: int = 0) -> dict[str, Any]:
    now = _now()
    return {"message_id": new.message_id, "conversation_id": new.conversation_id,
            "tenant_id": new.tenant_id, "app_id": new.app_id, "user_id": new.user_id,
            "task_id": new.task_id, "query": new.query, "status": status.value,
            "attempts": attempts, "run_count": 0, "takeovers": 0, "created_at": now,
            "updated_at": now}


def _new_row(new: NewMessage, status: MessageStatus) -> AssistantMessage:
    return AssistantMessage(**_new_values(new, status))


def _loaded(row: ConversationSnapshot | Row[Any] | None,
            layer_names: tuple[str, ...]) -> LoadedSnapshot:
    if row is None:
        return LoadedSnapshot(None, 0)
    if tuple(row.layer_names) != layer_names:
        return LoadedSnapshot(None, row.version)
    return LoadedSnapshot(row.snapshot, row.version)


def _state_of(row: AssistantMessage | Row[Any]) -> MessageState:
    return MessageState(status=row.status, attempts=row.attempts, run_id=row.run_id,
                        run_count=row.run_count, base_version=row.base_version,
                        answer=row.answer, usage=row.usage, created_at=row.created_at,
                        error_code=row.error_code, error=row.error,
                        pending_input=row.pending_input, input_expires_at=row.input_expires_at,
                        takeovers=row.takeovers or 0, taken_over_from=row.taken_over_from)
