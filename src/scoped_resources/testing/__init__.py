"""Testing helpers for resource-backed apps (the pytest plugin: ``.plugin``)."""

from ._cancel import CancelledAtError, cancel_at_each_await, count_await_points
from ._databases import (
    RedisNamespace,
    SharedPool,
    TempPostgres,
    create_postgres_database,
    create_sqlite_database,
    drop_postgres_database,
    list_postgres_databases,
    override_postgres,
    override_sqlalchemy,
    postgres_rollback,
    sqlalchemy_rollback,
)
from ._lifespan import AppLifespan
from ._proxy import TcpProxy

__all__ = [
    "AppLifespan",
    "CancelledAtError",
    "RedisNamespace",
    "SharedPool",
    "TcpProxy",
    "TempPostgres",
    "cancel_at_each_await",
    "count_await_points",
    "create_postgres_database",
    "create_sqlite_database",
    "drop_postgres_database",
    "list_postgres_databases",
    "override_postgres",
    "override_sqlalchemy",
    "postgres_rollback",
    "sqlalchemy_rollback",
]
