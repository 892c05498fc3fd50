"""PostgreSQL through asyncpg: a pool for the app, a connection or a transaction per request.

::

    pg = Postgres(resources, "postgresql://app@db/app")

    @app.post("/users")
    async def add(conn: Annotated[asyncpg.Connection, Use(pg.transaction)]) -> ...: ...

=================================  ==============================================================
resource                           guarantee
=================================  ==============================================================
``pg.pool`` (app)                  opened in the lifespan; ``SELECT 1`` ping; closed with
                                   ``Pool.close()`` within *close_timeout*, else ``terminate()``
``pg.connection`` (request)        leased within *acquire_timeout* (the core's deadline); past it
                                   :class:`ResourceBusy` (HTTP 503); always returned to the pool,
                                   reset (asyncpg rolls back what is left open), or terminated
``pg.transaction`` (request)       the request's connection inside a transaction: COMMIT before
                                   the response (a failing COMMIT is HTTP 500), ROLLBACK on any
                                   exception or cancellation; nested ``conn.transaction()`` blocks
                                   are savepoints; when no other resource takes the connection,
                                   the COMMIT carries the pool's reset (one round trip, not two)
every one                          errors name the resource; the DSN password never appears in
                                   reprs, messages or logs; a release that overruns its deadline
                                   terminates the connection, so the pool never lends a dirty one
=================================  ==============================================================

A connection that died (the server restarted, the network dropped) is dropped by
the pool: asyncpg reconnects closed connections on acquire, and a connection that
fails while leased is terminated on release instead of returned.
"""

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio

from .._failures import log_failure, mark_outage, outage_of
from .._registry import Resources
from .._resource import Resource
from ..fastapi import Use
from ._common import redact, scrub, secrets_of
from ._gate import Gate

__all__ = ["Postgres"]

_logger = logging.getLogger("scoped_resources")


