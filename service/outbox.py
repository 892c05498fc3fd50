"""The transactional outbox: events are rows written in the business transaction,
and a relay publishes them to RabbitMQ afterwards.

* A route writes the event row in the same transaction as the item, so an item
  rolled back publishes nothing and an item committed always has its event.
* The relay publishes unsent rows with publisher confirms and marks them sent in
  the transaction that selected them (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so
  replicas share the work). A crash after the publish and before that commit
  publishes the row again: delivery is at least once, and every copy carries the
  row's id as ``message_id`` for consumers to de-duplicate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scoped_resources.adapters.rabbitmq import ChannelPool

from .database import write_connection
from .signals import Wakeup
from .tables import outbox

logger = logging.getLogger("service.outbox")

ITEM_CREATED = "item.created"


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


class OutboxRelay:
    """Publishes unsent outbox rows in a task of its own until closed."""

    def __init__(
        self,
        engine: AsyncEngine,
        channels: ChannelPool,
        wakeup: Wakeup,
        *,
        exchange: str,
        poll_seconds: float,
        batch: int = 100,
    ) -> None:
        self._engine = engine
        self._channels = channels
        self._wakeup = wakeup
        self._exchange_name = exchange
        self._poll = poll_seconds
        self._batch = batch
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        #: Events published by this relay (for tests and metrics).
        self.published = 0
        self.last_error: BaseException | None = None

    async def __aenter__(self) -> OutboxRelay:
        # Declare the exchange once up front: a broker that refuses it fails start-up.
        channel = await self._channels.acquire()
        try:
            await self._declare(channel)
        finally:
            await self._channels.release(channel, reuse=True)
        self._task = asyncio.create_task(self._run(), name="service: outbox relay")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stopping = True
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

    async def _declare(self, channel: aio_pika.abc.AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(
            self._exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                sent = await self.relay_once()
            except Exception as exc:  # noqa: BLE001 - logged; the relay must outlive an outage
                self.last_error = exc
                logger.warning("outbox relay: publishing failed, retrying: %s", exc)
                await self._wakeup.wait(backoff)
                backoff = min(backoff * 2, self._poll)
                continue
            backoff = 0.1
            if sent < self._batch:
                await self._wakeup.wait(self._poll)

    async def relay_once(self) -> int:
        """Publish one batch of unsent events and mark them sent; return how many."""
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
                channel = await self._channels.acquire()
                ok = False
                try:
                    exchange = await self._declare(channel)
                    for row in rows:
                        await exchange.publish(
                            aio_pika.Message(
                                row.payload.encode(),
                                message_id=row.id,
                                type=row.topic,
                                content_type="application/json",
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            ),
                            routing_key=row.topic,
                        )
                    ok = True
                finally:
                    await self._channels.release(channel, reuse=ok)
                await conn.execute(
                    update(outbox)
                    .where(outbox.c.id.in_([row.id for row in rows]))
                    .values(sent_at=datetime.now(UTC))
                )
        self.published += len(rows)
        return len(rows)
