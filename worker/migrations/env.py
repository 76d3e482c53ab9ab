"""Alembic environment: runs the worker's migrations against the URL it is handed.

``worker.migrate`` passes the database URL (or a live connection) in the Alembic config, so the
same migrations serve the worker's start-up, the ``scripts/migrate`` command and the tests.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from worker.store import Base

config = context.config
target_metadata = Base.metadata


def run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite",
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_on(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as new_connection:
        run_on(new_connection)
    engine.dispose()
