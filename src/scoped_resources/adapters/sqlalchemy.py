"""SQLAlchemy (async): an engine for the app, a connection or a session per request.

::

    db = SQLAlchemy(resources, "postgresql+asyncpg://app@db/app")

    @app.post("/users")
    async def add(session: Annotated[AsyncSession, Use(db.session)]) -> ...: ...

=================================  ==============================================================
resource                           guarantee
=================================  ==============================================================
``db.engine`` (app)                created in the lifespan; ``SELECT 1`` ping; at shutdown waits
                                   up to *close_timeout* for leases, invalidates those still out,
                                   then ``dispose()``
``db.connection`` (request)        an ``AsyncConnection`` checked out within *acquire_timeout*
                                   (else :class:`ResourceBusy`, HTTP 503); closed (rolled back) on
                                   release, invalidated if that fails or overruns
``db.session`` (request)           an ``AsyncSession`` on the request's connection, inside one
                                   transaction: flush + COMMIT before the response (a failure is
                                   HTTP 500), ROLLBACK on any exception; ``begin_nested()`` makes
                                   savepoints
every one                          errors name the resource; the URL password never appears in
                                   the repr; checked-out connections are never leaked, even when
                                   a query is cancelled (SQLAlchemy then drops the socket)
=================================  ==============================================================

Works with ``postgresql+asyncpg://`` and ``sqlite+aiosqlite:///path``. On
PostgreSQL it sets ``client_connection_check_interval=1000`` (ms) on its
connections unless given: a cancelled query's socket is dropped by SQLAlchemy,
and this makes the server stop the query within a second instead of running it
(or waiting on a lock) to its end. Connections
are checked with ``pool_pre_ping`` on checkout (pass ``pool_pre_ping=False`` to
skip the round trip), so connections that died with the server are replaced.
"""

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

import anyio

from .._registry import Resources
from .._resource import Resource
from ..exceptions import ResourceBusy
from ..fastapi import Use
from ._common import redact
from ._gate import Gate

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

__all__ = ["SQLAlchemy"]


class SQLAlchemy:
    """Declare an ``AsyncEngine`` (app), a connection and a session (request) on *resources*.

    Resource names are ``f"{name}.engine"``, ``f"{name}.connection"`` and
    ``f"{name}.session"``. Other keyword arguments go to ``create_async_engine``.
    Connections pass :attr:`gate` first: served in arrival order, refused at once
    (503) when the predicted wait exceeds *acquire_timeout*; ``shed=False`` refuses
    only at the deadline.
    """

    def __init__(
        self,
        resources: Resources,
        url: str,
        *,
        name: str = "sqlalchemy",
        pool_size: int = 10,
        max_overflow: int = 0,
        acquire_timeout: float = 5.0,
        release_timeout: float = 10.0,
        close_timeout: float = 10.0,
        ping_timeout: float = 2.0,
        expire_on_commit: bool = False,
        shed: bool = True,
        **engine_kwargs: Any,
    ) -> None:
        self.name = name
        self.url = url
        self.acquire_timeout = acquire_timeout
        self.close_timeout = close_timeout
        self.ping_timeout = ping_timeout
        self.expire_on_commit = expire_on_commit
        engine_kwargs.setdefault("pool_pre_ping", True)
        if url.startswith("postgresql+asyncpg"):
            # SQLAlchemy drops the socket of a cancelled query instead of cancelling it
            # on the server; PostgreSQL (14+) then notices the lost client within a
            # second even while the query waits on a lock, and stops it.
            connect_args = engine_kwargs.setdefault("connect_args", {})
            settings = connect_args.setdefault("server_settings", {})
            settings.setdefault("client_connection_check_interval", "1000")
        self._engine_kwargs = {
            "pool_size": pool_size,
            "max_overflow": max_overflow,
            "pool_timeout": acquire_timeout,
            **engine_kwargs,
        }
        #: Connections leased now; shutdown waits for them, then invalidates them.
        self._leased: dict[AsyncConnection, int] = {}
        #: Admission to the pool (capacity pool_size + max_overflow): arrival order,
        #: and a refusal at once when the wait cannot end within acquire_timeout.
        self.gate = Gate(
            f"{name}.connection", pool_size + max_overflow, timeout=acquire_timeout, shed=shed
        )
        self._returned: anyio.Event | None = None

        self.engine: Resource[AsyncEngine] = resources.app(
            name=f"{name}.engine",
            release_timeout=close_timeout + release_timeout,
            ping=self._ping,
        )(self._open_engine)

        async def connection(
            engine: Annotated[Any, Use(self.engine)],
        ) -> AsyncIterator[Any]:  # real types need the driver at import
            conn = await self._connect(engine)
            try:
                yield conn
            finally:
                try:
                    await conn.close()
                finally:
                    self._returned_one(conn)

        self.connection: Resource[AsyncConnection] = resources.request(
            name=f"{name}.connection",
            acquire_timeout=acquire_timeout,
            release_timeout=release_timeout,
            terminate=self._invalidate,
        )(connection)
        self.connection._own_deadline = True  # the gate bounds it (see _connect)

        async def session(
            conn: Annotated[Any, Use(self.connection)],
        ) -> AsyncIterator[Any]:
            from sqlalchemy.ext.asyncio import AsyncSession

            transaction = await conn.begin()
            db = AsyncSession(
                bind=conn,
                expire_on_commit=self.expire_on_commit,
                join_transaction_mode="rollback_only",
            )
            try:
                try:
                    yield db
                except BaseException:
                    await db.rollback()  # in rollback_only mode this ends ours too
                    if transaction.is_active:
                        await transaction.rollback()
                    raise
                await db.commit()  # flushes; the outer transaction is ours to commit
                await transaction.commit()
            finally:
                await db.close()

        self.session: Resource[AsyncSession] = resources.request(
            name=f"{name}.session",
            acquire_timeout=acquire_timeout,
            release_timeout=release_timeout,
            terminate=_invalidate_session,
        )(session)

    def __repr__(self) -> str:
        return f"<SQLAlchemy {self.name!r} {redact(self.url)}>"

    async def _open_engine(self) -> AsyncIterator[Any]:
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(self.url, **self._engine_kwargs)
        try:
            yield engine
        finally:
            try:
                await self._wait_for_leases()
            finally:
                await engine.dispose()

    async def _wait_for_leases(self) -> None:
        if self._leased:
            self._returned = anyio.Event()
            with anyio.move_on_after(self.close_timeout):
                await self._returned.wait()
        for conn in list(self._leased):  # still out: close their sockets now
            await self._invalidate(conn)

    async def _connect(self, engine: "AsyncEngine") -> "AsyncConnection":
        from sqlalchemy.exc import TimeoutError as PoolTimeout

        try:
            # One deadline for the gate's wait and the checkout (armed only if it waits).
            ticket, conn = await self.gate.enter(engine.connect)
        except PoolTimeout:
            raise ResourceBusy(f"{self.name}.connection", self.acquire_timeout) from None
        self._leased[conn] = ticket
        return conn

    def _returned_one(self, conn: "AsyncConnection") -> None:
        ticket = self._leased.pop(conn, None)
        if ticket is not None:
            self.gate.release(ticket)
        if not self._leased and self._returned is not None:
            self._returned.set()

    async def _invalidate(self, conn: "AsyncConnection") -> None:
        try:
            await conn.invalidate()
        finally:
            self._returned_one(conn)

    async def _ping(self, engine: "AsyncEngine") -> None:
        from sqlalchemy.sql import text

        with anyio.fail_after(self.ping_timeout):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))


async def _invalidate_session(session: "AsyncSession") -> None:
    await session.invalidate()
