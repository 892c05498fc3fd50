"""Alembic environment: runs on the connection the caller hands over.

``service.migrate.upgrade`` opens the connection (and, on PostgreSQL, takes an
advisory lock so that replicas starting together migrate one at a time).
"""

from __future__ import annotations

from alembic import context

from service.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the migrations with 'python -m service migrate' (service.migrate)")
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
