"""The agent's process as Dify-style ``agent_thought`` steps: one translation, from run events.

A run's ``pydantic_ai_event`` stream mixes the answer (text parts) with the agent's process:
thinking parts, tool calls (``tool-call`` parts, ``function_tool_call``) and their results
(``function_tool_result`` with a ``tool-return`` or a ``retry-prompt`` part). ``StepTracker``
turns the process into steps, the unit Dify's agent apps show: a step has a ``thought`` and at
most one tool call with its ``tool_input`` and ``observation``. The rules, read off the captured
reference streams (../shared/agent-protocol-frames/):

- a thinking part starts a step (or fills the current one, while that has no thought and no
  tool yet); its deltas grow the thought and its ``part_end``, which repeats the whole text, is
  authoritative;
- a tool call goes into the current step if that step has no tool yet, else starts a new one;
  a ``function_tool_call`` whose call was not seen as a part (a resumed run starts with one)
  starts its step too;
- a tool result goes to the step of the same ``tool_call_id``.

Each change returns the step as it now stands; the turn publishes it under the step's stable
``id`` so that a client replaces what it holds. Pure: no I/O, so it is tested on the captured
streams themselves.

Exposure and bounds are applied here, before a step leaves the translation: with thinking hidden
a step never carries thought text (nothing reaches the bus, the store or a log), with tool calls
hidden tool steps do not exist; every field is cut at ``max_field_chars`` with ``CUT_MARKER`` and
a message keeps at most ``max_steps`` steps (later ones are counted in ``dropped``, not shown).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from worker.backend import RunEvent

# Ends a field that was cut at its bound; the full value never leaves the worker.
CUT_MARKER = " …[cut]"
_STEP_NAMESPACE = uuid.UUID("6f1c1d2e-4b7a-4e55-9d1e-2c3a8b9f0a11")


@dataclass(frozen=True, slots=True)
class StepExposure:
    """What of the agent's process a turn shows, and how much of it."""

    thinking: bool = True
    tool_calls: bool = True
    max_steps: int = 50
    max_field_chars: int = 4000


@dataclass(frozen=True, slots=True)
class AgentStep:
    """One step as clients and the store see it (Dify's ``agent_thought`` fields)."""

    id: str
    position: int
    thought: str
    tool: str
    tool_input: str
    observation: str

    def event_fields(self) -> dict[str, Any]:
        """The fields of its ``agent_thought`` event, besides the envelope."""
        return {"id": self.id, "position": self.position, "thought": self.thought,
                "tool": self.tool, "tool_labels": {}, "tool_input": self.tool_input,
                "observation": self.observation, "message_files": []}


@dataclass
class _Step:
    position: int
    thought: str = ""
    tool: str = ""
    tool_call_id: str | None = None
    tool_input: str = ""
    observation: str = ""
    thinking_index: int | None = None
    fixed_id: str | None = None


