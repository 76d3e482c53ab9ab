"""The processes a benchmark starts: the stub backend, a Celery worker, and optionally a Redis.

Each runs as a child with its output in a log file of the run's temporary folder, is awaited
until it says it is ready, and is stopped by its own pid (SIGTERM, then SIGKILL), so a benchmark
never touches a process it did not start.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a Celery worker's warm shutdown), then SIGKILL if it does not exit."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def start_child(name: str, command: list[str], log_path: Path, ready: Callable[[str], bool],
                *, env: Mapping[str, str] | None = None, timeout: float = 60.0) -> Child:
    """Start ``command`` and return once ``ready(log text)`` holds; raise with the log if not."""
    child_env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, env=child_env, stdout=log_file,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    child = Child(name, process, log_path)
    deadline = time.monotonic() + timeout
    while not ready(child.log_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            child.stop()
            raise RuntimeError(f"{name} did not start (log {log_path}):\n{child.log_tail()}")
        time.sleep(0.05)
    return child


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_stub(folder: Path, *, answer_tokens: int, token_delay: float) -> tuple[Child, str]:
    """The stub backend on a port it picks itself; returns it and its URL.

    Without collector pauses: a measurement must not charge the stub's own stalls to a reader.
    """
    command = [sys.executable, "-m", "stub_backend", "--port", "0", "--no-gc-pauses",
               "--answer-tokens", str(answer_tokens), "--token-delay", str(token_delay)]
    child = start_child("stub backend", command, folder / "stub.log",
                        lambda log: "listening on http" in log)
    match = re.search(r"listening on (http://\S+)", child.log_text())
    assert match is not None
    return child, match.group(1)


def start_worker(folder: Path, *, name: str, pool: str, concurrency: int, queue: str,
                 env: Mapping[str, str]) -> Child:
    """A Celery turn worker as the Procfile starts one, on the benchmark's own queue."""
    command = [sys.executable, "-m", "celery", "-A", "worker.app", "worker",
               "--pool", pool, "--concurrency", str(concurrency), "--queues", queue,
               "--hostname", f"bench-{name}-{os.getpid()}@%h", "--loglevel", "INFO"]
    return start_child(f"{name} worker", command, folder / f"worker-{name}.log",
                       lambda log: " ready." in log, env=env)


def start_relay(folder: Path, *, name: str, stub_url: str, redis_url: str,
                channel_prefix: str, bodies: Path, stagger: float = 0.0) -> Child:
    """``bench.relay`` on the given runs; it starts relaying as soon as it is up."""
    command = [sys.executable, "-m", "bench.relay", "--stub", stub_url, "--redis-url", redis_url,
               "--channel-prefix", channel_prefix, "--bodies", str(bodies),
               "--stagger", str(stagger)]
    return start_child("relay", command, folder / f"relay-{name}.log",
                       lambda log: "relaying" in log)


def relay_cpu_seconds(log: str) -> float | None:
    """The CPU the relay reported spending, once it has exited."""
    match = re.search(r"cpu_seconds=([0-9.]+)", log)
    return float(match.group(1)) if match else None


def start_private_redis(folder: Path) -> tuple[Child, int]:
    """A Redis of our own, so ``INFO commandstats`` counts only this benchmark's commands."""
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("--private-redis needs redis-server on the PATH")
    port = free_port()
    command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(folder), "--maxclients", "10000"]
    child = start_child("redis", command, folder / "redis.log",
                        lambda log: "Ready to accept connections" in log)
    return child, port
