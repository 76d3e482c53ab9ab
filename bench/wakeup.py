"""What waking an idle process costs on this machine: the probe behind docs/performance.md.

Two processes play ping-pong over loopback TCP (one byte each way, ``TCP_NODELAY``), with a
pause between exchanges. Back to back, neither process ever sleeps; with a pause of a few
milliseconds both go idle before every message, as the worker, Redis and the stub do between
the events of a streaming load. The code per message is the same in every row, so what grows
with the pause is the price of waking: on a virtual machine, an idle vCPU is handed back to the
host, and the process comes back to cold caches.

    python -m bench.wakeup                    # the table
    python -m bench.wakeup --gaps-ms 0,1,10 --messages 500
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

DEFAULT_GAPS_MS = (0.0, 0.5, 2.0, 10.0)


@dataclass(frozen=True)
class WakeupRow:
    gap_ms: float
    messages: int
    round_trip_p50_us: float
    round_trip_p99_us: float
    client_cpu_us: float  # per message, this process
    echo_cpu_us: float  # per message, the echoing process


# The echoing process: says its port, echoes until the client closes, then says how much CPU
# the echoing took (connection set-up excluded).
_ECHO = """
import socket, sys, time
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
connection, _ = listener.accept()
connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
connection.sendall(connection.recv(64))
started = time.process_time()
while data := connection.recv(64):
    connection.sendall(data)
print(time.process_time() - started, flush=True)
"""


def measure(gap_ms: float, messages: int, *, timeout: float = 10.0) -> WakeupRow:
    """Ping-pong ``messages`` times with ``gap_ms`` between exchanges."""
    echo = subprocess.Popen([sys.executable, "-c", _ECHO], stdout=subprocess.PIPE, text=True)
    try:
        port = int(echo.stdout.readline())  # type: ignore[union-attr]
        client = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        gap = gap_ms / 1000.0
        round_trips: list[float] = []
        with client:
            client.sendall(b"w")  # connection set-up is not the measure
            client.recv(64)
            cpu_before = time.process_time()
            for _ in range(messages):
                if gap:
                    time.sleep(gap)
                started = time.perf_counter()
                client.sendall(b"x")
                if not client.recv(64):
                    raise RuntimeError("the echo process went away")
                round_trips.append(time.perf_counter() - started)
            client_cpu = time.process_time() - cpu_before
        echo_cpu = float(echo.stdout.readline())  # type: ignore[union-attr]
        echo.wait(timeout)
    finally:
        if echo.poll() is None:
            echo.kill()
            echo.wait()
    round_trips.sort()
    return WakeupRow(
        gap_ms=gap_ms,
        messages=messages,
        round_trip_p50_us=statistics.median(round_trips) * 1e6,
        round_trip_p99_us=round_trips[min(len(round_trips) - 1, int(len(round_trips) * 0.99))]
        * 1e6,
        client_cpu_us=client_cpu / messages * 1e6,
        echo_cpu_us=echo_cpu / messages * 1e6,
    )


def table(rows: list[WakeupRow]) -> str:
    lines = [
        "| pause between messages | messages | round trip p50 / p99, µs "
        "| CPU per message, client / echo, µs |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row.gap_ms:g} ms | {row.messages:,} | {row.round_trip_p50_us:.0f} / "
            f"{row.round_trip_p99_us:.0f} | {row.client_cpu_us:.0f} / {row.echo_cpu_us:.0f} |"
        )
    return "\n".join(lines)


def _messages_for(gap_ms: float, budget_seconds: float, most: int) -> int:
    return min(most, max(50, int(budget_seconds * 1000 / max(gap_ms, 0.05))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wakeup", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--gaps-ms", default=",".join(f"{g:g}" for g in DEFAULT_GAPS_MS),
                        help="comma-separated pauses between messages, in ms")
    parser.add_argument("--messages", type=int, default=2000,
                        help="messages per pause at most (long pauses get fewer: ~3 s each)")
    args = parser.parse_args(argv)
    gaps = [float(gap) for gap in args.gaps_ms.split(",") if gap.strip()]
    if not gaps or any(gap < 0 for gap in gaps):
        parser.error("--gaps-ms takes non-negative numbers")
    rows = [measure(gap, _messages_for(gap, 3.0, args.messages)) for gap in gaps]
    print(table(rows))
    print(f"\n{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
