"""Every knob of the worker in one typed object, read from ``AGENT_TURN_*`` environment variables.

The defaults run on a developer machine with nothing configured: a local Redis for broker,
results and the pub/sub bus (three databases, so each can be flushed or moved on its own), a
SQLite file for the session store and the stub backend on port 8790. Production overrides the
URLs and secrets through the environment; nothing secret has a default that could leak.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_COMPOSITION_TEMPLATE = Path(__file__).resolve().parent / "composition.default.json"


class Settings(BaseSettings):
    """Settings for the worker, the producer helper and the demo."""

    model_config = SettingsConfigDict(env_prefix="AGENT_TURN_", extra="ignore", frozen=True)

    # Where things live.
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    pubsub_url: str = "redis://127.0.0.1:6379/2"
    database_url: str = f"sqlite:///{PROJECT_ROOT / 'var' / 'agent_turns.sqlite3'}"
    queue: str = "agent_turns"
    channel_prefix: str = "agent-turn:events:"

    # The dify-agent backend.
    backend_url: str = "http://127.0.0.1:8790"
    backend_token: SecretStr | None = None
    backend_connect_timeout: float = Field(5.0, gt=0)
    # No byte at all (keepalives included) for this long means the stream stalled. The reference
    # server sends a keepalive every 15 s, so anything comfortably above that is safe.
    backend_read_timeout: float = Field(45.0, gt=0)
    stream_max_reconnects: int = Field(5, ge=0)
    stream_reconnect_delay: float = Field(0.25, ge=0)
    max_frame_bytes: int = Field(4 * 1024 * 1024, gt=0)
    max_answer_chars: int = Field(1_000_000, gt=0)

    # What a run is made of.
    composition_template: Path = DEFAULT_COMPOSITION_TEMPLATE
    agent_mode: str = "agent_app"
    default_system_prompt: str = "You are a helpful assistant."
    model_plugin_id: str = "langgenius/openai"
    model_provider: str = "openai"
    default_model: str = "gpt-4o"
    allowed_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    model_credentials: SecretStr = SecretStr("{}")

    # Limits on what a turn payload may carry.
    max_query_chars: int = Field(32_000, gt=0)
    max_system_prompt_chars: int = Field(16_000, gt=0)
    max_inputs_bytes: int = Field(64 * 1024, gt=0)
    max_output_tokens: int = Field(16_384, gt=0)

    # Publishing: the first delta of a turn goes out at once, later ones are coalesced until the
    # window has passed or the buffer holds this many characters.
    coalesce_window_ms: float = Field(40.0, ge=0)
    coalesce_max_chars: int = Field(512, gt=0)
    turn_state_ttl_seconds: int = Field(24 * 3600, gt=0)

    # Celery retries of retryable failures: exponential backoff with full jitter.
    max_retries: int = Field(4, ge=0)
    retry_backoff_base: float = Field(1.0, ge=0)
    retry_backoff_max: float = Field(30.0, ge=0)

    # Worker process.
    worker_concurrency: int = Field(64, gt=0)
    db_pool_size: int = Field(10, gt=0)

    @field_validator("allowed_models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("model_credentials")
    @classmethod
    def _credentials_are_a_json_object(cls, value: SecretStr) -> SecretStr:
        try:
            parsed = json.loads(value.get_secret_value())
        except ValueError as exc:
            raise ValueError("AGENT_TURN_MODEL_CREDENTIALS must be a JSON object") from exc
        if not isinstance(parsed, dict):
            raise ValueError("AGENT_TURN_MODEL_CREDENTIALS must be a JSON object")
        return value

    def model_credentials_dict(self) -> dict[str, Any]:
        return json.loads(self.model_credentials.get_secret_value())

    def channel_for(self, message_id: str) -> str:
        """The pub/sub channel a turn's events go to: one per turn, named by its message id."""
        return f"{self.channel_prefix}{message_id}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
