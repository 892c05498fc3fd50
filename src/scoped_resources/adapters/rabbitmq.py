"""RabbitMQ through ``aio-pika``: one robust connection per app, channels leased per request.

==============================  ======================================================
guarantee                       how
==============================  ======================================================
one connection                  ``.connection`` is app-scoped (``connect_robust``,
                                reconnects by itself), pinged by opening a channel,
                                closed at shutdown under *release_timeout*; a first
                                connect that fails or is cancelled (the open's
                                deadline, a sibling's failed start-up) closes it too
bounded channels                at most *channels* channels leased at once; a lease
                                that waits longer than *acquire_timeout* raises
                                :class:`~scoped_resources.exceptions.ResourceBusy`
                                (aio-pika's own ``Pool`` waits forever)
no dirty channel is reused      a channel comes back to the pool only when the
                                request succeeded and the channel is still open;
                                otherwise it is closed and a fresh one is opened
                                on demand (a broker-closed channel is never lent)
publisher confirms              on by default: ``publish`` returns after the broker
                                confirmed the message
cancel-safe                     a cancel while a channel opens closes it and frees
                                its slot; releases are shielded and bounded
no secrets in errors            ``repr`` and messages show the URL redacted
==============================  ======================================================
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import anyio
from aio_pika.abc import AbstractChannel, AbstractRobustConnection, TimeoutType

from .._registry import Resources
from .._resource import Resource
from ..exceptions import ResourceBusy
from ..fastapi import Use
from ._common import redact, scrub, secrets_of
from ._gate import Gate

__all__ = ["ChannelPool", "RabbitMQ"]

#: How long closing a connection whose first connect failed may take (seconds).
_ABANDON_TIMEOUT = 5.0


class _RobustConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, closed when its first connect fails or is cancelled.

    aio-pika starts the task that (re)connects before the first connect returns,
    and nothing stops it when that connect is cancelled: the connection would go
    on connecting in the background, with no owner to close it.
    """

    _connected_once = False

    async def connect(self, timeout: TimeoutType = None) -> None:
        if self._connected_once:
            await super().connect(timeout)
            return
        try:
            await super().connect(timeout)
        except BaseException:
            with anyio.move_on_after(_ABANDON_TIMEOUT, shield=True):
                await self.close()
            raise
        self._connected_once = True


