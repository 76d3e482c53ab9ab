"""The agent-turn worker: runs Dify-style chat turns against a dify-agent backend.

The public surface is small: ``worker.client.submit_turn`` (enqueue a turn), the task name
``config.celery.TURN_TASK_NAME``, the payload schema ``worker.payload.TurnPayload`` and the events
described in docs/contract.md. Everything else is the worker's own business.
"""
