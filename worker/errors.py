"""The one exception family of the worker: what can go wrong with a turn, and whether to retry.

Every failure a turn can meet is an ``AgentBackendError``. The task catches exactly this family:
a ``RetryableAgentError`` goes back to Celery with backoff; a ``PermanentAgentError`` (or the last
retry) ends the turn with one ``error`` event on its channel. Anything outside the family is a bug
and is treated as permanent, so a client is never left waiting.

    AgentBackendError                 carries run_id, message_id, code, status
    ├── RetryableAgentError           retried with exponential backoff and jitter
    │   ├── BackendUnavailable        connection refused/reset, time-outs, 5xx / 503 / 429 on a call
    │   ├── StreamInterrupted         the SSE stream broke, ended or stalled before a terminal
    │   │                             event, and resuming from the last event id did not help
    │   ├── TransientRunFailure       run_failed with a transient reason (rate limit, overload)
    │   ├── SnapshotConflict          a newer snapshot of the conversation landed meanwhile
    │   ├── ConversationBusy          another turn of the conversation is running: wait, then
    │   │                             run (a wait, not a failure: it spends no retry)
    │   ├── TurnStoreUnavailable      the session store could not be reached
    │   └── EventBusUnavailable       Redis pub/sub could not be reached
    └── PermanentAgentError           never retried: retrying cannot change the outcome
        ├── InvalidTurnPayload        the task payload failed validation
        ├── NotTheOwner               the conversation or message id belongs to another owner;
        │                             refused before anything is read or written, with a code
        │                             that does not tell whether the other one exists
        ├── ConversationAwaitingInput another message of the conversation waits for the user's
        │                             answer to a question (ask_human); answer it first
        ├── HumanInputRefused         an answer to a question that is not open (unknown message
        │   │                         or call, answered already, expired) or does not fit it
        │   └── AnswerTooLate         the question is past its expiry, its message not yet
        │                             ended by a sweep: refused, with the expiry's 410
        ├── HumanInputExpired         the question was not answered in time; the message ends
        ├── RunRejected               4xx on create (422 validation, 401/403 auth, 404 …)
        ├── ProtocolViolation         undecodable frame, invalid event, oversize value
        ├── RunFailed                 run_failed with a permanent or unknown reason
        ├── RunCancelled              the backend cancelled the run
        ├── TurnTimedOut              the turn passed its overall deadline
        ├── TurnInterrupted           the supervisor stopped the turn (stop or deadline); the
        │                             turn turns it into its stopped end or TurnTimedOut
        └── TurnTakenOver             another worker took the turn over while this copy was
                                      paused or cut off: this copy stops, publishing and
                                      writing nothing (worker/takeover.py)

Why unknown ``run_failed`` reasons are permanent: retrying a model call costs money, and only
the reasons known to be transient are worth paying for twice.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar


class AgentBackendError(Exception):
    """Root of every failure of a turn."""

    retryable: ClassVar[bool] = False
    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500

    def __init__(
        self, message: str, *, run_id: str | None = None, message_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.run_id = run_id
        self.message_id = message_id
        # How many attempts the turn had made when this was raised, where the raiser knows:
        # the task's retry budget counts attempts that ran, not waits for a busy conversation.
        self.attempts: int | None = None

    def counting(self, attempts: int) -> AgentBackendError:
        self.attempts = attempts
        return self

    def with_ids(
        self, *, run_id: str | None = None, message_id: str | None = None
    ) -> AgentBackendError:
        """Fill in ids the raiser did not know, keeping any it did."""
        self.run_id = self.run_id or run_id
        self.message_id = self.message_id or message_id
        return self

    def __str__(self) -> str:
        ids = [f"{name}={value}" for name, value in
               (("message_id", self.message_id), ("run_id", self.run_id)) if value]
        return f"{self.message} ({', '.join(ids)})" if ids else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Celery pickles or serialises exceptions for the result backend; keyword-only ids would
        # otherwise be lost on the way.
        return (_rebuild, (type(self), self.message, self.run_id, self.message_id))


def _rebuild(cls: type[AgentBackendError], message: str, run_id: str | None,
             message_id: str | None) -> AgentBackendError:
    return cls(message, run_id=run_id, message_id=message_id)


class RetryableAgentError(AgentBackendError):
    retryable = True
    code = "temporarily_unavailable"
    status = 503


class BackendUnavailable(RetryableAgentError):
    code = "backend_unavailable"


class StreamInterrupted(RetryableAgentError):
    code = "stream_interrupted"


class TransientRunFailure(RetryableAgentError):
    code = "model_temporarily_unavailable"

    def __init__(self, message: str, *, reason: str | None = None, **ids: Any) -> None:
        super().__init__(message, **ids)
        self.reason = reason


class SnapshotConflict(RetryableAgentError):
    code = "snapshot_conflict"
    status = 409


class ConversationBusy(RetryableAgentError):
    code = "conversation_busy"
    status = 409
    queued_since: datetime | None = None

    def waiting_since(self, queued_since: datetime) -> ConversationBusy:
        self.queued_since = queued_since
        return self


class TurnStoreUnavailable(RetryableAgentError):
    code = "store_unavailable"


class EventBusUnavailable(RetryableAgentError):
    code = "event_bus_unavailable"


class PermanentAgentError(AgentBackendError):
    retryable = False


class InvalidTurnPayload(PermanentAgentError):
    code = "invalid_param"
    status = 400


class NotTheOwner(PermanentAgentError):
    """A turn naming a conversation or message of another (tenant, app, user).

    Its code and status are those of a conversation that does not exist, so that a refused
    sender cannot tell another owner's conversation from an unknown id.
    """

    code = "conversation_not_found"
    status = 404


class ConversationAwaitingInput(PermanentAgentError):
    code = "conversation_awaiting_input"
    status = 409


class HumanInputRefused(PermanentAgentError):
    code = "human_input_refused"
    status = 409


class AnswerTooLate(HumanInputRefused):
    """An answer after the question's expiry, in the moment before a worker's sweep ends the
    message (``HumanInputExpired``). A ``HumanInputRefused`` like any answer to a closed
    question, so callers that catch that catch this; its code and status say why."""

    code = "human_input_expired"
    status = 410


class HumanInputExpired(PermanentAgentError):
    code = "human_input_expired"
    status = 410


class RunRejected(PermanentAgentError):
    code = "run_rejected"
    status = 400


class ProtocolViolation(PermanentAgentError):
    code = "backend_protocol_error"
    status = 502


class RunFailed(PermanentAgentError):
    code = "model_error"
    status = 400

    def __init__(self, message: str, *, reason: str | None = None, **ids: Any) -> None:
        super().__init__(message, **ids)
        self.reason = reason


class RunCancelled(PermanentAgentError):
    code = "run_cancelled"
    status = 409


class TurnTimedOut(PermanentAgentError):
    code = "turn_timeout"
    status = 504


class TurnInterrupted(PermanentAgentError):
    code = "turn_interrupted"

    def __init__(self, message: str, *, reason: str | None = None, **ids: Any) -> None:
        super().__init__(message, **ids)
        self.reason = reason


TRANSIENT_RUN_FAILURE_REASONS = frozenset(
    {"InvokeRateLimitError", "InvokeServerUnavailableError", "InvokeConnectionError"}
)


def status_for_code(code: str) -> int:
    """The HTTP-like status of an error code, for re-emitting a stored failure."""
    pending: list[type[AgentBackendError]] = [AgentBackendError]
    while pending:
        cls = pending.pop()
        if cls.code == code:
            return cls.status
        pending.extend(cls.__subclasses__())
    return AgentBackendError.status


class TurnTakenOver(PermanentAgentError):
    """This copy of a turn lost its conversation lease to another worker's takeover.

    Not an ending of the turn: the copy that took over streams it to its end. The task ends
    without a result, an event or a write, so that it contradicts nothing the other did.
    """

    code = "turn_taken_over"
    status = 409
