"""The transactional outbox: events are rows written in the business transaction,
and a relay publishes them to RabbitMQ afterwards.

* A route writes the event row in the same transaction as the item, so an item
  rolled back publishes nothing and an item committed always has its event. The
  row's id, made at INSERT time, is the event id: every copy of the event carries
  it as ``message_id``.
* The relay claims a batch of unsent rows with ``SELECT ... FOR UPDATE SKIP
  LOCKED`` in a transaction, publishes them with publisher confirms and marks them
  sent in that same transaction. Rows claimed by one replica's relay are locked
  until it commits (or dies, when PostgreSQL rolls its transaction back), so two
  relays never publish the same row at the same time; the other relay skips them
  instead of waiting.
* A crash after the COMMIT of the item and before the publish leaves the row
  unsent: the next relay to look (another replica's, or this one's after a
  restart) publishes it. A crash after the publish and before the "sent" mark
  publishes it again: delivery is at least once, and consumers de-duplicate by
  ``message_id``.
* When the broker (or the database) is unavailable, the relay keeps the events
  in the table and retries with a capped exponential backoff. It logs one warning
  when publishing starts failing and one when it works again, never one per
  attempt (the broker client's own per-attempt messages are demoted to DEBUG);
  the routes keep committing items meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scoped_resources.adapters.rabbitmq import ChannelPool

from .database import write_connection
from .signals import Wakeup
from .tables import outbox

logger = logging.getLogger("service.outbox")

ITEM_CREATED = "item.created"
#: First and longest pause between two attempts while publishing fails.
RETRY_FIRST = 0.2
RETRY_MAX = 5.0


async def add_event(conn: AsyncConnection, topic: str, payload: dict[str, Any]) -> str:
    """Write an event row in *conn*'s transaction; return its id (the message id)."""
    event_id = str(uuid.uuid4())
    await conn.execute(
        outbox.insert().values(
            id=event_id,
            topic=topic,
            payload=json.dumps(payload, separators=(",", ":")),
            created_at=datetime.now(UTC),
        )
    )
    return event_id


def default_relay_name() -> str:
    """``host:pid``: which process published an event (the messages' ``app_id``)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _ReconnectNoise(logging.Filter):
    """Demotes the broker client's per-attempt reconnect messages to DEBUG.

    aiormq and aio-pika log an ERROR (one with a traceback) when the broker
    closes the connection, and two lines per reconnect attempt; the relay already
    reports the outage once when it starts and once when it ends. Where DEBUG is
    enabled the records are still logged, at DEBUG.
    """

    _MESSAGES = (
        "error when creating transport",
        "Unexpected connection close from remote",
        "Cancelling cause reader exited abnormally",
        "Connection attempt to",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        reconnect = message.startswith(self._MESSAGES) or (
            message.startswith("Callback %r error")
            and isinstance(record.args, tuple)
            and "RobustChannel._on_close" in repr(record.args[0])
        )
        if not reconnect or record.levelno <= logging.DEBUG:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        # The level check ran before this filter: apply it again at the new level.
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_RECONNECT_LOGGERS = ("aiormq.connection", "aio_pika.robust_connection", "aio_pika.tools")


def quiet_broker_reconnects() -> None:
    """Install :class:`_ReconnectNoise` on the broker client's loggers (once)."""
    for name in _RECONNECT_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, _ReconnectNoise) for f in target.filters):
            target.addFilter(_ReconnectNoise())


def _describe(exc: BaseException) -> str:
    # A batch's publishes fail together: name the first cause, not the group.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


