"""Shared fixtures: real Redis, real databases, the stub backend on a socket, a real worker.

Isolation: tests use Redis databases 10-12 (the pub/sub one flushed per test), a Celery queue of
their own, a fresh SQLite file or PostgreSQL schema per worker, so a developer's running stack is
left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from sqlalchemy import create_engine, text

from config.settings import Settings
from stub_backend import StubServer, StubSettings
from worker.publisher import EventBus
from worker.store import SessionStore, make_engine

ROOT = Path(__file__).resolve().parent.parent
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TEST_QUEUE = f"agent_turns_test_{uuid.uuid4().hex[:8]}"
# Four Redis databases (broker, results, pub/sub, and the takeover tests' own pub/sub, so that
# the suite's other workers do not take part in their takeovers) from this one on; two test runs
# at once on one Redis (two checkouts, say) need values of AGENT_TURN_TEST_REDIS_DB 4 apart.
BROKER_DB = int(os.environ.get("AGENT_TURN_TEST_REDIS_DB", "10"))
RESULT_DB, PUBSUB_DB, TAKEOVER_PUBSUB_DB = BROKER_DB + 1, BROKER_DB + 2, BROKER_DB + 3
WAIT_SECONDS = 20.0
# The pool the tests' workers run: the Procfile's by default; AGENT_TURN_TEST_POOL=threads runs
# the suite on the other I/O pool the worker supports.
WORKER_POOL = os.environ.get("AGENT_TURN_TEST_POOL", "gevent")


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _ensure_service(name: str, port: int) -> None:
    if _port_open(port):
        return
    result = subprocess.run([str(ROOT / "scripts" / "ensure-services"), name],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0 or not _port_open(port):
        pytest.exit(f"{name} is not reachable on 127.0.0.1:{port} and could not be started:\n"
                    f"{result.stderr.strip()}\nStart it (see scripts/ensure-services) and rerun.",
                    returncode=3)


@pytest.fixture(scope="session", autouse=True)
def _services_up() -> None:
    _ensure_service("redis", REDIS_PORT)
    _ensure_service("postgres", 5432)


def base_settings(**overrides: Any) -> Settings:
    """Settings for tests: isolated Redis databases and queue, quick retries and time-outs."""
    values: dict[str, Any] = {
        "broker_url": f"redis://{REDIS_HOST}:{REDIS_PORT}/{BROKER_DB}",
        "result_backend": f"redis://{REDIS_HOST}:{REDIS_PORT}/{RESULT_DB}",
        "pubsub_url": f"redis://{REDIS_HOST}:{REDIS_PORT}/{PUBSUB_DB}",
        "queue": TEST_QUEUE,
        "backend_read_timeout": 2.0,
        "backend_connect_timeout": 2.0,
        "stream_max_reconnects": 2,
        "stream_reconnect_delay": 0.05,
        "coalesce_window_ms": 20.0,
        "max_retries": 2,
        "retry_backoff_base": 0.05,
        "retry_backoff_max": 0.2,
        "worker_concurrency": 8,
        "max_frame_bytes": 64 * 1024,
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as AGENT_TURN_* variables, for a worker in another process."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, list):
            value = ",".join(value)
        env[f"AGENT_TURN_{name.upper()}"] = str(value)
    return env


@pytest.fixture
def settings() -> Settings:
    return base_settings()


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=PUBSUB_DB, socket_timeout=5)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def event_bus(redis_client: redis.Redis, settings: Settings) -> EventBus:
    return EventBus(redis_client, channel_for=settings.channel_for,
                    coalesce_window_ms=settings.coalesce_window_ms,
                    coalesce_max_chars=settings.coalesce_max_chars)


# Databases ---------------------------------------------------------------------------------


def sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'turns.sqlite3'}"


def new_postgres_schema() -> tuple[str, Callable[[], None]]:
    """A PostgreSQL URL confined to a new schema, and how to drop it."""
    schema = f"turns_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()

    return f"{POSTGRES_ADMIN_URL}?options=-csearch_path%3D{schema}", drop


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
        return
    url, drop = new_postgres_schema()
    yield url
    drop()


@pytest.fixture
def store(database_url: str) -> Iterator[SessionStore]:
    engine = make_engine(database_url, pool_size=4)
    session_store = SessionStore(engine)
    session_store.create_schema()
    yield session_store
    engine.dispose()


# The stub backend --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def stub_server() -> Iterator[StubServer]:
    server = StubServer(StubSettings(token_delay=0.002, keepalive_interval=0.5))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def stub(stub_server: StubServer) -> StubControl:
    control = StubControl(stub_server.url)
    control.reset()
    return control


@dataclass
class StubControl:
    """The stub's test control API, as the tests use it."""

    url: str

    def reset(self) -> None:
        requests.delete(f"{self.url}/_stub/state", timeout=5).raise_for_status()

    def plan(self, message_id: str, **plan: Any) -> None:
        """Register faults or overrides for one message (see stub_backend)."""
        requests.post(f"{self.url}/_stub/messages/{message_id}", json=plan,
                      timeout=5).raise_for_status()

    def runs(self, message_id: str | None = None) -> list[dict[str, Any]]:
        params = {"message_id": message_id} if message_id else {}
        answer = requests.get(f"{self.url}/_stub/runs", params=params, timeout=5)
        answer.raise_for_status()
        return answer.json()["runs"]

    def create_calls(self, message_id: str) -> int:
        answer = requests.get(f"{self.url}/_stub/messages/{message_id}", timeout=5)
        answer.raise_for_status()
        return answer.json()["create_calls"]