class Postgres:
    """Declare an asyncpg pool (app), a connection and a transaction (request) on *resources*.

    Resource names are ``f"{name}.pool"``, ``f"{name}.connection"`` and
    ``f"{name}.transaction"``. *statement_cache_size* ``=0`` is needed behind
    PgBouncer in transaction mode; other keyword arguments go to
    ``asyncpg.create_pool``. Leases pass :attr:`gate` (capacity *max_size*):
    served in arrival order, refused at once (503) when the predicted wait exceeds
    *acquire_timeout*; ``shed=False`` refuses only at the deadline.
    """

    def __init__(
        self,
        resources: Resources,
        dsn: str,
        *,
        name: str = "postgres",
        min_size: int = 1,
        max_size: int = 10,
        acquire_timeout: float = 5.0,
        release_timeout: float = 10.0,
        close_timeout: float = 10.0,
        statement_cache_size: int | None = None,
        ping_timeout: float = 2.0,
        shed: bool = True,
        **connect_kwargs: Any,
    ) -> None:
        self.name = name
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.acquire_timeout = acquire_timeout
        self.ping_timeout = ping_timeout
        if statement_cache_size is not None:
            connect_kwargs["statement_cache_size"] = statement_cache_size
        self._connect_kwargs = connect_kwargs
        self._secrets = secrets_of(dsn, connect_kwargs.get("password"))
        #: Whether leases go back through the pool's holders directly (see _release_direct).
        self._direct = False
        #: Whether a transaction's COMMIT carries its connection's reset (see _commit_and_reset).
        self._fused = False
        self._resources = resources
        #: Admission to the pool: arrival order, and a refusal at once when the wait
        #: cannot end within the acquire deadline (``shed=False``: deadline only).
        self.gate = Gate(f"{name}.connection", max_size, timeout=acquire_timeout, shed=shed)

        self.pool: Resource[Any] = resources.app(
            name=f"{name}.pool",
            release_timeout=close_timeout,
            terminate=_terminate_pool,
            ping=self._ping,
        )(self._open_pool)

        async def connection(
            pool: Annotated[Any, Use(self.pool)],
        ) -> AsyncIterator[Any]:
            ticket, conn = await self.gate.enter(lambda: self._acquire(pool))
            try:
                yield conn
            except BaseException as exc:
                _mark_if_closed(conn, exc)
                raise
            finally:
                try:
                    # Shielded and bounded by the core; asyncpg resets the connection
                    # (rolls back what is left open) or terminates it.
                    if self._direct:
                        await _release_direct(conn)
                    else:
                        await pool.release(conn)
                except Exception as err:  # noqa: BLE001 - reported, and harmless here
                    # asyncpg terminated the connection when its reset failed (a server
                    # that went away mid-request). The request's work was committed or
                    # rolled back before this: failing the request would tell the client
                    # that a stored write failed.
                    log_failure(_logger, "returning", f"{name}.connection", err)
                finally:
                    self.gate.release(ticket)

        # The gate bounds the whole acquire (its wait, then the pool's, armed only if
        # the pool must connect) rather than the core (a second timer around the
        # same wait) or pool.acquire(timeout=...) (asyncio.wait_for, ~9 us).
        self.connection: Resource[Any] = resources.request(
            name=f"{name}.connection",
            acquire_timeout=acquire_timeout,
            release_timeout=release_timeout,
            terminate=_terminate_connection,
        )(connection)
        self.connection._own_deadline = True

        async def transaction(
            conn: Annotated[Any, Use(self.connection)],
        ) -> AsyncIterator[Any]:
            tx = conn.transaction()
            # Not when a test overrides the connection: its release would not know.
            fused = self._fused and self.connection._override is None
            try:
                await tx.start()
            except BaseException:
                # Cancelled (or failed) while BEGIN was in flight: its answer may still
                # be on the way, so roll back unconditionally (PostgreSQL only warns
                # when there is nothing to roll back), leaving no open transaction
                # for the pool's reset to find.
                if not conn.is_closed():
                    with anyio.CancelScope(shield=True), anyio.move_on_after(release_timeout):
                        await conn.execute("ROLLBACK")
                    _forget_failed_start(conn, tx)
                raise
            try:
                yield conn
            except BaseException as exc:
                _mark_if_closed(conn, exc)
                await tx.rollback()
                raise
            try:
                if fused:
                    await _commit_and_reset(conn, tx)
                else:
                    await tx.commit()
            except Exception as exc:
                _mark_if_closed(conn, exc)
                raise

        self.transaction: Resource[Any] = resources.request(
            name=f"{name}.transaction",
            acquire_timeout=None,  # BEGIN only; its connection's acquire is bounded
            release_timeout=release_timeout,
            terminate=_terminate_connection,
        )(transaction)

    def __repr__(self) -> str:
        return f"<Postgres {self.name!r} {redact(self.dsn)} size={self.min_size}..{self.max_size}>"

    async def _open_pool(self) -> AsyncIterator[Any]:
        import asyncpg

        try:
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                **self._connect_kwargs,
            )
        except Exception as exc:  # noqa: BLE001 - re-raised without secrets
            raise self._scrubbed(exc) from None
        self._direct = _can_release_direct(pool)
        # Sound only when nothing can use the connection between the transaction's
        # release and its own: scopes release in reverse order, so that takes a
        # resource acquired after the connection and before the transaction, and
        # only a resource that takes the connection itself could use it then.
        self._fused = (
            self._direct
            and _can_fuse()
            and self._resources.plan().dependents(self.connection) == (self.transaction,)
        )
        try:
            yield pool
        finally:
            # Waits for leases to come back; the core bounds it with close_timeout
            # and then calls terminate(). A cancelled close() terminates by itself.
            await pool.close()

    async def _acquire(self, pool: Any) -> Any:
        try:
            return await pool.acquire()
        except Exception as exc:  # noqa: BLE001 - re-raised without secrets
            raise self._scrubbed(exc) from None

    async def _ping(self, pool: Any) -> None:
        with anyio.fail_after(self.ping_timeout):
            async with pool.acquire(timeout=self.ping_timeout) as conn:
                await conn.fetchval("SELECT 1")

    def _scrubbed(self, exc: Exception) -> Exception:
        """*exc* itself when its text holds no secret, else a copy of its type without it."""
        text = str(exc)
        clean = scrub(text, self._secrets)
        if clean == text:
            return exc
        try:
            return type(exc)(clean)
        except Exception:  # noqa: BLE001 - some driver errors take other arguments
            return ConnectionError(f"{type(exc).__name__}: {clean}")