class OutboxRelay:
    """Publishes unsent outbox rows in a task of its own until closed.

    *linger_seconds* is how long the relay waits after a wake-up before it
    publishes, so that events committed close together leave in one batch.
    *publish_timeout* bounds each publish (the broker's confirm included).
    Every message carries *name* as its ``app_id``.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        channels: ChannelPool,
        wakeup: Wakeup,
        *,
        exchange: str,
        poll_seconds: float,
        batch: int = 100,
        linger_seconds: float = 0.0,
        publish_timeout: float = 5.0,
        name: str | None = None,
    ) -> None:
        self._engine = engine
        self._channels = channels
        self._wakeup = wakeup
        self._exchange_name = exchange
        self._poll = poll_seconds
        self._batch = batch
        self._linger = linger_seconds
        self._publish_timeout = publish_timeout
        self.name = name or default_relay_name()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._failing_since: float | None = None
        #: Events published by this relay (for tests and metrics).
        self.published = 0
        #: Outages seen (publishing failed, then worked again or the relay stopped).
        self.outages = 0
        self.last_error: BaseException | None = None

    async def __aenter__(self) -> OutboxRelay:
        quiet_broker_reconnects()
        # Declare the exchange once up front: a broker that refuses it fails start-up.
        channel = await self._channels.acquire()
        try:
            await self._declare(channel)
        finally:
            await self._channels.release(channel, reuse=True)
        self._task = asyncio.create_task(self._run(), name="service: outbox relay")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._wakeup.set()
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), 5.0)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @property
    def running(self) -> bool:
        """True while the relay's task is alive."""
        return self._task is not None and not self._task.done()

    @property
    def failing(self) -> bool:
        """True while publishing fails (an outage of the broker or the database)."""
        return self._failing_since is not None

    async def _declare(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(
            self._exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def _pause(self, seconds: float) -> None:
        """Sleep *seconds*, or less when the relay is being stopped (not woken by routes)."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            return

    async def _run(self) -> None:
        retry = RETRY_FIRST
        while not self._stop.is_set():
            try:
                sent = await self.relay_once()
            except Exception as exc:  # noqa: BLE001 - logged once; the relay must outlive an outage
                self._failed(exc)
                # Not woken by new events: during an outage every POST would retry at once.
                await self._pause(retry)
                retry = min(retry * 2, RETRY_MAX)
                continue
            self._recovered()
            retry = RETRY_FIRST
            if sent < self._batch:
                await self._wakeup.wait(self._poll)
                if self._linger and not self._stop.is_set():
                    await self._pause(self._linger)
        if self._failing_since is not None:
            self.outages += 1

    def _failed(self, exc: Exception) -> None:
        self.last_error = exc
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            logger.warning(
                "outbox relay %s: cannot publish events (%s); they stay in the outbox,"
                " retrying every %.0f s at most",
                self.name,
                _describe(exc),
                RETRY_MAX,
            )

    def _recovered(self) -> None:
        if self._failing_since is None:
            return
        lasted = time.monotonic() - self._failing_since
        self._failing_since = None
        self.outages += 1
        logger.warning("outbox relay %s: publishing again after %.1f s", self.name, lasted)

    async def relay_once(self) -> int:
        """Publish one batch of unsent events and mark them sent; return how many."""
        # The channel first: while the broker is away this waits without holding a
        # database connection or row locks.
        channel = await self._channels.acquire()
        ok = False
        try:
            exchange = await self._declare(channel)
            sent = await self._publish_batch(exchange)
            ok = True
        finally:
            await self._channels.release(channel, reuse=ok)
        self.published += sent
        return sent

    async def _publish_batch(self, exchange: AbstractExchange) -> int:
        async with self._engine.connect() as conn:
            await write_connection(conn)
            async with conn.begin():
                rows = (
                    await conn.execute(
                        select(outbox.c.id, outbox.c.topic, outbox.c.payload)
                        .where(outbox.c.sent_at.is_(None))
                        .order_by(outbox.c.created_at, outbox.c.id)
                        .limit(self._batch)
                        .with_for_update(skip_locked=True)
                    )
                ).all()
                if not rows:
                    return 0
                # All at once: the broker's confirms come back pipelined, not one
                # round trip per event. One failure cancels the rest and rolls back.
                async with asyncio.TaskGroup() as publishing:
                    for row in rows:
                        publishing.create_task(
                            exchange.publish(
                                aio_pika.Message(
                                    row.payload.encode(),
                                    message_id=row.id,
                                    type=row.topic,
                                    app_id=self.name,
                                    content_type="application/json",
                                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                ),
                                routing_key=row.topic,
                                timeout=self._publish_timeout,
                            )
                        )
                await conn.execute(
                    update(outbox)
                    .where(outbox.c.id.in_([row.id for row in rows]))
                    .values(sent_at=datetime.now(UTC))
                )
        return len(rows)
