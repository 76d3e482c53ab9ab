"""The SSE gateway: streams a turn's events to browsers and apps, losslessly, behind a token.

``python -m gateway`` serves it (docs/gateway.md). The modules, each one concern:

- ``tokens`` — signing and checking stream tokens (standard library only; the producer uses it);
- ``sse`` — Server-Sent Events framing, keepalive pings and the streaming response;
- ``relay`` — the shared pub/sub connection and the replay-then-live relay of one turn;
- ``app`` — the Starlette app that wires them to routes.
"""
