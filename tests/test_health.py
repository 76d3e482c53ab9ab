"""The readiness check against the real services, and against ones that are down or hung."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings
from stub_backend import StubServer
from tests.conftest import POSTGRES_ADMIN_URL, ROOT, base_settings, free_port, settings_env
from tests.test_rabbitmq import RABBITMQ_URL, ensure_rabbitmq
from worker.health import GRACE_SECONDS, readiness, redact

TIMEOUT = 0.5
# A check answers within its time-out plus the grace; allow the test machine a little more.
BOUND = TIMEOUT + GRACE_SECONDS + 0.5


@pytest.fixture
def ready_settings(stub_server: StubServer) -> Settings:
    return base_settings(database_url=POSTGRES_ADMIN_URL, backend_url=stub_server.url)


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts connections and never says a word: a hung dependency."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    yield listener.getsockname()[1]
    listener.close()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_everything_up_is_ready(broker: str, ready_settings: Settings) -> None:
    if broker == "rabbitmq":
        ensure_rabbitmq()
        ready_settings = ready_settings.model_copy(update={"broker_url": RABBITMQ_URL})
    result = readiness(ready_settings, timeout=2.0)
    assert result.ready, result.as_dict()
    assert result.failing == []
    assert set(result.as_dict()["checks"]) == {"broker", "bus", "database", "backend"}


def test_a_sqlite_database_that_exists_is_ready(ready_settings: Settings, tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "turns.sqlite3"
    sqlite3.connect(path).close()
    settings = ready_settings.model_copy(update={"database_url": f"sqlite:///{path}"})
    assert readiness(settings, timeout=2.0).ready


def _down(port: int) -> dict[str, dict[str, Any]]:
    return {
        "broker": {"broker_url": f"redis://127.0.0.1:{port}/0"},
        "broker-rabbitmq": {"broker_url": f"amqp://guest:guest@127.0.0.1:{port}//"},
        "bus": {"pubsub_url": f"redis://127.0.0.1:{port}/0"},
        "database": {"database_url": f"postgresql+psycopg://postgres@127.0.0.1:{port}/test"},
        "backend": {"backend_url": f"http://127.0.0.1:{port}"},
    }


@pytest.mark.parametrize("case", list(_down(0)))
def test_a_dependency_refusing_connections_is_named(case: str, ready_settings: Settings) -> None:
    settings = ready_settings.model_copy(update=_down(free_port())[case])
    started = time.monotonic()
    result = readiness(settings, timeout=TIMEOUT)
    assert time.monotonic() - started < BOUND
    assert not result.ready
    assert result.failing == [case.split("-")[0]], result.as_dict()
    assert result.as_dict()["checks"][case.split("-")[0]]["error"]


@pytest.mark.parametrize("case", list(_down(0)))
def test_a_dependency_that_never_answers_fails_within_the_time_out(
    case: str, ready_settings: Settings, black_hole: int
) -> None:
    settings = ready_settings.model_copy(update=_down(black_hole)[case])
    started = time.monotonic()
    result = readiness(settings, timeout=TIMEOUT)
    assert time.monotonic() - started < BOUND
    assert result.failing == [case.split("-")[0]], result.as_dict()


def test_a_missing_sqlite_file_is_not_ready_and_is_not_created(ready_settings: Settings,
                                                               tmp_path: Path) -> None:
    path = tmp_path / "missing.sqlite3"
    settings = ready_settings.model_copy(update={"database_url": f"sqlite:///{path}"})
    result = readiness(settings, timeout=TIMEOUT)
    assert result.failing == ["database"]
    assert not path.exists(), "a probe must not create the database"


def _run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "worker.health", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)


def test_the_probe_command_exits_0_when_ready_and_1_naming_what_is_down(
    ready_settings: Settings
) -> None:
    ready = _run_cli(ready_settings, "--timeout", "2")
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert json.loads(ready.stdout)["ready"] is True

    password = "probe-password-not-to-print"
    down = ready_settings.model_copy(update={
        "backend_url": f"http://127.0.0.1:{free_port()}",
        "broker_url": f"amqp://guest:{password}@127.0.0.1:{free_port()}//",
    })
    not_ready = _run_cli(down, "--timeout", str(TIMEOUT))
    assert not_ready.returncode == 1
    shown = json.loads(not_ready.stdout)
    assert shown["ready"] is False and shown["failing"] == ["broker", "backend"]
    assert password not in not_ready.stdout + not_ready.stderr
    assert shown["checks"]["broker"]["target"].startswith("amqp://guest:***@127.0.0.1:")


def test_redact_masks_passwords_in_urls() -> None:
    assert redact("postgresql+psycopg://app:s3cret@db/app and redis://:pw@r:6379/0") == \
        "postgresql+psycopg://app:***@db/app and redis://:***@r:6379/0"
    assert redact("http://127.0.0.1:8790") == "http://127.0.0.1:8790"