class ChannelPool:
    """A bounded pool of channels on one connection, with an acquire deadline.

    ``await pool.acquire()`` lends a channel (reusing an idle open one, else
    opening one); ``await pool.release(channel, reuse=...)`` takes it back, closing
    it unless it is clean and open.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        *,
        name: str,
        size: int,
        acquire_timeout: float | None,
        publisher_confirms: bool,
        close_timeout: float,
        shed: bool = True,
    ) -> None:
        self.name = name
        self.size = size
        self.acquire_timeout = acquire_timeout
        self._connection = connection
        self._confirms = publisher_confirms
        self._close_timeout = close_timeout
        #: Admission to the channels: arrival order, and a refusal at once when the
        #: wait cannot end within acquire_timeout (``shed=False``: deadline only).
        self.gate = Gate(name, size, timeout=acquire_timeout, shed=shed)
        self._tickets: dict[int, int] = {}
        self._idle: list[AbstractChannel] = []
        self._closed = False
        #: Channels opened over the pool's life (to see reuse and replacement).
        self.opened = 0

    @property
    def free_slots(self) -> int:
        """How many more channels could be leased now."""
        stats = self.gate.stats()
        return stats.capacity - stats.in_use

    async def acquire(self) -> AbstractChannel:
        """Lend a channel; ResourceBusy past the acquire deadline."""
        if self._closed:
            raise RuntimeError(f"channel pool {self.name!r} is closed; the app is shutting down")
        started = anyio.current_time()
        ticket = await self.gate.acquire()
        try:
            left = None
            if self.acquire_timeout is not None:
                left = max(0.0, self.acquire_timeout - (anyio.current_time() - started))
            try:
                with anyio.fail_after(left):
                    # While the robust connection reconnects, wait (within the deadline).
                    await self._connection.ready()
            except TimeoutError:
                raise ResourceBusy(self.name, self.acquire_timeout or 0.0) from None
            channel = None
            while self._idle and channel is None:
                idle = self._idle.pop()
                if not idle.is_closed:
                    channel = idle
            if channel is None:
                channel = await self._open_channel()
        except BaseException:
            self.gate.release(ticket, record=False)
            raise
        self._tickets[id(channel)] = ticket
        return channel

    async def _open_channel(self) -> AbstractChannel:
        channel = self._connection.channel(publisher_confirms=self._confirms)
        try:
            await channel.initialize(timeout=self.acquire_timeout)
        except BaseException:
            await self._close(channel)
            raise
        self.opened += 1
        return channel

    async def release(self, channel: AbstractChannel, *, reuse: bool) -> None:
        """Take *channel* back: keep it if *reuse* and open, else close it."""
        try:
            if reuse and not channel.is_closed and not self._closed:
                self._idle.append(channel)
            else:
                await self._close(channel)
        finally:
            ticket = self._tickets.pop(id(channel), None)
            if ticket is not None:
                self.gate.release(ticket)

    async def _close(self, channel: AbstractChannel) -> None:
        with anyio.move_on_after(self._close_timeout, shield=True):
            if not channel.is_closed:
                await channel.close()

    async def aclose(self) -> None:
        """Close the idle channels; leased ones close with the connection."""
        self._closed = True
        while self._idle:
            await self._close(self._idle.pop())


class RabbitMQ:
    """The RabbitMQ resources of one app: ``.connection``, ``.channels``, ``.channel``.

    ``.connection`` (app) is a robust connection; ``.channels`` (app) the bounded
    channel pool; ``.channel`` (request) one channel leased from it. Extra
    keyword arguments go to ``aio_pika.connect_robust``.
    """

    def __init__(
        self,
        resources: Resources,
        url: str,
        *,
        name: str = "rabbitmq",
        channels: int = 10,
        acquire_timeout: float = 5.0,
        publisher_confirms: bool = True,
        connect_timeout: float = 10.0,
        release_timeout: float = 5.0,
        ping_timeout: float = 2.0,
        shed: bool = True,
        **connect_kwargs: Any,
    ) -> None:
        self.name = name
        self.url = url
        self.channels_size = channels
        self.acquire_timeout = acquire_timeout
        self.publisher_confirms = publisher_confirms
        self.connect_timeout = connect_timeout
        self.release_timeout = release_timeout
        self.ping_timeout = ping_timeout
        self._connect_kwargs = connect_kwargs

        self.connection: Resource[AbstractRobustConnection] = resources.app(
            name=name,
            timeout=connect_timeout,
            release_timeout=release_timeout,
            ping=self._ping,
        )(self._open_connection)
        connection = self.connection

        async def channel_pool(
            conn: AbstractRobustConnection = Use(connection),
        ) -> AsyncIterator[ChannelPool]:
            pool = ChannelPool(
                conn,
                name=f"{name}.channel",
                size=channels,
                acquire_timeout=acquire_timeout,
                publisher_confirms=publisher_confirms,
                close_timeout=release_timeout,
                shed=shed,
            )
            try:
                yield pool
            finally:
                await pool.aclose()

        self.channels: Resource[ChannelPool] = resources.app(
            name=f"{name}.channels", release_timeout=release_timeout
        )(channel_pool)
        pool_resource = self.channels

        async def channel(
            pool: ChannelPool = Use(pool_resource),
        ) -> AsyncIterator[AbstractChannel]:
            lent = await pool.acquire()
            try:
                yield lent
            except BaseException:
                await pool.release(lent, reuse=False)
                raise
            await pool.release(lent, reuse=True)

        # The pool applies the acquire deadline itself (naming the channel lease).
        self.channel: Resource[AbstractChannel] = resources.request(
            name=f"{name}.channel", acquire_timeout=None, release_timeout=release_timeout
        )(channel)

    def __repr__(self) -> str:
        return f"<RabbitMQ {self.name!r} {redact(self.url)} channels={self.channels_size}>"

    async def _open_connection(self) -> AsyncIterator[AbstractRobustConnection]:
        try:
            conn = await aio_pika.connect_robust(
                self.url,
                timeout=self.connect_timeout,
                connection_class=_RobustConnection,
                **self._connect_kwargs,
            )
        except Exception as exc:  # noqa: BLE001 - re-raised without the unredacted text
            # aio-pika's messages can carry the URL: shown scrubbed of the password.
            reason = scrub(str(exc), secrets_of(self.url))
            raise ConnectionError(
                f"resource {self.name!r}: cannot connect to {redact(self.url)}: "
                f"{type(exc).__name__}" + (f": {reason}" if reason else "")
            ) from None
        try:
            yield conn
        finally:
            with anyio.move_on_after(self.release_timeout, shield=True):
                await conn.close()

    async def _ping(self, conn: AbstractRobustConnection) -> None:
        if conn.is_closed:
            raise ConnectionError(f"resource {self.name!r}: the connection is closed")
        channel = conn.channel(publisher_confirms=False)
        with anyio.fail_after(self.ping_timeout):
            await channel.initialize(timeout=self.ping_timeout)
        with anyio.move_on_after(self.ping_timeout, shield=True):
            await channel.close()
