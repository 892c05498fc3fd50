"""Temporary databases for tests, and per-test isolation by rollback.

* PostgreSQL: :func:`create_postgres_database` makes a database with a unique
  name from the app's migrations (a callable or SQL files);
  :func:`drop_postgres_database` drops it. :func:`postgres_rollback` opens one
  connection inside an outer transaction that is rolled back at the end, and
  :func:`override_postgres` points an app's ``Postgres`` resources at it, so the
  app's own transactions become savepoints and nothing it writes survives the test.
* SQLAlchemy: :func:`sqlalchemy_rollback` and :func:`override_sqlalchemy`, the
  same with ``join_transaction_mode="create_savepoint"`` sessions.
* SQLite: :func:`create_sqlite_database` writes a migrated file; each test gets a
  copy of it.
* Redis: :class:`RedisNamespace`, a per-test key prefix (and optional database
  number) whose keys are deleted afterwards.

Drivers are imported only when used.
"""

from __future__ import annotations

import inspect
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio

__all__ = [
    "Migrations",
    "RedisNamespace",
    "SharedPool",
    "TempPostgres",
    "apply_sql_migrations",
    "copy_sqlite_database",
    "create_postgres_database",
    "create_sqlite_database",
    "drop_postgres_database",
    "list_postgres_databases",
    "override_postgres",
    "override_sqlalchemy",
    "postgres_rollback",
    "sqlalchemy_rollback",
]

#: A migration callable (given the driver's connection; sync or async), a SQL file,
#: a folder of ``*.sql`` files (applied in name order), or a list of these.
Migrations = (
    Callable[[Any], Awaitable[object] | object]
    | str
    | os.PathLike[str]
    | Sequence["str | os.PathLike[str] | Callable[[Any], Awaitable[object] | object]"]
    | None
)

DEFAULT_PREFIX = "sr_test_"
_SAFE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _sql_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(path.glob("*.sql"))
    if not path.exists():
        raise FileNotFoundError(f"migration {str(path)!r} does not exist")
    return [path]


def _steps(migrations: Migrations) -> list[Path | Callable[[Any], Any]]:
    if migrations is None:
        return []
    if isinstance(migrations, str | os.PathLike) or callable(migrations):
        items: Sequence[Any] = [migrations]
    else:
        items = migrations
    steps: list[Path | Callable[[Any], Any]] = []
    for item in items:
        if callable(item):
            steps.append(item)
        else:
            steps.extend(_sql_files(Path(item)))
    return steps


async def apply_sql_migrations(
    conn: Any, migrations: Migrations, execute: Callable[[Any, str], Awaitable[object]]
) -> None:
    """Apply *migrations* on *conn*: SQL text through *execute*, callables with *conn*."""
    for step in _steps(migrations):
        if isinstance(step, Path):
            await execute(conn, step.read_text(encoding="utf-8"))
        else:
            result = step(conn)
            if inspect.isawaitable(result):
                await result


# -- PostgreSQL ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TempPostgres:
    """A temporary PostgreSQL database: its *name* and the *dsn* to reach it."""

    admin_dsn: str
    name: str
    dsn: str


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def _check_name(name: str) -> str:
    if not _SAFE_NAME.match(name):
        raise ValueError(f"{name!r} is not a safe database name (lower-case letters, digits, _)")
    return name


async def _pg_execute(conn: Any, sql: str) -> None:
    await conn.execute(sql)


async def create_postgres_database(
    admin_dsn: str, migrations: Migrations = None, *, prefix: str = DEFAULT_PREFIX
) -> TempPostgres:
    """Create a database with a unique name and apply *migrations* to it.

    *admin_dsn* reaches any database of the server as a user allowed to
    ``CREATE DATABASE``. A failed migration drops the database again.
    """
    import asyncpg

    name = _check_name(f"{prefix}{secrets.token_hex(6)}")
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    temp = TempPostgres(admin_dsn, name, _with_database(admin_dsn, name))
    try:
        conn = await asyncpg.connect(temp.dsn)
        try:
            await apply_sql_migrations(conn, migrations, _pg_execute)
        finally:
            await conn.close()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await drop_postgres_database(admin_dsn, name)
        raise
    return temp


