"""Reading the cost of a phase off the processes and the Redis server while it runs.

``ProcessProbe`` sums a process tree (a prefork worker is a parent and its children), so every
reader is charged for all the processes it needs. ``Monitor`` samples the probes on a thread, for
the peaks a before/after pair would miss (RSS, threads, open files, the subscriber's backlog).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import psutil
import redis


@dataclass(frozen=True)
class ProcessSample:
    cpu_seconds: float
    rss_bytes: int
    threads: int
    open_files: int


class ProcessProbe:
    """CPU time, RSS, threads and file descriptors of processes and their descendants, summed."""

    def __init__(self, *pids: int) -> None:
        self.roots = [psutil.Process(pid) for pid in pids]

    def sample(self) -> ProcessSample:
        cpu = 0.0
        rss = threads = fds = 0
        processes = []
        for root in self.roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                processes += [root, *root.children(recursive=True)]
        if not processes:
            return ProcessSample(0.0, 0, 0, 0)
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied), \
                    process.oneshot():
                times = process.cpu_times()
                cpu += times.user + times.system
                rss += process.memory_info().rss
                threads += process.num_threads()
                fds += process.num_fds()
        return ProcessSample(cpu, rss, threads, fds)


def command_stats(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started (commands run by Lua scripts included)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(values["calls"]) for name, values in stats.items()}


def server_cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def subscriber_backlog(client: redis.Redis, name_prefix: str) -> int:
    """Bytes Redis holds for our subscriber connections: non-zero means they fall behind."""
    backlog = 0
    for entry in client.client_list(_type="pubsub"):
        if str(entry.get("name", "")).startswith(name_prefix):
            backlog += int(entry.get("obl", 0)) + int(entry.get("omem", 0))
    return backlog


@dataclass
class Peaks:
    rss_bytes: int = 0
    threads: int = 0
    open_files: int = 0
    subscriber_backlog: int = 0


class Monitor:
    """Samples a process tree (and optionally the subscriber backlog) until stopped."""

    def __init__(self, probe: ProcessProbe | None, *, interval: float = 0.05,
                 redis_client: redis.Redis | None = None, subscriber_prefix: str = "") -> None:
        self._probe = probe
        self._interval = interval
        self._redis = redis_client
        self._prefix = subscriber_prefix
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        next_backlog = 0.0
        while not self._stop.is_set():
            if self._probe is not None:
                sample = self._probe.sample()
                peaks = self.peaks
                peaks.rss_bytes = max(peaks.rss_bytes, sample.rss_bytes)
                peaks.threads = max(peaks.threads, sample.threads)
                peaks.open_files = max(peaks.open_files, sample.open_files)
            now = time.monotonic()
            if self._redis is not None and now >= next_backlog:
                next_backlog = now + 0.25
                with contextlib.suppress(redis.RedisError):
                    self.peaks.subscriber_backlog = max(
                        self.peaks.subscriber_backlog,
                        subscriber_backlog(self._redis, self._prefix))
            self._stop.wait(self._interval)
