"""Readiness: can a worker with these settings run turns right now?

Four checks, run at once, each bounded by ``AGENT_TURN_HEALTH_TIMEOUT_SECONDS``:

- ``broker``: a connection to ``AGENT_TURN_BROKER_URL`` (Redis or RabbitMQ), logged in;
- ``bus``: ``PING`` on the pub/sub Redis of ``AGENT_TURN_PUBSUB_URL``;
- ``database``: ``SELECT 1`` on ``AGENT_TURN_DATABASE_URL`` (a SQLite file is opened read-only,
  so a probe never creates one);
- ``backend``: an HTTP request to ``AGENT_TURN_BACKEND_URL`` gets an answer, whatever its status.

``python -m worker.health`` prints the result as JSON and exits 0 when every check passed, 1
otherwise: an orchestrator's readiness probe (docs/operations.md). The result names the targets
with any password masked, and errors are shortened; nothing secret is printed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import requests
from kombu import Connection
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from config.settings import Settings, get_settings

# A check still running this long after its own time-out is reported as hung.
GRACE_SECONDS = 0.5
MAX_ERROR_CHARS = 300
_PASSWORD_IN_URL = re.compile(r"(\w[\w+.-]*://[^:/@\s]*:)[^@\s]*@")


@dataclass(frozen=True)
class CheckResult:
    name: str
    target: str
    ok: bool
    seconds: float
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"ok": self.ok, "target": self.target,
                                 "ms": round(self.seconds * 1000, 1)}
        if self.error is not None:
            shown["error"] = self.error
        return shown


@dataclass(frozen=True)
class Readiness:
    checks: tuple[CheckResult, ...]

    @property
    def ready(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failing(self) -> list[str]:
        return [check.name for check in self.checks if not check.ok]

    def as_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, "failing": self.failing,
                "checks": {check.name: check.as_dict() for check in self.checks}}


def check_broker(settings: Settings, timeout: float) -> None:
    with Connection(settings.broker_url, connect_timeout=timeout,
                    transport_options={"socket_timeout": timeout}) as connection:
        connection.ensure_connection(max_retries=0)


def check_bus(settings: Settings, timeout: float) -> None:
    client = redis.Redis.from_url(settings.pubsub_url, socket_connect_timeout=timeout,
                                  socket_timeout=timeout)
    try:
        client.ping()
    finally:
        client.close()


def check_database(settings: Settings, timeout: float) -> None:
    url = _probe_url(make_url(settings.database_url))
    backend = url.get_backend_name()
    if backend == "sqlite":
        connect_args: dict[str, Any] = {"timeout": timeout}
    else:  # PostgreSQL, MySQL: whole seconds, and libpq waits at least 2
        connect_args = {"connect_timeout": max(1, round(timeout))}
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1")).scalar_one()
    finally:
        engine.dispose()


def check_backend(settings: Settings, timeout: float) -> None:
    # Any HTTP answer, 404 or 401 included, shows the backend is up and reachable.
    response = requests.get(settings.backend_url, timeout=(timeout, timeout), stream=True,
                            allow_redirects=False)
    response.close()


CHECKS: dict[str, tuple[Callable[[Settings, float], None], Callable[[Settings], str]]] = {
    "broker": (check_broker, lambda settings: settings.broker_url),
    "bus": (check_bus, lambda settings: settings.pubsub_url),
    "database": (check_database, lambda settings: settings.database_url),
    "backend": (check_backend, lambda settings: settings.backend_url),
}


def readiness(settings: Settings | None = None, *, timeout: float | None = None) -> Readiness:
    """Run every check at once; returns within ``timeout`` plus a short grace, whatever hangs.

    Each check runs on a daemon thread, so a dependency that never answers costs a thread until
    its own time-out fires, never the caller's time or a process's exit.
    """
    settings = settings or get_settings()
    timeout = settings.health_timeout_seconds if timeout is None else timeout
    results: dict[str, CheckResult] = {}
    threads = []
    for name, (check, target_of) in CHECKS.items():
        target = redact(target_of(settings))
        thread = threading.Thread(target=_run_check, name=f"health-{name}", daemon=True,
                                  args=(name, target, check, settings, timeout, results))
        thread.start()
        threads.append((name, target, thread))
    deadline = time.monotonic() + timeout + GRACE_SECONDS
    for _, _, thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    checks = []
    for name, target, _ in threads:
        found = results.get(name)
        if found is None:
            found = CheckResult(name, target, ok=False, seconds=timeout + GRACE_SECONDS,
                                error=f"no answer within {timeout:g}s")
        checks.append(found)
    return Readiness(tuple(checks))


def _run_check(name: str, target: str, check: Callable[[Settings, float], None],
               settings: Settings, timeout: float, results: dict[str, CheckResult]) -> None:
    started = time.monotonic()
    try:
        check(settings, timeout)
    except Exception as exc:
        error = redact(f"{type(exc).__name__}: {exc}".splitlines()[0])
        results[name] = CheckResult(name, target, ok=False,
                                    seconds=time.monotonic() - started,
                                    error=error[:MAX_ERROR_CHARS])
    else:
        results[name] = CheckResult(name, target, ok=True, seconds=time.monotonic() - started)


def redact(text: str) -> str:
    """``scheme://user:secret@host`` becomes ``scheme://user:***@host``."""
    return _PASSWORD_IN_URL.sub(r"\1***@", text)


def _probe_url(url: URL) -> URL:
    """A SQLite file opened read-only, so probing a missing file fails instead of creating it."""
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:" \
            or database.startswith("file:"):
        return url
    return url.set(database=f"file:{database}",
                   query={**url.query, "mode": "ro", "uri": "true"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.health",
        description="Check the broker, the Redis bus, the database and the agent backend; "
                    "print JSON; exit 0 when all are reachable, 1 otherwise.")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per check (default AGENT_TURN_HEALTH_TIMEOUT_SECONDS)")
    arguments = parser.parse_args(argv)
    if arguments.timeout is not None and arguments.timeout <= 0:
        parser.error("--timeout must be positive")
    result = readiness(timeout=arguments.timeout)
    print(json.dumps(result.as_dict(), sort_keys=True))
    return 0 if result.ready else 1


if __name__ == "__main__":
    sys.exit(main())