async def drop_postgres_database(admin_dsn: str, name: str) -> None:
    """Drop database *name*, disconnecting whoever still uses it; a missing one is fine."""
    import asyncpg

    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{_check_name(name)}" WITH (FORCE)')
    finally:
        await admin.close()


async def list_postgres_databases(admin_dsn: str, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The names of the server's databases that start with *prefix*."""
    import asyncpg

    admin = await asyncpg.connect(admin_dsn)
    try:
        rows = await admin.fetch(
            "SELECT datname FROM pg_database WHERE starts_with(datname, $1) ORDER BY 1", prefix
        )
    finally:
        await admin.close()
    return [row["datname"] for row in rows]


@asynccontextmanager
async def postgres_rollback(dsn: str) -> AsyncIterator[Any]:
    """One asyncpg connection inside a transaction that is rolled back at the end."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        outer = conn.transaction()
        await outer.start()
        try:
            yield conn
        finally:
            with anyio.CancelScope(shield=True):
                await outer.rollback()
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()


_DELEGATED = frozenset(
    {"execute", "executemany", "fetch", "fetchrow", "fetchval", "copy_records_to_table"}
)


class SharedPool:
    """Stands in for an ``asyncpg.Pool``: every acquire lends the one test connection.

    Acquires wait for each other (one connection cannot run two queries at once).
    The query methods of ``asyncpg.Pool`` are delegated to the connection.
    """

    def __init__(self, conn: Any, lock: anyio.Semaphore) -> None:
        self.conn = conn
        self._lock = lock

    @asynccontextmanager
    async def _lend(self) -> AsyncIterator[Any]:
        async with self._lock:
            yield self.conn

    def acquire(self, **_options: Any) -> _Acquire:
        """Lend the connection: ``async with pool.acquire() as conn`` or ``await``."""
        return _Acquire(self)

    async def release(self, conn: Any, **_options: Any) -> None:
        """Give back a connection taken with ``await pool.acquire()``."""
        if conn is not self.conn:
            raise ValueError("this connection was not lent by this pool")
        self._lock.release()

    def __getattr__(self, name: str) -> Any:
        if name in _DELEGATED:
            method = getattr(self.conn, name)

            async def locked(*args: Any, **kwargs: Any) -> Any:
                async with self._lock:
                    return await method(*args, **kwargs)

            return locked
        raise AttributeError(name)


class _Acquire:
    def __init__(self, pool: SharedPool) -> None:
        self._pool = pool
        self._cm: AbstractAsyncContextManager[Any] | None = None

    def __await__(self) -> Any:
        return self._take().__await__()

    async def _take(self) -> Any:
        await self._pool._lock.acquire()
        return self._pool.conn

    async def __aenter__(self) -> Any:
        self._cm = self._pool._lend()
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        if self._cm is not None:
            await self._cm.__aexit__(None, None, None)


@contextmanager
def override_postgres(pg: Any, conn: Any) -> Iterator[SharedPool]:
    """Point the resources of a ``Postgres`` adapter (*pg*) at the test connection *conn*.

    ``pg.pool`` becomes a :class:`SharedPool` and ``pg.connection`` lends *conn*
    to one request at a time; ``pg.transaction`` is built on ``pg.connection``,
    so its transaction is a savepoint inside the outer one. Works for any object
    with ``.pool`` and ``.connection`` resources on one registry.
    """
    lock = anyio.Semaphore(1)
    pool = SharedPool(conn, lock)

    async def lend_connection() -> AsyncIterator[Any]:
        async with lock:
            yield conn

    registry = pg.connection.registry
    with ExitStack() as stack:
        stack.enter_context(registry.override(pg.pool, pool))
        stack.enter_context(registry.override(pg.connection, factory=lend_connection))
        yield pool


# -- SQLAlchemy ---------------------------------------------------------------------------


@asynccontextmanager
async def sqlalchemy_rollback(url_or_engine: Any) -> AsyncIterator[Any]:
    """One SQLAlchemy ``AsyncConnection`` in an outer transaction rolled back at the end."""
    from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

    owned = not isinstance(url_or_engine, AsyncEngine)
    engine = create_async_engine(url_or_engine) if owned else url_or_engine
    try:
        conn = await engine.connect()
        try:
            outer = await conn.begin()
            try:
                yield conn
            finally:
                with anyio.CancelScope(shield=True):
                    await outer.rollback()
        finally:
            with anyio.CancelScope(shield=True):
                await conn.close()
    finally:
        if owned:
            with anyio.CancelScope(shield=True):
                await engine.dispose()


@contextmanager
def override_sqlalchemy(sa: Any, conn: Any) -> Iterator[None]:
    """Point a ``SQLAlchemy`` adapter's ``.connection`` and ``.session`` at *conn*.

    Each request's session joins the outer transaction with
    ``join_transaction_mode="create_savepoint"``: its commit releases a
    savepoint, its rollback rolls back to it. Committed on success, rolled back
    on error, like the adapter's own session. The app's ``.engine`` is left
    alone: work done directly on it is not isolated.
    """
    from sqlalchemy.ext.asyncio import AsyncSession

    lock = anyio.Semaphore(1)

    async def lend_connection() -> AsyncIterator[Any]:
        async with lock:
            yield conn

    async def session() -> AsyncIterator[Any]:
        async with lock:
            sess = AsyncSession(
                bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False
            )
            try:
                yield sess
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await sess.rollback()
                    await sess.close()
                raise
            try:
                await sess.commit()
            finally:
                with anyio.CancelScope(shield=True):
                    await sess.close()

    registry = sa.session.registry
    with ExitStack() as stack:
        if getattr(sa, "connection", None) is not None:
            stack.enter_context(registry.override(sa.connection, factory=lend_connection))
        stack.enter_context(registry.override(sa.session, factory=session))
        yield


# -- SQLite -------------------------------------------------------------------------------


async def _sqlite_execute(conn: Any, sql: str) -> None:
    await conn.executescript(sql)


async def create_sqlite_database(path: Path, migrations: Migrations = None) -> Path:
    """Create the SQLite file *path* and apply *migrations* to it."""
    import aiosqlite

    path.parent.mkdir(parents=True, exist_ok=True)
    async with aiosqlite.connect(path) as conn:
        await apply_sql_migrations(conn, migrations, _sqlite_execute)
        await conn.commit()
    return path


def copy_sqlite_database(template: Path, path: Path) -> Path:
    """Copy the migrated *template* to *path* (cheaper than migrating again)."""
    shutil.copyfile(template, path)
    return path


# -- Redis ---------------------------------------------------------------------------------


class RedisNamespace:
    """A per-test key prefix (and optionally database number) on a real Redis.

    Give the app ``ns.prefix`` (and ``ns.url``, which selects *db*); after the
    test :meth:`cleanup` deletes every key under the prefix, and only those, so
    other users of the server are never touched.
    """

    def __init__(self, url: str, *, db: int | None = None, prefix: str | None = None) -> None:
        parts = urlsplit(url)
        if db is not None:
            parts = parts._replace(path=f"/{db}")
        self.url = urlunsplit(parts)
        self.prefix = prefix or f"sr-test:{secrets.token_hex(4)}:"

    def key(self, name: str) -> str:
        """*name* under this test's prefix."""
        return f"{self.prefix}{name}"

    async def keys(self) -> list[str]:
        """Every key under the prefix now."""
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(self.url, decode_responses=True)
        try:
            return [k async for k in client.scan_iter(match=f"{_glob_escape(self.prefix)}*")]
        finally:
            await client.aclose()

    async def cleanup(self) -> int:
        """Delete every key under the prefix; return how many were deleted."""
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(self.url, decode_responses=True)
        deleted = 0
        try:
            batch: list[str] = []
            async for key in client.scan_iter(match=f"{_glob_escape(self.prefix)}*", count=500):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += await client.delete(*batch)
                    batch.clear()
            if batch:
                deleted += await client.delete(*batch)
        finally:
            await client.aclose()
        return deleted


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
