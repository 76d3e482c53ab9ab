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

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_COMPOSITION_TEMPLATE = Path(__file__).resolve().parent / "composition.default.json"
# Known to everyone who reads this file: a gateway that uses it accepts tokens anyone can mint.
INSECURE_DEV_GATEWAY_SECRET = "INSECURE-dev-only-gateway-secret-set-AGENT_TURN_GATEWAY_SECRET"


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
    # How deep ``inputs`` may nest (objects and arrays); deeper is an invalid payload.
    max_inputs_depth: int = Field(32, gt=0, le=256)

    # The agent's process as ``agent_thought`` steps (worker/steps.py): what a turn shows when
    # its payload does not say (``agent.include_thinking``, ``agent.include_tool_calls``), and
    # the bounds of what any turn shows (longer fields are cut with a marker).
    expose_thinking: bool = True
    expose_tool_calls: bool = True
    max_steps_per_message: int = Field(50, ge=0)
    max_step_field_chars: int = Field(4000, gt=0)
    # A question to the user (ask_human): how long it stays open before the message ends with
    # human_input_expired, how large an answer may be, and how often workers look for
    # questions past their time.
    human_input_ttl_seconds: float = Field(3600.0, gt=0)
    max_human_input_bytes: int = Field(16 * 1024, gt=0)
    question_sweep_seconds: float = Field(2.0, gt=0)
    max_output_tokens: int = Field(16_384, gt=0)

    # Publishing: a turn publishes at most one event per window (its first answer text at once).
    # A delta that comes after the window since the last event goes out at once; one that comes
    # sooner waits for the window to pass or the buffer to hold this many characters.
    coalesce_window_ms: float = Field(40.0, ge=0)
    coalesce_max_chars: int = Field(512, gt=0)
    # Publish round trips a worker process keeps in flight at once (worker/publisher.py,
    # GroupCommit): more lets an event go out without waiting for another turn's round trip;
    # events that arrive while all are busy share the next one.
    publish_round_trips: int = Field(4, gt=0, le=64)
    # Whether a publish round trip first lets the turns that are ready to run publish with it
    # (worker/publisher.py, GroupCommit): under load many events share one round trip.
    publish_gather: bool = True
    turn_state_ttl_seconds: int = Field(24 * 3600, gt=0)
    # The replay log of a turn (worker/publisher.py): kept this long after each write while the
    # turn runs, and this long after its message_end or error, for clients that reconnect late.
    # Capped at turn_state_ttl_seconds, so the seq counter always outlives the log.
    replay_log_ttl_seconds: int = Field(3600, gt=0)
    replay_log_ttl_after_end_seconds: int = Field(300, gt=0)
    # A finished turn's log keeps only what a resuming client needs: the steps' last versions,
    # the other events, and the answer as one message_replace (worker/publisher.py).
    replay_log_compact_on_end: bool = True

    # The SSE gateway (gateway/, docs/gateway.md). The secret signs stream tokens; its default
    # is public and only fit for a developer machine (the gateway warns when it runs with it).
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(8791, ge=0, le=65535)
    gateway_secret: SecretStr = SecretStr(INSECURE_DEV_GATEWAY_SECRET)
    gateway_token_ttl_seconds: int = Field(3600, gt=0)
    gateway_ping_interval_seconds: float = Field(10.0, gt=0)
    # A client more than this many live events behind, or whose socket takes no bytes for this
    # long, is disconnected; it can resume with Last-Event-ID.
    gateway_client_buffer_events: int = Field(256, gt=0)
    # Live frames written by the pub/sub reader straight to a client that keeps up
    # (gateway.sse.DirectWriter); off, every frame goes through the ASGI send.
    gateway_direct_writes: bool = True
    # The pub/sub connection is read at most once per this many milliseconds while messages
    # keep coming (a quiet connection is read at once, a saturated process reads as it
    # comes): each read then takes many messages, and the process wakes once for them, not
    # once for every few. 0 reads every message as it comes (docs/gateway.md).
    gateway_read_batch_ms: float = Field(2.0, ge=0, le=50)
    gateway_send_timeout_seconds: float = Field(30.0, gt=0)
    gateway_replay_page_size: int = Field(256, gt=0)
    gateway_subscribe_timeout_seconds: float = Field(5.0, gt=0)
    # A lost pub/sub connection: how long open streams wait for it (pinging their clients)
    # before they are cut, and over how long their re-reads of the log are spread once it is
    # back, so that thousands of streams do not re-read in one burst.
    gateway_pubsub_outage_seconds: float = Field(60.0, gt=0)
    gateway_reread_spread_seconds: float = Field(1.0, ge=0)
    gateway_redis_max_connections: int = Field(32, gt=0)
    gateway_redis_health_check_seconds: float = Field(5.0, gt=0)
    # A stream of a turn that has published nothing yet (never enqueued, lost before a worker
    # took it, still queued) closes after this long with a final `turn_not_started` error frame
    # instead of pinging for ever. The frame has no id, so a client that reconnects (EventSource
    # does by itself unless the page closes it) simply waits again from the start.
    gateway_first_event_timeout_seconds: float = Field(300.0, gt=0)

    # Celery retries of retryable failures: exponential backoff with full jitter.
    max_retries: int = Field(4, ge=0)
    retry_backoff_base: float = Field(1.0, ge=0)
    retry_backoff_max: float = Field(30.0, ge=0)

    # Time limits and turn order. A turn attempt that passes its deadline is cancelled and ends
    # with an error; the broker's visibility timeout must stay above it, or Redis would hand a
    # turn that is still running to a second worker (checked below).
    turn_deadline_seconds: float = Field(600.0, gt=0)
    visibility_timeout_seconds: float = Field(900.0, gt=0)
    unacked_restore_interval_seconds: float = Field(30.0, gt=0)
    # A conversation's lease, renewed every quarter of it while its turn runs: how long it
    # outlives a dead worker, and so (with the takeover scan) how long a dead worker's turns
    # stay silent before another worker streams them on (worker/takeover.py, docs/faults.md).
    # The worker's alive key has the same TTL, renewed in the same round trip.
    conversation_lease_seconds: float = Field(3.0, gt=0)
    # How often every worker looks for workers whose alive key lapsed.
    takeover_scan_seconds: float = Field(0.5, gt=0)
    conversation_wait_retry_seconds: float = Field(0.5, gt=0)
    max_conversation_wait_seconds: float = Field(900.0, gt=0)
    supervisor_tick_seconds: float = Field(0.1, gt=0)

    # Observability: the Prometheus scrape port of a worker process (0: off) and how often a
    # running turn reports its progress (Flower's STREAMING state).
    metrics_port: int = Field(9808, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # 5 s: at a thousand turns a 1 s report was half the worker's CPU (docs/performance.md).
    progress_interval_seconds: float = Field(5.0, gt=0)

    # Worker process. A turn waits on the model nearly all its life, so one process runs many
    # at once on an I/O pool (threads; docs/performance.md compares gevent). The Redis, HTTP and
    # broker pools are sized from worker_concurrency.
    worker_concurrency: int = Field(1000, gt=0)
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

    @model_validator(mode="after")
    def _visibility_outlasts_a_turn(self) -> Settings:
        margin = self.retry_backoff_max + 1
        if self.visibility_timeout_seconds <= self.turn_deadline_seconds + margin:
            raise ValueError(
                f"AGENT_TURN_VISIBILITY_TIMEOUT_SECONDS ({self.visibility_timeout_seconds}) must "
                f"exceed AGENT_TURN_TURN_DEADLINE_SECONDS ({self.turn_deadline_seconds}) plus the "
                f"longest retry delay ({margin}), or running turns would be delivered twice"
            )
        return self

    def model_credentials_dict(self) -> dict[str, Any]:
        return json.loads(self.model_credentials.get_secret_value())

    def channel_for(self, message_id: str) -> str:
        """The pub/sub channel a turn's events go to: one per turn, named by its message id."""
        return f"{self.channel_prefix}{message_id}"

    # Readiness (worker/health.py): how long each dependency may take to answer the probe.
    health_timeout_seconds: float = Field(2.0, gt=0)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
