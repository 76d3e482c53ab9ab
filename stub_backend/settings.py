"""The stub's settings: one frozen object, from code or from ``STUB_*`` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["StubSettings"]


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return default if raw in (None, "") else float(raw)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if raw in (None, "") else int(raw)


@dataclass(frozen=True)
class StubSettings:
    """Knobs of the stub; per-message overrides registered via ``/_stub/`` take precedence.

    ``token_delay`` paces the answer (and thoughts) so tests and benchmarks can observe
    streaming (and cancel mid-run); ``answer_tokens`` pads answers to a fixed length for load
    tests; ``keepalive_interval`` is small in tests so idle-stream handling can be exercised
    quickly.
    """

    token_delay: float = 0.02
    answer_tokens: int = 0
    keepalive_interval: float = 15.0
    auth_token: str | None = None

    def __post_init__(self) -> None:
        if self.token_delay < 0:
            raise ValueError("token_delay must be >= 0")
        if self.answer_tokens < 0:
            raise ValueError("answer_tokens must be >= 0")
        if self.keepalive_interval <= 0:
            raise ValueError("keepalive_interval must be > 0 (it paces the keepalive frames)")

    @classmethod
    def from_env(cls) -> StubSettings:
        """Read ``STUB_TOKEN_DELAY``, ``STUB_ANSWER_TOKENS``, ``STUB_KEEPALIVE_INTERVAL`` and
        ``STUB_AUTH_TOKEN``, so a stub started as its own process can be configured by the
        script that launches it."""
        return cls(
            token_delay=_env_float("STUB_TOKEN_DELAY", cls.token_delay),
            answer_tokens=_env_int("STUB_ANSWER_TOKENS", cls.answer_tokens),
            keepalive_interval=_env_float("STUB_KEEPALIVE_INTERVAL", cls.keepalive_interval),
            auth_token=os.environ.get("STUB_AUTH_TOKEN") or None,
        )
