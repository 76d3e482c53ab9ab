"""A deterministic stub of the dify-agent run API, for tests, demos and benchmarks.

See :mod:`stub_backend.app` for the run and ``/_stub/`` control APIs, and
:mod:`stub_backend.process` for what a run says: the answer, thinking, tool rounds and
questions to the user, event by event.
"""

from stub_backend.app import create_app
from stub_backend.server import StubServer
from stub_backend.settings import StubSettings

__all__ = ["StubServer", "StubSettings", "create_app"]
