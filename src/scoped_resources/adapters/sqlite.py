"""SQLite through aiosqlite: the embedded default, with one writer and a few readers.

::

    db = SQLite(resources, "app.sqlite3")

    @app.post("/notes")
    async def add(conn: Annotated[aiosqlite.Connection, Use(db.transaction)]) -> ...: ...

=================================  ==============================================================
resource                           guarantee
=================================  ==============================================================
``db.database`` (app)              opens the writer and *readers* reader connections (WAL mode,
                                   ``busy_timeout``, readers ``query_only``); at shutdown closes
                                   every one, even one still leased, so no thread is left behind
``db.connection`` (request)        a reader connection from a bounded set, within
                                   *acquire_timeout* (else :class:`ResourceBusy`, HTTP 503)
``db.transaction`` (request)       the single writer connection inside ``BEGIN IMMEDIATE``:
                                   COMMIT before the response (a failure is HTTP 500), ROLLBACK on
                                   any exception; :func:`savepoint` nests
every one                          errors name the resource; a statement still running when its
                                   scope ends with an error (a cancelled await) is stopped with
                                   ``sqlite3.Connection.interrupt()`` instead of running on in its
                                   thread; a connection that cannot be reset is replaced
=================================  ==============================================================
"""

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio

from .._registry import Resources
from .._resource import Resource
from ..exceptions import ResourceBusy
from ..fastapi import Use
from ._gate import Gate

__all__ = ["SQLite", "savepoint"]


class _Connections:
    """The open connections: one writer behind a lock, readers behind a semaphore."""

    def __init__(self, adapter: "SQLite") -> None:
        self.adapter = adapter
        self.writer: Any = None
        self.write_lock = anyio.Semaphore(1)  # not a Lock: a task may hold two scopes
        self.free_readers: list[Any] = []
        self.reader_slots = anyio.Semaphore(adapter.readers)
        self.open: set[Any] = set()
        self.closed = False

    async def connect(self, *, read_only: bool) -> Any:
        import aiosqlite

        conn = await aiosqlite.connect(self.adapter.path, isolation_level=None)
        self.open.add(conn)
        try:
            await _run(conn, f"PRAGMA busy_timeout = {int(self.adapter.busy_timeout * 1000)}")
            await _run(conn, "PRAGMA journal_mode = WAL")
            await _run(conn, "PRAGMA synchronous = NORMAL")
            await _run(conn, "PRAGMA foreign_keys = ON")
            if read_only:
                await _run(conn, "PRAGMA query_only = ON")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.close(conn)
            raise
        return conn

    async def close(self, conn: Any) -> None:
        self.open.discard(conn)
        if conn._connection is not None:
            conn._conn.interrupt()  # a statement still running would hold close() up
        await conn.close()

    async def close_all(self) -> None:
        self.closed = True
        errors: list[Exception] = []
        for conn in list(self.open):
            try:
                await self.close(conn)
            except Exception as exc:  # noqa: BLE001 - every connection is closed first
                errors.append(exc)
        if errors:
            raise ExceptionGroup(f"closing {self.adapter.name!r} connections failed", errors)

    async def reset(self, conn: Any, outcome: BaseException | None) -> Any:
        """*conn* ready for the next lease, or None when it had to be closed."""
        if conn._connection is None:  # closed under the lease (shutdown)
            self.open.discard(conn)
            return None
        try:
            if outcome is not None:
                await _stop_running(conn)
            if conn.in_transaction:
                await _run(conn, "ROLLBACK")
        except (sqlite3.Error, ValueError):  # ValueError: closed under the lease
            await self.close(conn)
            return None
        return None if self.closed else conn