# Turns and their events --------------------------------------------------------------------


def make_turn(**overrides: Any) -> dict[str, Any]:
    turn: dict[str, Any] = {
        "tenant_id": "tenant-1",
        "app_id": "app-1",
        "user_id": "user-1",
        "conversation_id": f"conv-{uuid.uuid4().hex[:12]}",
        "message_id": f"msg-{uuid.uuid4().hex[:12]}",
        "query": "hi",
    }
    turn.update(overrides)
    return turn


def owner_ids(turn: dict[str, Any]) -> dict[str, str]:
    """The (tenant, app, user) of a turn, as keyword arguments of the producer helpers."""
    return {name: turn[name] for name in ("tenant_id", "app_id", "user_id")}


@dataclass
class TurnListener:
    """A subscriber to one turn's channel, subscribed before the turn is enqueued."""

    pubsub: Any
    events: list[dict[str, Any]] = field(default_factory=list)

    def wait_for_end(self, timeout: float = WAIT_SECONDS) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is None:
                continue
            event = json.loads(message["data"])
            self.events.append(event)
            if event["event"] in ("message_end", "error"):
                self.drain_quietly(0.3)
                return self.events
        raise AssertionError(f"no message_end or error within {timeout}s; got {self.events}")

    def wait_for(self, *kinds: str, timeout: float = WAIT_SECONDS) -> dict[str, Any]:
        """Collect events until one of these kinds (or an end) arrives; return that event."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is None:
                continue
            self.events.append(json.loads(message["data"]))
            if self.events[-1]["event"] in (*kinds, "message_end", "error"):
                return self.events[-1]
        raise AssertionError(f"no {kinds} within {timeout}s; got {self.events}")

    def drain_quietly(self, seconds: float) -> None:
        """Collect anything published shortly after the end (there should be nothing)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.pubsub.get_message(ignore_subscribe_messages=True,
                                              timeout=remaining)
            if message is not None:
                self.events.append(json.loads(message["data"]))


@pytest.fixture
def listen(
    redis_client: redis.Redis, settings: Settings
) -> Iterator[Callable[[str], TurnListener]]:
    opened: list[Any] = []

    def subscribe(message_id: str) -> TurnListener:
        pubsub = redis_client.pubsub()
        pubsub.subscribe(settings.channel_for(message_id))
        pubsub.get_message(timeout=2)
        opened.append(pubsub)
        return TurnListener(pubsub)

    yield subscribe
    for pubsub in opened:
        pubsub.close()


def answer_of(events: list[dict[str, Any]]) -> str:
    """The text a Dify client shows after these events: deltas appended, replace resets."""
    text = ""
    for event in events:
        if event["event"] == "agent_message":
            text += event["answer"]
        elif event["event"] == "message_replace":
            text = event["answer"]
    return text


