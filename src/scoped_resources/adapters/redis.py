"""Redis through ``redis.asyncio``: one pooled client per app, pipelines and pub/sub per request.

============================  ==========================================================
guarantee                     how
============================  ==========================================================
bounded pool                  a ``BlockingConnectionPool`` of *max_connections*
pool exhaustion is typed      a command that waits longer than *acquire_timeout* for a
                              connection raises :class:`~scoped_resources.exceptions.
                              ResourceBusy` naming the resource (HTTP 503 with the
                              handler below), never a bare ``ConnectionError``
cancelled commands are safe   redis-py disconnects a connection whose command was
                              cancelled, so no stale reply is read by the next user
writes are bounded            a command the socket takes at once is written directly
                              (no task per command); one left buffered because the
                              server stopped reading fails after *socket_timeout*
pipelines never leak          ``.pipeline`` is reset on release (its connection goes
                              back, WATCHes are dropped); queued commands that were
                              never executed fail the request instead of vanishing
pub/sub is closed             ``.pubsub`` is closed with ``aclose()`` on release
shutdown is bounded           ``aclose()`` under *release_timeout*, then every pooled
                              connection is disconnected
no secrets in errors          the URL is shown redacted in ``repr`` and messages
============================  ==========================================================

Migrating from the tutorial's ``aioredis`` code
-----------------------------------------------
``import aioredis`` fails on Python 3.11+ (it was merged into redis-py as
``redis.asyncio``). ``await aioredis.from_url(url)`` becomes the synchronous
``redis.asyncio.Redis.from_url(url)``, ``close()`` becomes ``aclose()``, and the
client belongs in the app scope, not in every request::

    resources = Resources()
    cache = Redis(resources, "redis://localhost")

    @app.post("/cache/{key}")
    async def set_cache(key: str, value: str, r: Annotated[redis.asyncio.Redis, Use(cache.client)]):
        await r.set(key, value, ex=3600)

A pool exhausted inside a route raises ``ResourceBusy``, which the FastAPI
integration answers with 503 and ``Retry-After``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import redis.asyncio
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.connection import (
    AbstractConnection,
    BlockingConnectionPool,
    Connection,
    ConnectionPool,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._registry import Resources
from .._resource import Resource
from ..exceptions import ResourceBusy
from ..fastapi import Use
from ._common import bounded, redact
from ._gate import Gate

__all__ = ["BusyAwarePool", "Redis", "UnexecutedPipelineError"]


class UnexecutedPipelineError(RuntimeError):
    """Raised when a request ends successfully with pipeline commands never executed.

    Call ``await pipe.execute()`` before the route returns, or ``await pipe.reset()``
    to drop the commands on purpose.
    """


class BusyAwarePool(BlockingConnectionPool):
    """A ``BlockingConnectionPool`` that raises ResourceBusy when it is exhausted.

    redis-py reports a wait past the pool's ``timeout`` as ``ConnectionError("No
    connection available.")`` caused by a ``TimeoutError``; that exact case is
    translated, every other connection error passes through.
    """

    resource_name: str = "redis"
    #: Admission in front of the pool (set by :class:`Redis`): arrival order, and a
    #: refusal at once when the wait cannot end within the pool's timeout.
    gate: Gate | None = None
    _tickets: dict[int, int]
    #: Set when the owning client closed: connections are no longer lent, and any
    #: connection handed back late (by a lease outliving shutdown) is disconnected.
    closed: bool = False
    #: Lend and take back connections directly (see :meth:`_can_lend_directly`).
    _direct: bool = False

    def _can_lend_directly(self) -> bool:
        """Whether connections can be lent without redis-py's pool lock, event and metrics.

        Behind the gate a lend never waits for the pool, and the pool's lock guards
        only steps that do not await. What else the pool does per command is for
        features this pool does not use: re-authenticating with a streaming
        credential provider (on the release event) and redis-py's OpenTelemetry
        pool metrics. So with neither configured when the client opens, and the
        pool's lists laid out as expected, a lend is ``get_available_connection``
        plus ``ensure_connection`` (the same health check), and a release puts the
        connection back as the pool would. Otherwise the pool's own methods run.
        """
        try:
            from redis.asyncio.observability.recorder import _get_or_create_collector
        except ImportError:  # pragma: no cover - a redis-py without pool metrics
            metrics = None
        else:
            metrics = _get_or_create_collector()
        return (
            self.gate is not None
            and self.connection_kwargs.get("credential_provider") is None
            and metrics is None
            and isinstance(getattr(self, "_available_connections", None), list)
            and hasattr(getattr(self, "_in_use_connections", None), "remove")
        )

    async def get_connection(
        self, command_name: Any = None, *keys: Any, **options: Any
    ) -> Connection:
        if self.closed:
            raise RuntimeError(
                f"resource {self.resource_name!r} is closed (the app shut down); "
                "use it only while its app scope is open"
            )
        gate = self.gate
        ticket = None if gate is None else await gate.acquire()
        # The arguments are deprecated and unused by redis-py; never forward them.
        try:
            if gate is None:
                conn = cast(Connection, await super().get_connection())  # type: ignore[no-untyped-call]
            else:
                # The gate lent a slot, so a connection is free or may be made: take it
                # as the plain pool does, without the blocking pool's condition and
                # timeout (a loop timer per command) around a wait that cannot happen.
                conn = await self._lend() if self._direct else cast(
                    Connection,
                    await ConnectionPool.get_connection(self),  # type: ignore[no-untyped-call]
                )
        except BaseException as exc:
            if gate is not None and ticket is not None:
                gate.release(ticket, record=False)
            if isinstance(exc, RedisConnectionError) and isinstance(
                exc.__cause__, TimeoutError | asyncio.TimeoutError
            ):
                raise ResourceBusy(self.resource_name, float(self.timeout or 0.0)) from None
            raise
        if ticket is not None:
            self.__dict__.setdefault("_tickets", {})[id(conn)] = ticket
        return conn

    async def _lend(self) -> Connection:
        conn = cast(Connection, self.get_available_connection())  # type: ignore[no-untyped-call]
        try:
            await self.ensure_connection(conn)
        except BaseException:
            await self._take_back(conn)
            raise
        return conn

    async def _take_back(self, conn: Connection) -> None:
        try:
            if conn.should_reconnect():  # type: ignore[no-untyped-call]
                await conn.disconnect()
        finally:
            # Even when the disconnect failed or was cancelled: the next lend of it
            # checks it (ensure_connection). No await between the two, so no other
            # lend sees the connection in neither list.
            self._in_use_connections.remove(conn)
            self._available_connections.append(conn)

    async def release(self, connection: Connection) -> None:  # type: ignore[override]
        try:
            if self.closed:
                await connection.disconnect()
            if self.gate is None:
                await super().release(connection)
            elif self._direct:
                await self._take_back(connection)
            else:
                # Nobody waits on the blocking pool's condition: the gate's waiters do.
                await ConnectionPool.release(self, connection)
        finally:
            ticket = self.__dict__.get("_tickets", {}).pop(id(connection), None)
            if ticket is not None and self.gate is not None:
                self.gate.release(ticket)


class _PromptWrite(AbstractConnection):
    """Writes a command without a task of its own when the socket takes it at once.

    redis-py bounds every write with ``asyncio.wait_for``, which on Python 3.11
    runs the write in a task of its own: a task, a timer and two more turns of
    the event loop per command. A command the socket takes at once cannot wait,
    so it needs no bound; a write left buffered (the server stopped reading) is
    waited for within ``socket_timeout``, as redis-py does. redis-py's own path
    runs for anything else: a connection not yet made, a health check due, no
    ``socket_timeout``, a command given as ``str`` or ``bytes``. A failed write
    ends as redis-py's does: the connection is closed, and the bound running out
    raises redis-py's ``TimeoutError``, a socket error its ``ConnectionError``.
    """

    async def send_packed_command(
        self, command: str | bytes | Iterable[bytes], check_health: bool = True
    ) -> None:
        writer = self._writer
        timeout = self.socket_timeout
        if (
            writer is None
            or self._reader is None
            or not timeout
            or (check_health and self.health_check_interval)
            or not isinstance(command, list)
        ):
            await super().send_packed_command(command, check_health)
            return
        try:
            # One write() per chunk, not writelines(). The selector transport's
            # writelines() of Python 3.12 and 3.13 before CPython's fix for gh-127655
            # (seen on 3.12.1 and 3.13.0) never pauses the protocol, so drain() does
            # not wait for a buffer past its high-water mark; and on a connection
            # just lost it registers a writer for the closed socket's descriptor,
            # which the next socket to get that number then never sees connect.
            # write() does neither. A command is one chunk unless it carries a
            # value too big to be copied into it.
            for chunk in command:
                writer.write(chunk)
            transport = writer.transport
            if transport.get_write_buffer_size() or transport.is_closing():
                async with asyncio.timeout(timeout):
                    await writer.drain()
        except OSError as err:
            await self.disconnect(nowait=True)
            if isinstance(err, TimeoutError) and err.errno is None:  # the bound above
                raise RedisTimeoutError("Timeout writing to socket") from None
            # A socket error, ETIMEDOUT from the OS included: the connection is dead.
            raise RedisConnectionError(
                f"Error {err.errno or 'UNKNOWN'} while writing to socket. {err.strerror or err}."
            ) from err
        except BaseException:
            await self.disconnect(nowait=True)
            raise


_prompt_classes: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _prompt(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """*cls* with :class:`_PromptWrite`'s send, unless it sends in its own way."""
    if cls.send_packed_command is not AbstractConnection.send_packed_command:
        return cls
    prompt = _prompt_classes.get(cls)
    if prompt is None:
        prompt = _prompt_classes[cls] = type(cls.__name__, (_PromptWrite, cls), {})
    return prompt


