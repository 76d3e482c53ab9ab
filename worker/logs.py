"""One structured log line per stage of a turn, so an operator can follow any turn by its ids.

Each line is a JSON object on the ``agent_turn.stages`` logger: ``stage`` (received, queued,
run_created, first_chunk, end, retry, error), the turn's ids, and the stage's own numbers
(durations in milliseconds, counts). Only ids, codes, sizes and times are logged, never the
query, the answer, inputs, credentials or tokens, so the lines are safe to ship anywhere.

Every log record of a worker or gateway process is made by ``SafeLogRecord`` (installed with
``install_safe_log_records``): a value from a payload or a request can carry a line break and a
fake log line, or be 60 KB long. So each argument of a record, and the message it makes, has its
control characters (line breaks included), lone surrogates and Unicode line separators escaped,
and is cut to a bounded length with a marker that says how much was left out. Escaping happens
where records are made, not in one handler's formatter, so Celery's, kombu's and uvicorn's
handlers all get safe lines. Tracebacks are left as Python prints them.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

stage_log = logging.getLogger("agent_turn.stages")

# C0 and C1 controls (line feed, carriage return, escape …), DEL, the Unicode line and paragraph
# separators, and lone surrogates (which no encoder can write).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# A log argument and a whole log message at most, in characters, before the cut marker.
LOG_VALUE_CHARS = 512
LOG_MESSAGE_CHARS = 4096


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def excerpt(value: Any, limit: int = 80) -> str:
    """A bounded, escaped rendering of an untrusted value: safe in a log line or an event.

    Control characters and lone surrogates become ``\\xNN``/``\\uNNNN`` escapes, and a
    value longer than ``limit`` characters is cut with ``…(+N chars)``, so a reader sees that,
    and how much, was left out.
    """
    text = value if isinstance(value, str) else str(value)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    text = _UNSAFE.sub(_escaped, text)
    return f"{text}…(+{cut} chars)" if cut > 0 else text


def _safe_arg(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    return excerpt(value, LOG_VALUE_CHARS)


class SafeLogRecord(logging.LogRecord):
    """A log record whose arguments and message cannot forge lines or flood the log."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.args, tuple):
            self.args = tuple(_safe_arg(arg) for arg in self.args)
        elif isinstance(self.args, dict):
            self.args = {key: _safe_arg(arg) for key, arg in self.args.items()}

    def getMessage(self) -> str:
        return excerpt(super().getMessage(), LOG_MESSAGE_CHARS)


def install_safe_log_records() -> None:
    """Make every log record of this process a ``SafeLogRecord``."""
    logging.setLogRecordFactory(SafeLogRecord)


def log_stage(stage: str, *, level: int = logging.INFO, **fields: Any) -> None:
    if not stage_log.isEnabledFor(level):
        return
    record = {"stage": stage, **{k: v for k, v in fields.items() if v is not None}}
    stage_log.log(level, json.dumps(record, separators=(",", ":"), default=str))


def ms(seconds: float) -> int:
    return round(seconds * 1000)