def _can_release_direct(pool: Any) -> bool:
    """Whether this asyncpg's pool has the parts :func:`_release_direct` relies on.

    A subclass that overrides ``release`` keeps its own; so does an asyncpg whose
    private layout moved (then the public ``Pool.release`` is used).
    """
    import asyncpg.pool

    return (
        type(pool).release is asyncpg.pool.Pool.release
        and callable(getattr(asyncpg.pool.PoolConnectionHolder, "release", None))
        and "_holder" in getattr(asyncpg.pool.PoolConnectionProxy, "__slots__", ())
        and callable(getattr(asyncpg.Connection, "_on_release", None))
    )


async def _release_direct(conn: Any) -> None:
    """``Pool.release(conn)`` without its ``asyncio.shield``.

    asyncpg shields each release in a new task so that a cancelled caller still
    returns the connection. The core already shields releases (and terminates the
    connection if a release is interrupted anyway), so the lease is handed to its
    holder directly: the same reset, one task and two loop steps fewer. After a
    transaction's COMMIT carried the reset (:func:`_commit_and_reset` leaves the
    connection's reset query empty), the holder's release sends no query; the
    reset query is recomputed for the next lease.
    """
    raw = conn._con
    if raw is None:  # already released
        return
    raw._on_release()
    holder = conn._holder
    reset_done = raw._reset_query == ""
    try:
        await holder.release(holder._timeout)
    finally:
        if reset_done:
            raw._reset_query = None  # asyncpg computes it again from the server's caps


def _can_fuse() -> bool:
    """Whether this asyncpg has what :func:`_commit_and_reset` relies on."""
    import asyncpg

    return (
        callable(getattr(asyncpg.Connection, "get_reset_query", None))
        and "_reset_query" in getattr(asyncpg.Connection, "__slots__", ())
        and "_top_xact" in getattr(asyncpg.Connection, "__slots__", ())
    )


async def _commit_and_reset(conn: Any, tx: Any) -> None:
    """COMMIT and the pool's reset in one round trip: ``COMMIT;`` then the reset query.

    What asyncpg's own reset does with ``ROLLBACK;``. In one simple query the
    statements after COMMIT run only if it succeeds: a failed COMMIT raises here,
    as ``tx.commit()`` would, and the connection's release resets it as usual.
    After success the connection's cached reset query is left empty, so that its
    release (next: nothing else takes the connection, see ``Postgres._fused``)
    sends nothing; that release restores it.
    """
    raw = conn._con
    reset = raw.get_reset_query()
    if raw._top_xact is tx:
        raw._top_xact = None
    await raw.execute(f"COMMIT;\n{reset}" if reset else "COMMIT;")
    raw._reset_query = ""


def _mark_if_closed(conn: Any, exc: BaseException) -> None:
    """Mark *exc* as a database outage when *conn* died under it.

    After the server sends a fatal error and hangs up, asyncpg reports the next
    use as "another operation is in progress" or "the underlying connection is
    closed", which say nothing of an outage by themselves.
    """
    try:
        closed = bool(conn.is_closed())
    except Exception:  # noqa: BLE001 - a connection already handed back: nothing to tell
        return
    if closed and isinstance(exc, Exception) and outage_of(exc) is None:
        mark_outage(exc, "database")


def _forget_failed_start(conn: Any, tx: Any) -> None:
    """Clear asyncpg's record of a transaction whose BEGIN was cancelled.

    asyncpg marks the connection's top transaction before BEGIN is sent and does
    not unmark it when BEGIN is cancelled, so the pool's reset would later log
    "Resetting connection with an active transaction" for a connection we have
    already rolled back. (Private attribute; ignored when it is not there.)
    """
    raw = getattr(conn, "_con", conn)
    if getattr(raw, "_top_xact", None) is tx:
        raw._top_xact = None


def _terminate_pool(pool: Any) -> None:
    pool.terminate()


def _terminate_connection(conn: Any) -> None:
    # Terminating a pool connection hands its slot back to the pool, which opens
    # a fresh connection on the next acquire. A proxy already handed back raises.
    try:
        conn.terminate()
    except Exception:  # noqa: BLE001 - nothing left to terminate
        return