def wait_until(condition: Callable[[], bool], timeout: float = 10.0,
               interval: float = 0.02) -> None:
    """Poll a condition that no event announces (a row, a stub's run state), bounded in time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def submit_and_wait(turn: dict[str, Any], listen: Any, producer_app: Any,
                    worker: RunningWorker, timeout: float = WAIT_SECONDS) -> list[dict[str, Any]]:
    """Subscribe, enqueue through the producer helper, and collect the turn's events."""
    from worker.client import submit_turn

    listener = listen(turn["message_id"])
    submit_turn(turn, celery_app=producer_app, settings=worker.settings)
    return listener.wait_for_end(timeout)


def send_raw_and_wait(kwargs: dict[str, Any], message_id: str | None, listen: Any,
                      producer_app: Any, worker: RunningWorker) -> tuple[Any, list[dict]]:
    """Enqueue without the helper's validation, as a careless web tier would."""
    from config.celery import TURN_TASK_NAME

    listener = listen(message_id) if message_id else None
    result = producer_app.send_task(TURN_TASK_NAME, kwargs=kwargs, queue=worker.settings.queue)
    events = listener.wait_for_end() if listener else []
    return result, events


def assert_single_end(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Exactly one end event, of this kind, last, with seq 1, 2, 3 … before it."""
    ends = [event for event in events if event["event"] in ("message_end", "error")]
    assert [event["event"] for event in ends] == [kind], events
    assert events[-1] is ends[0], "nothing may follow the end of a turn"
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    return ends[0]


def assert_nothing_saved(worker: RunningWorker, turn: dict[str, Any]) -> None:
    assert worker.store.get_snapshot(turn["conversation_id"]) is None
    message = worker.store.get_message(turn["message_id"])
    assert message is not None and message.status == "failed"
    assert message.answer is None


def final_state(result: Any, timeout: float = 20.0) -> str:
    async_result = result
    try:
        async_result.get(timeout=timeout, propagate=False)
    except Exception as exc:  # the wait itself timed out
        raise AssertionError(f"task {result.id} did not finish: {exc}") from exc
    return async_result.state



# A real Celery worker ----------------------------------------------------------------------


@dataclass
class RunningWorker:
    process: subprocess.Popen[bytes]
    settings: Settings
    log_path: Path
    store: SessionStore

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_worker(settings: Settings, log_path: Path, hostname: str,
                 *extra_args: str, pool: str = WORKER_POOL) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "celery", "-A", "worker.app", "worker",
               "--pool", pool, "--concurrency", str(settings.worker_concurrency),
               "--queues", settings.queue, "--hostname", hostname, "--loglevel", "INFO",
               "--without-mingle", "--without-gossip", *extra_args]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        if b"ready." in log_path.read_bytes():
            return process
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"worker not ready within 30s:\n{log_path.read_text()[-3000:]}")


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def celery_worker(request: pytest.FixtureRequest, stub_server: StubServer,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningWorker]:
    """A real worker process per database, consuming the tests' own queue."""
    directory = tmp_path_factory.mktemp(f"worker-{request.param}")
    drop: Callable[[], None] | None = None
    if request.param == "sqlite":
        url = sqlite_url(directory)
    else:
        url, drop = new_postgres_schema()
    settings = base_settings(database_url=url, backend_url=stub_server.url)
    purge = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BROKER_DB)
    purge.delete(settings.queue)
    purge.close()
    log_path = directory / "worker.log"
    process = start_worker(settings, log_path, f"test-{request.param}-{uuid.uuid4().hex[:6]}@%h")
    engine = make_engine(url, pool_size=2)
    yield RunningWorker(process, settings, log_path, SessionStore(engine))
    stop_worker(process)
    engine.dispose()
    if drop is not None:
        drop()


@pytest.fixture(scope="session")
def producer_app() -> Any:
    """A Celery app as a web tier would hold one: it knows the broker, not the worker code."""
    from celery import Celery

    from config.celery import celery_config

    app = Celery("test-producer")
    app.config_from_object(celery_config(base_settings()))
    return app


# The SSE gateway ---------------------------------------------------------------------------

GATEWAY_TEST_SECRET = f"test-gateway-secret-{uuid.uuid4().hex}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class SSEFrame:
    """One Server-Sent Events frame as a client parses it."""

    event: str | None
    id: str | None
    data: str

    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.data)
        return parsed


class SSEParser:
    """Frames from the lines of a ``text/event-stream`` body, read as the SSE spec reads them."""

    def __init__(self) -> None:
        self._event: str | None = None
        self._id: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> SSEFrame | None:
        """Take one line (without its line break); return the frame a blank line completes."""
        if line == "":
            frame = None
            if self._data or self._event is not None:
                frame = SSEFrame(self._event, self._id, "\n".join(self._data))
            self._event, self._id, self._data = None, None, []
            return frame
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None


