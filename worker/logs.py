"""One structured log line per stage of a turn, so an operator can follow any turn by its ids.

Each line is a JSON object on the ``agent_turn.stages`` logger: ``stage`` (received, queued,
run_created, first_chunk, end, retry, error), the turn's ids, and the stage's own numbers
(durations in milliseconds, counts). Only ids, codes, sizes and times are logged, never the
query, the answer, inputs, credentials or tokens, so the lines are safe to ship anywhere.
"""

from __future__ import annotations

import json
import logging
from typing import Any

stage_log = logging.getLogger("agent_turn.stages")


def log_stage(stage: str, *, level: int = logging.INFO, **fields: Any) -> None:
    if not stage_log.isEnabledFor(level):
        return
    record = {"stage": stage, **{k: v for k, v in fields.items() if v is not None}}
    stage_log.log(level, json.dumps(record, separators=(",", ":"), default=str))


def ms(seconds: float) -> int:
    return round(seconds * 1000)