class SQLite:
    """Declare an SQLite database (app), reader connections and the write transaction (request).

    Resource names are ``f"{name}.database"``, ``f"{name}.connection"`` and
    ``f"{name}.transaction"``. The writer is one connection: writes are serialised
    in the process (waiting at most *acquire_timeout*) and, across processes, by
    SQLite's lock with *busy_timeout*.
    """

    def __init__(
        self,
        resources: Resources,
        path: str,
        *,
        name: str = "sqlite",
        readers: int = 4,
        acquire_timeout: float = 5.0,
        busy_timeout: float = 5.0,
        release_timeout: float = 10.0,
        close_timeout: float = 10.0,
        shed: bool = True,
    ) -> None:
        if readers < 1:
            raise ValueError(f"readers must be at least 1, not {readers}")
        self.name = name
        self.path = path
        self.readers = readers
        self.acquire_timeout = acquire_timeout
        self.busy_timeout = busy_timeout
        self.close_timeout = close_timeout
        #: Admission to the writer and to the readers: arrival order, and a refusal at
        #: once when the wait cannot end within acquire_timeout (``shed=False``: deadline only).
        self.writer_gate = Gate(f"{name}.transaction", 1, timeout=acquire_timeout, shed=shed)
        self.reader_gate = Gate(f"{name}.connection", readers, timeout=acquire_timeout, shed=shed)

        self.database: Resource[Any] = resources.app(
            name=f"{name}.database",
            release_timeout=close_timeout + release_timeout,
            ping=_ping,
        )(self._open)

        async def connection(
            conns: Annotated[Any, Use(self.database)],
        ) -> AsyncIterator[Any]:
            ticket = await self.reader_gate.acquire()
            try:
                conn = await self._lend_reader(conns)
            except BaseException:
                self.reader_gate.release(ticket, record=False)
                raise
            try:
                try:
                    yield conn
                except BaseException as exc:
                    await self._return_reader(conns, conn, exc)
                    raise
                await self._return_reader(conns, conn, None)
            finally:
                self.reader_gate.release(ticket)

        self.connection: Resource[Any] = resources.request(
            name=f"{name}.connection",
            acquire_timeout=None,  # bounded below, so the error names this resource
            release_timeout=release_timeout,
        )(connection)

        async def transaction(
            conns: Annotated[Any, Use(self.database)],
        ) -> AsyncIterator[Any]:
            ticket = await self.writer_gate.acquire()
            try:
                conn = await self._lend_writer(conns)
            except BaseException:
                self.writer_gate.release(ticket, record=False)
                raise
            try:
                try:
                    await _run(conn, "BEGIN IMMEDIATE")
                    yield conn
                except BaseException as exc:
                    conns.writer = await conns.reset(conn, exc)
                    raise
                try:
                    await _run(conn, "COMMIT")
                except BaseException as exc:
                    conns.writer = await conns.reset(conn, exc)
                    raise
            finally:
                conns.write_lock.release()
                self.writer_gate.release(ticket)

        self.transaction: Resource[Any] = resources.request(
            name=f"{name}.transaction",
            acquire_timeout=None,
            release_timeout=release_timeout,
        )(transaction)

    def __repr__(self) -> str:
        return f"<SQLite {self.name!r} {self.path!r} readers={self.readers}>"

    async def _open(self) -> AsyncIterator[_Connections]:
        conns = _Connections(self)
        try:
            conns.writer = await conns.connect(read_only=False)
            for _ in range(self.readers):
                conns.free_readers.append(await conns.connect(read_only=True))
            yield conns
        finally:
            with anyio.CancelScope(shield=True):
                await self._drain(conns)
                await conns.close_all()

    async def _drain(self, conns: _Connections) -> None:
        """Wait up to close_timeout for leases to come back."""
        with anyio.move_on_after(self.close_timeout):
            async with conns.write_lock:
                for _ in range(self.readers):
                    await conns.reader_slots.acquire()

    async def _lend_reader(self, conns: _Connections) -> Any:
        try:
            with anyio.fail_after(self.acquire_timeout):
                await conns.reader_slots.acquire()
        except TimeoutError:
            raise ResourceBusy(f"{self.name}.connection", self.acquire_timeout) from None
        try:
            if conns.free_readers:
                return conns.free_readers.pop()
            return await conns.connect(read_only=True)  # replaces one that was closed
        except BaseException:
            conns.reader_slots.release()
            raise

    async def _return_reader(
        self, conns: _Connections, conn: Any, outcome: BaseException | None
    ) -> None:
        try:
            kept = await conns.reset(conn, outcome)
            if kept is not None:
                conns.free_readers.append(kept)
        finally:
            conns.reader_slots.release()

    async def _lend_writer(self, conns: _Connections) -> Any:
        try:
            with anyio.fail_after(self.acquire_timeout):
                await conns.write_lock.acquire()
        except TimeoutError:
            raise ResourceBusy(f"{self.name}.transaction", self.acquire_timeout) from None
        try:
            if conns.writer is None:
                conns.writer = await conns.connect(read_only=False)
        except BaseException:
            conns.write_lock.release()
            raise
        return conns.writer


async def _ping(conns: _Connections) -> None:
    async with conns.write_lock:
        if conns.writer is None:
            conns.writer = await conns.connect(read_only=False)
        await _run(conns.writer, "SELECT 1")


async def _stop_running(conn: Any) -> None:
    """Interrupt a statement still running on *conn* until its thread is idle.

    An interrupt that lands before the statement starts is lost, so it is
    repeated until a no-op queued behind the statement has run.
    """

    async def interrupt() -> None:
        while True:
            conn._conn.interrupt()
            await anyio.sleep(0.005)

    async with anyio.create_task_group() as tg:
        tg.start_soon(interrupt)
        await conn._execute(_idle)
        tg.cancel_scope.cancel()


def _idle() -> None:
    """Run in a connection's thread: returns once the statements before it are done."""


async def _run(conn: Any, sql: str) -> None:
    """Run *sql* and close its cursor, so no statement stays active on *conn*."""
    cursor = await conn.execute(sql)
    await cursor.close()


@asynccontextmanager
async def savepoint(conn: Any, name: str = "sp") -> AsyncIterator[Any]:
    """A nested transaction on *conn*: released on success, rolled back to on error."""
    await _run(conn, f"SAVEPOINT {name}")
    try:
        yield conn
    except BaseException:
        await _run(conn, f"ROLLBACK TO {name}")
        await _run(conn, f"RELEASE {name}")
        raise
    await _run(conn, f"RELEASE {name}")