@dataclass
class RunningGateway:
    process: subprocess.Popen[bytes]
    settings: Settings
    url: str
    log_path: Path

    def events_url(self, message_id: str) -> str:
        return f"{self.url}/v1/turns/{message_id}/events"

    def token(self, message_id: str, user_id: str = "user-1", tenant_id: str = "tenant-1",
              app_id: str = "app-1") -> str:
        """A stream token as the producer mints it; the defaults are ``make_turn``'s owner."""
        from worker.client import stream_token_for

        return stream_token_for(message_id, user_id, self.settings, tenant_id=tenant_id,
                                app_id=app_id)

    def health(self) -> dict[str, Any]:
        answer = requests.get(f"{self.url}/healthz", timeout=5)
        health: dict[str, Any] = answer.json()
        return health

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def gateway_settings(**overrides: Any) -> Settings:
    """The tests' settings plus a gateway: a secret of its own, quick pings, small buffers."""
    values: dict[str, Any] = {
        "gateway_secret": GATEWAY_TEST_SECRET,
        "gateway_port": free_port(),
        "gateway_ping_interval_seconds": 0.5,
        "gateway_client_buffer_events": 64,
        "gateway_send_timeout_seconds": 2.0,
        "gateway_redis_health_check_seconds": 1.0,
        # Long enough for a real worker to start a turn that clients opened before it was
        # enqueued; short enough that the test of a turn that never starts is quick.
        "gateway_first_event_timeout_seconds": 3.0,
    }
    values.update(overrides)
    return base_settings(**values)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """A real gateway process on a socket, reading the tests' pub/sub database."""
    running = start_gateway(gateway_settings(), tmp_path_factory.mktemp("gateway"))
    yield running
    stop_worker(running.process)


def start_gateway(settings: Settings, folder: Path) -> RunningGateway:
    """``python -m gateway`` with these settings, once it reports Redis connected."""
    log_path = folder / "gateway.log"
    env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    running = RunningGateway(process, settings,
                             f"http://127.0.0.1:{settings.gateway_port}", log_path)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n"
                               f"{running.log_tail()}")
        try:
            if running.health()["redis_connected"]:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"gateway not ready within 30s:\n{running.log_tail()}")
        time.sleep(0.1)
    return running


# A TCP proxy that can cut a service off for a moment --------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a service; ``cut`` makes the service unreachable for a while,
    ``reply_delay`` (seconds) makes each of its replies late.

    While cut, open connections are closed and new ones are accepted and closed at once, so
    clients see the resets and refusals a blinking network gives, not a hang.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._guard = threading.Lock()
        self._cut_until = 0.0
        self._closed = False
        self._lose_reply = threading.Event()
        self.reply_delay = 0.0
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_next_reply(self) -> None:
        """The service's next reply is dropped and its connection closed: the request ran, but
        the client cannot know, as when a server restarts between executing and answering."""
        self._lose_reply.set()

    def cut(self, seconds: float) -> None:
        with self._guard:
            self._cut_until = time.monotonic() + seconds
            doomed, self._open = self._open, set()
        for sock in doomed:
            _close_quietly(sock)

    def close(self) -> None:
        self._closed = True
        self.cut(0)
        _close_quietly(self._listener)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self._cut_until:
                _close_quietly(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close_quietly(client)
                continue
            with self._guard:
                self._open.update((client, upstream))
            for source, target, replies in ((client, upstream, False),
                                            (upstream, client, True)):
                threading.Thread(target=self._pump, args=(source, target, replies),
                                 daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, replies: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if replies and self._lose_reply.is_set():
                    self._lose_reply.clear()
                    break
                if replies and self.reply_delay:
                    time.sleep(self.reply_delay)  # a slow service, not a wait on the test
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            _close_quietly(source)
            _close_quietly(target)


def retrying_redis_through(proxy: TcpProxy) -> redis.Redis:
    """A client of the tests' pub/sub Redis through ``proxy`` that, as the worker's does, sends
    a command again when its connection breaks."""
    return redis.Redis(host=REDIS_HOST, port=proxy.port, db=PUBSUB_DB, socket_timeout=5,
                       retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries=3),
                       retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
