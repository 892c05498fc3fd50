"""The database engine for both backends, and the migrations that make its schema.

One engine, one set of SQLAlchemy Core queries: PostgreSQL through asyncpg,
SQLite through aiosqlite. On SQLite the service needs three things PostgreSQL
gives for free: foreign keys (a pragma per connection), waiting for a lock
instead of failing at once (``busy_timeout``), and write transactions that take
the write lock when they begin (``BEGIN IMMEDIATE``), so that two writers queue
instead of deadlocking on the upgrade from a read lock.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .settings import Settings

MIGRATIONS = Path(__file__).parent / "migrations"
#: Execution option that makes a SQLite transaction take the write lock at BEGIN.
WRITE = "service_write"
#: Key of the PostgreSQL advisory lock held while migrating ("svc_migr").
_MIGRATION_LOCK = 0x7376635F6D696772


class PoolBudgetExceeded(RuntimeError):
    """Raised when the replicas' pools together could open more connections than the server allows.

    Checked at start-up: ``DB_POOL_SIZE x DB_REPLICAS`` against the server's
    ``max_connections``, less its reserved slots and the sessions other clients
    hold right now. The message names every number and the ways out.
    """


class DatabaseUnavailable(RuntimeError):
    """Raised at start-up when the database of ``DATABASE_URL`` cannot be opened.

    The message is one line: the URL (password hidden) and what the driver said
    (connection refused, unknown host, no such database or role, a SQLite folder
    that cannot be made).
    """

    def __init__(self, settings: Settings, error: BaseException) -> None:
        url = make_url(settings.database_url).render_as_string(hide_password=True)
        cause: BaseException = error.orig if isinstance(error, DBAPIError) and error.orig else error
        # behind SQLAlchemy's adapter, the driver's own exception (asyncpg's names the case)
        cause = cause.__cause__ or cause
        reason = str(cause).splitlines()[0] if str(cause) else ""
        super().__init__(
            f"cannot open the database of DATABASE_URL ({url}): {type(cause).__name__}: {reason}"
        )


async def open_engine(settings: Settings) -> AsyncEngine:
    """:func:`make_engine`, connected once; DatabaseUnavailable if the database cannot be opened."""
    try:
        engine = make_engine(settings)
    except OSError as exc:  # the SQLite file's folder
        raise DatabaseUnavailable(settings, exc) from exc
    try:
        async with engine.connect():
            pass
    except (OSError, DBAPIError) as exc:
        await engine.dispose()
        raise DatabaseUnavailable(settings, exc) from exc
    return engine


def engine_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``create_async_engine`` (via the SQLAlchemy adapter)."""
    options: dict[str, Any] = {"pool_size": settings.db_pool_size}
    if settings.is_sqlite:
        options["connect_args"] = {"timeout": 30}
        return options
    connect_args: dict[str, Any] = {
        "server_settings": {"application_name": settings.database_application_name}
    }
    if settings.database_pgbouncer:
        # Transaction pooling hands each transaction any server connection: a statement
        # prepared and cached on one is unknown on the next, and asyncpg's numbered
        # names collide between clients. SQLAlchemy prepares and runs a statement in
        # one transaction, so unique names and no caches are enough.
        connect_args.update(
            statement_cache_size=0,
            prepared_statement_cache_size=0,
            prepared_statement_name_func=_statement_name,
        )
    options["connect_args"] = connect_args
    return options


def _statement_name() -> str:
    return f"__sr_{uuid.uuid4().hex}__"


_BUDGET = text(
    "SELECT current_setting('max_connections')::int,"
    " current_setting('superuser_reserved_connections')::int,"
    " coalesce(current_setting('reserved_connections', true), '0')::int,"
    " (SELECT count(*) FROM pg_stat_activity"
    "  WHERE backend_type = 'client backend' AND application_name <> :name)"
)


async def check_pool_budget(engine: AsyncEngine, settings: Settings) -> None:
    """Refuse to start when ``DB_POOL_SIZE x DB_REPLICAS`` exceeds the server's free slots.

    The service's own sessions (its ``application_name``) are left out of the
    sessions in use: they are the replicas' pools being counted. Nothing is checked
    on SQLite, nor behind PgBouncer (whose pool, not ours, bounds the server's).
    """
    if engine.dialect.name != "postgresql" or settings.database_pgbouncer:
        return
    async with engine.connect() as conn:
        row = (await conn.execute(_BUDGET, {"name": settings.database_application_name})).one()
    max_connections, superuser_reserved, reserved, in_use = (int(v) for v in row)
    free = max_connections - superuser_reserved - reserved - in_use
    wanted = settings.db_pool_size * settings.db_replicas
    if wanted <= free:
        return
    fits = max(free // settings.db_replicas, 0)
    raise PoolBudgetExceeded(
        f"the database pools would exceed PostgreSQL's connection budget: DB_POOL_SIZE="
        f"{settings.db_pool_size} x DB_REPLICAS={settings.db_replicas} = {wanted} connections, "
        f"but max_connections={max_connections} - superuser_reserved_connections="
        f"{superuser_reserved} - reserved_connections={reserved} - {in_use} sessions in use "
        f"by other clients leaves {free}. Lower DB_POOL_SIZE to {fits} or less, raise "
        "max_connections on the server, or put PgBouncer in front (DATABASE_PGBOUNCER=1)"
    )


def make_data_dir(settings: Settings) -> None:
    """Create the folder of the SQLite file, if the database is one."""
    path = settings.sqlite_path
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def make_engine(settings: Settings) -> AsyncEngine:
    """A stand-alone engine for *settings* (for ``python -m service migrate`` and tests)."""
    make_data_dir(settings)
    engine = create_async_engine(settings.database_url, max_overflow=0, **engine_options(settings))
    prepare_engine(engine)
    return engine


def prepare_engine(engine: AsyncEngine) -> None:
    """Give a SQLite engine its pragmas and locking; call before its first connection."""
    if engine.dialect.name != "sqlite":
        return
    sync = engine.sync_engine
    if event.contains(sync, "connect", _on_connect):
        return
    event.listen(sync, "connect", _on_connect)
    event.listen(sync, "begin", _on_begin)


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook emit BEGIN, not the driver.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _on_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to *revision*; replicas that start together take turns."""
    async with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            await conn.execution_options(**{WRITE: True})
        async with conn.begin():
            if engine.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
            await conn.run_sync(_upgrade, revision)


async def downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    """Take the schema back to *revision* (``base``: drop every table)."""
    async with engine.begin() as conn:
        await conn.run_sync(_downgrade, revision)


def _config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection, revision: str) -> None:
    command.upgrade(_config(connection), revision)


def _downgrade(connection: Connection, revision: str) -> None:
    command.downgrade(_config(connection), revision)


async def write_connection(conn: AsyncConnection) -> AsyncConnection:
    """*conn* set up so that its next transaction is a write transaction."""
    return await conn.execution_options(**{WRITE: True})