class Redis:
    """The Redis resources of one app: ``.client``, ``.pipeline`` and ``.pubsub``.

    ``.client`` is app-scoped (a ``redis.asyncio.Redis`` on a bounded pool, pinged
    for readiness); ``.pipeline`` and ``.pubsub`` are request leases made from it.
    Extra keyword arguments go to ``BlockingConnectionPool.from_url``.
    """

    def __init__(
        self,
        resources: Resources,
        url: str,
        *,
        name: str = "redis",
        max_connections: int = 10,
        acquire_timeout: float = 5.0,
        socket_timeout: float = 5.0,
        ping_timeout: float = 2.0,
        release_timeout: float = 5.0,
        transaction: bool = True,
        shed: bool = True,
        **kwargs: Any,
    ) -> None:
        self.name = name
        self.url = url
        self.max_connections = max_connections
        self.acquire_timeout = acquire_timeout
        self.socket_timeout = socket_timeout
        self.ping_timeout = ping_timeout
        self.release_timeout = release_timeout
        self.transaction = transaction
        self._kwargs = kwargs
        #: Admission to the connection pool (capacity *max_connections*): arrival
        #: order, and a refusal at once when the wait cannot end within acquire_timeout.
        self.gate = Gate(name, max_connections, timeout=acquire_timeout, shed=shed)

        self.client: Resource[redis.asyncio.Redis] = resources.app(
            name=name,
            release_timeout=release_timeout,
            terminate=self._terminate,
            ping=self._ping,
        )(self._open_client)
        client = self.client

        async def reset(pipe: Pipeline) -> None:
            pool = pipe.connection_pool
            if isinstance(pool, BusyAwarePool) and pool.closed and pipe.connection is not None:
                # The app shut down with this lease out: UNWATCH would reconnect.
                await pipe.connection.disconnect()
                pipe.watching = False
            await pipe.reset()  # type: ignore[no-untyped-call]

        async def pipeline(
            r: redis.asyncio.Redis = Use(client),
        ) -> AsyncIterator[Pipeline]:
            pipe = r.pipeline(transaction=transaction)
            try:
                yield pipe
            except BaseException:
                await reset(pipe)
                raise
            pending = len(pipe.command_stack)
            await reset(pipe)
            if pending:
                raise UnexecutedPipelineError(
                    f"resource {name}.pipeline: {pending} queued command(s) were never "
                    "executed; call 'await pipe.execute()' before returning, or "
                    "'await pipe.reset()' to drop them"
                )

        async def pubsub(
            r: redis.asyncio.Redis = Use(client),
        ) -> AsyncIterator[PubSub]:
            ps = r.pubsub()
            try:
                yield ps
            finally:
                # Typed from redis-py 8.2 on; untyped before.
                await ps.aclose()  # type: ignore[no-untyped-call, unused-ignore]

        self.pipeline: Resource[Pipeline] = resources.request(
            name=f"{name}.pipeline",
            acquire_timeout=acquire_timeout,
            release_timeout=release_timeout,
        )(pipeline)
        self.pubsub: Resource[PubSub] = resources.request(
            name=f"{name}.pubsub",
            acquire_timeout=acquire_timeout,
            release_timeout=release_timeout,
            terminate=_close_pubsub_connection,
        )(pubsub)

    def __repr__(self) -> str:
        return f"<Redis {self.name!r} {redact(self.url)} max_connections={self.max_connections}>"

    async def _open_client(self) -> AsyncIterator[redis.asyncio.Redis]:
        pool = BusyAwarePool.from_url(
            self.url,
            max_connections=self.max_connections,
            timeout=self.acquire_timeout,
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.socket_timeout,
            **self._kwargs,
        )
        pool.resource_name = self.name
        pool.connection_class = _prompt(pool.connection_class)
        pool.gate = self.gate
        pool._direct = pool._can_lend_directly()
        client = redis.asyncio.Redis.from_pool(pool)  # the client owns (and closes) the pool
        try:
            yield client
        finally:
            pool.closed = True
            await client.aclose()

    async def _ping(self, client: redis.asyncio.Redis) -> None:
        await bounded(self.name, client.ping(), self.ping_timeout)

    async def _terminate(self, client: redis.asyncio.Redis) -> None:
        await client.connection_pool.disconnect(inuse_connections=True)


async def _close_pubsub_connection(ps: PubSub) -> None:
    if ps.connection is not None:
        await ps.connection.disconnect()