@dataclass
class StepTracker:
    """The steps of one message, fed every event of its run(s) in order."""

    message_id: str
    exposure: StepExposure = field(default_factory=StepExposure)
    run_key: str = ""
    dropped: int = 0
    _steps: list[_Step] = field(default_factory=list)
    _by_call: dict[str, _Step] = field(default_factory=dict)
    _thinking: dict[int, _Step] = field(default_factory=dict)
    _shown: dict[int, AgentStep] = field(default_factory=dict)
    _display: dict[int, int] = field(default_factory=dict)

    def feed(self, event: RunEvent) -> AgentStep | None:
        """The step this event changed, as it now stands; None if none (or nothing shown)."""
        if event.type != "pydantic_ai_event":
            return None
        data = event.data
        kind = data.get("event_kind")
        part = data.get("part") if isinstance(data.get("part"), dict) else {}
        if kind in ("part_start", "part_end") and part.get("part_kind") == "thinking":
            return self._thinking_part(data.get("index"), part.get("content"), kind)
        if kind == "part_delta":
            delta = data.get("delta") if isinstance(data.get("delta"), dict) else {}
            if delta.get("part_delta_kind") == "thinking":
                return self._thinking_delta(data.get("index"), delta.get("content_delta"))
            return None
        if kind in ("part_start", "part_end", "function_tool_call") \
                and part.get("part_kind") == "tool-call":
            return self._tool_call(part)
        if kind == "function_tool_result":
            return self._tool_result(part)
        return None

    def steps(self) -> list[AgentStep]:
        """Every step shown so far, in order (what the store keeps with the message)."""
        return [self._shown[position] for position in sorted(self._shown)]

    def resume(self, shown: list[AgentStep], *, tool_call_id: str, run_key: str) -> None:
        """Continue a message whose earlier leg showed ``shown`` and asked a question.

        The steps keep their ids and positions; the question's step (the last ``ask_human``
        step) is the one the answer's ``function_tool_result`` completes.
        """
        self.restart(run_key)
        for step in shown:
            self._steps.append(_Step(position=step.position, thought=step.thought,
                                     tool=step.tool, tool_input=step.tool_input,
                                     observation=step.observation, fixed_id=step.id))
            self._shown[step.position] = step
            self._display[step.position] = step.position
        asking = [step for step in self._steps if step.tool == "ask_human"]
        if asking:
            asking[-1].tool_call_id = tool_call_id
            self._by_call[tool_call_id] = asking[-1]

    def restart(self, run_key: str) -> None:
        """A new run answers the message from scratch: its steps replace the old ones."""
        self.run_key = run_key
        self.dropped = 0
        self._steps.clear()
        self._by_call.clear()
        self._thinking.clear()
        self._shown.clear()
        self._display.clear()

    # The translation ---------------------------------------------------------------------

    def _thinking_part(self, index: Any, content: Any, kind: str) -> AgentStep | None:
        # A part_start is always a new part: a new model round numbers its parts from 0 again.
        step = None if kind == "part_start" else (
            self._thinking.get(index) if isinstance(index, int) else None)
        if step is None:
            current = self._steps[-1] if self._steps else None
            if current is not None and not current.thought and not current.tool \
                    and current.thinking_index is None:
                step = current
            else:
                step = self._new_step()
            step.thinking_index = index if isinstance(index, int) else None
            if isinstance(index, int):
                self._thinking[index] = step
        text = content if isinstance(content, str) else ""
        if kind == "part_end" or text.strip():
            step.thought = text if kind == "part_end" else step.thought + text
        elif kind == "part_start":
            step.thought = text
        if kind == "part_end" and isinstance(index, int):
            self._thinking.pop(index, None)
        return self._show(step)

    def _thinking_delta(self, index: Any, content: Any) -> AgentStep | None:
        if not isinstance(content, str):
            return None
        step = self._thinking.get(index) if isinstance(index, int) else None
        if step is None:
            return self._thinking_part(index, content, "part_start")
        step.thought += content
        return self._show(step)

    def _tool_call(self, part: dict[str, Any]) -> AgentStep | None:
        call_id = part.get("tool_call_id") if isinstance(part.get("tool_call_id"), str) else None
        step = self._by_call.get(call_id) if call_id is not None else None
        if step is None:
            current = self._steps[-1] if self._steps else None
            step = current if current is not None and not current.tool else self._new_step()
            if call_id is not None:
                self._by_call[call_id] = step
        step.tool_call_id = call_id
        step.tool = part.get("tool_name") if isinstance(part.get("tool_name"), str) else ""
        step.tool_input = _as_text(part.get("args"))
        return self._show(step)

    def _tool_result(self, part: dict[str, Any]) -> AgentStep | None:
        call_id = part.get("tool_call_id")
        step = self._by_call.get(call_id) if isinstance(call_id, str) else None
        if step is None:  # a result of a call never seen: still worth showing
            step = self._new_step()
            step.tool = part.get("tool_name") if isinstance(part.get("tool_name"), str) else ""
        step.observation = _as_text(part.get("content"))
        return self._show(step)

    def _new_step(self) -> _Step:
        step = _Step(position=max((known.position for known in self._steps), default=0) + 1)
        self._steps.append(step)
        return step

    # Exposure and bounds ------------------------------------------------------------------

    def _show(self, step: _Step) -> AgentStep | None:
        exposure = self.exposure
        shown_tool = step.tool if exposure.tool_calls else ""
        thought = step.thought if exposure.thinking else ""
        if not thought.strip() and not shown_tool:
            return None
        if step.position not in self._shown and len(self._shown) >= exposure.max_steps:
            self.dropped += 1
            return None
        limit = exposure.max_field_chars
        visible = AgentStep(
            id=step.fixed_id or str(uuid.uuid5(_STEP_NAMESPACE, f"{self.message_id}/"
                                                                f"{self.run_key}/"
                                                                f"{step.position}")),
            position=self._display.setdefault(step.position, len(self._display) + 1),
            thought=_cut(thought, limit),
            tool=_cut(shown_tool, 128),
            tool_input=_cut(step.tool_input, limit) if shown_tool else "",
            observation=_cut(step.observation, limit) if shown_tool else "",
        )
        # Positions count the steps shown (1, 2, …) in the order they first showed, not the
        # hidden ones in between.
        if self._shown.get(step.position) == visible:
            return None
        self._shown[step.position] = visible
        return visible


def _as_text(value: Any) -> str:
    """A tool's arguments or result as text: strings as they are, anything else compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + CUT_MARKER
