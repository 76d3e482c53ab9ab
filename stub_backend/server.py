"""Run the stub on a real socket, in a background thread or as the main program.

Tests and benchmarks need the stub reachable over TCP from another process (the worker), so an
in-process ASGI transport is not enough; binding the socket ourselves lets port 0 work and gives
the real port before the server thread even starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from stub_backend.app import create_app
from stub_backend.runs import StubState
from stub_backend.settings import StubSettings

__all__ = ["StubServer", "bind_socket", "build_uvicorn_server"]

GRACEFUL_SHUTDOWN_SECONDS = 2


class _StubUvicornServer(uvicorn.Server):
    """A uvicorn server that tells the stub to drain before uvicorn waits for connections.

    Without this, open SSE streams (which follow a run for as long as it lives) would keep
    uvicorn's graceful shutdown waiting until its time-out.
    """

    def __init__(self, config: uvicorn.Config, state: StubState) -> None:
        super().__init__(config)
        self.stub_state = state

    def begin_shutdown(self) -> None:
        """Make the stub answer 503 and end its streams; thread-safe, idempotent."""
        loop = self.stub_state.loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in the meantime
            loop.call_soon_threadsafe(self.stub_state.begin_shutdown)

    def request_exit(self) -> None:
        self.begin_shutdown()
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.begin_shutdown()
        super().handle_exit(sig, frame)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind (but do not listen on) a TCP socket; port 0 picks a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio only turns Nagle's algorithm off for sockets that name TCP,
    # and with it on every reused keep-alive connection stalls ~40 ms per small write.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def build_uvicorn_server(app: Starlette) -> _StubUvicornServer:
    """A quiet uvicorn server for the stub app (warnings only, no access log)."""
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        timeout_keep_alive=30,
    )
    state: StubState = app.state.stub
    return _StubUvicornServer(config, state)


class StubServer:
    """The stub served by uvicorn in a background thread on ``host`` (default 127.0.0.1).

    Use as a context manager, or call :meth:`start` / :meth:`stop`. ``url`` is valid once the
    socket is bound (inside ``start``). ``app_state`` gives same-process tests direct access to
    the runs; the HTTP control API under ``/_stub/`` is the main interface.
    """

    def __init__(
        self,
        settings: StubSettings | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        startup_timeout: float = 10.0,
        shutdown_timeout: float = 10.0,
    ) -> None:
        self.settings = settings or StubSettings()
        self.host = host
        self.requested_port = port
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        self.app = create_app(self.settings)
        self._server: _StubUvicornServer | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._port: int | None = None
        self._failure: BaseException | None = None

    @property
    def app_state(self) -> StubState:
        state: StubState = self.app.state.stub
        return state

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("StubServer is not started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> StubServer:
        """Start serving and return once the port accepts connections (or raise)."""
        if self._thread is not None:
            raise RuntimeError("StubServer already started")
        self._socket = bind_socket(self.host, self.requested_port)
        self._port = self._socket.getsockname()[1]
        self._server = build_uvicorn_server(self.app)
        self._thread = threading.Thread(
            target=self._serve, name=f"stub-backend-{self._port}", daemon=True
        )
        self._thread.start()
        try:
            self._wait_until_accepting()
        except BaseException:
            self.stop()
            raise
        return self

    def _serve(self) -> None:
        assert self._server is not None and self._socket is not None
        try:
            asyncio.run(self._server.serve(sockets=[self._socket]))
        except BaseException as exc:  # SystemExit included: uvicorn exits on bind errors
            self._failure = exc

    def _wait_until_accepting(self) -> None:
        assert self._server is not None and self._thread is not None
        deadline = time.monotonic() + self.startup_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(
                    f"stub server thread exited during start-up: {self._failure!r}"
                ) from self._failure
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"stub server did not start within {self.startup_timeout}s on {self.url}"
                )
            time.sleep(0.01)
        remaining = max(0.1, deadline - time.monotonic())
        with socket.create_connection((self.host, self.port), timeout=remaining):
            pass

    def begin_shutdown(self) -> None:
        """Drain without closing the listener: creates answer 503, open streams end.

        Useful to test how a client handles a backend that is going away.
        """
        if self._server is not None:
            self._server.begin_shutdown()

    def stop(self) -> None:
        """Stop serving; bounded by ``shutdown_timeout`` (then forced), raises if stuck."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.request_exit()
        thread.join(self.shutdown_timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5.0)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
        if thread.is_alive():
            raise TimeoutError(f"stub server on port {self._port} did not stop in time")

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
