"""A deterministic stub of the dify-agent run API, for tests, demos and benchmarks.

See :mod:`stub_backend.app` for the behaviour and the ``/_stub/`` control API.
"""

from stub_backend.app import StubSettings, create_app
from stub_backend.server import StubServer

__all__ = ["StubServer", "StubSettings", "create_app"]
