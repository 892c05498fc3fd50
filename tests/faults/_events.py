"""A consumer of the service's events: a durable queue of the test's own on the exchange.

The queue is durable and its messages persistent, so it keeps what the relay
published across a broker restart. Each operation opens a connection of its own
(none is held across an outage). Once the outbox has no unsent row, every copy
the relay published has been confirmed by the broker, so it is in the queue:
:meth:`EventQueue.drain` then reads the queue until it is empty, with no waiting.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aio_pika

from ._harness import fetchval, probe

TOPIC = "item.created"
MAX_MESSAGES = 100_000


@dataclass(frozen=True)
class Event:
    """One delivered copy of an event."""

    message_id: str
    item_id: int
    name: str
    publisher: str | None


@dataclass
class Delivered:
    """Every copy the queue received, in order."""

    events: list[Event] = field(default_factory=list)

    @property
    def ids(self) -> set[str]:
        """The distinct event ids."""
        return {e.message_id for e in self.events}

    @property
    def duplicates(self) -> int:
        """Copies beyond the first of each event id."""
        return len(self.events) - len(self.ids)

    def ids_per_item(self) -> dict[int, set[str]]:
        """The distinct event ids delivered for each item id."""
        found: dict[int, set[str]] = {}
        for event in self.events:
            found.setdefault(event.item_id, set()).add(event.message_id)
        return found

    def publishers(self) -> dict[str, int]:
        """How many copies each relay (``app_id``) published."""
        return dict(Counter(e.publisher or "?" for e in self.events))


class EventQueue:
    """A durable queue bound to *exchange* for ``item.created``; deleted by :func:`event_queue`."""

    def __init__(self, amqp_url: str, exchange: str) -> None:
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.name = f"sr-faults-events-{uuid.uuid4().hex[:12]}"

    async def declare(self) -> None:
        """Declare the exchange (as the relay does) and the queue, and bind them."""
        conn = await aio_pika.connect(self.amqp_url)
        try:
            channel = await conn.channel()
            exchange = await channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(self.name, durable=True)
            await queue.bind(exchange, routing_key=TOPIC)
        finally:
            await conn.close()

    async def drain(self) -> Delivered:
        """Every message now in the queue (acknowledged, so taken out of it)."""
        delivered = Delivered()
        conn = await aio_pika.connect(self.amqp_url)
        try:
            channel = await conn.channel()
            queue = await channel.declare_queue(self.name, durable=True, passive=True)
            for _ in range(MAX_MESSAGES):
                message = await queue.get(fail=False, timeout=10)
                if message is None:
                    break
                body = json.loads(message.body)
                assert message.message_id is not None, "an event without a message id"
                delivered.events.append(
                    Event(message.message_id, int(body["id"]), str(body["name"]), message.app_id)
                )
                await message.ack()
        finally:
            await conn.close()
        return delivered

    async def delete(self) -> None:
        """Delete the queue and the exchange."""
        conn = await aio_pika.connect(self.amqp_url)
        try:
            channel = await conn.channel()
            await channel.queue_delete(self.name)
            await channel.exchange_delete(self.exchange)
        finally:
            await conn.close()


@asynccontextmanager
async def event_queue(amqp_url: str) -> AsyncIterator[EventQueue]:
    """A fresh exchange name and a queue on it, declared; both deleted afterwards."""
    queue = EventQueue(amqp_url, f"sr-faults-{uuid.uuid4().hex[:12]}")
    await queue.declare()
    try:
        yield queue
    finally:
        await queue.delete()


async def unsent(dsn: str) -> int:
    """How many outbox rows are not yet marked sent."""
    return int(await fetchval(dsn, "SELECT count(*) FROM outbox WHERE sent_at IS NULL"))


async def outbox_items(dsn: str) -> dict[str, int]:
    """Every outbox row's event id and the item id in its payload."""
    conn = await probe(dsn)
    try:
        rows = await conn.fetch("SELECT id, payload FROM outbox")
    finally:
        await conn.close()
    return {str(r["id"]): int(json.loads(r["payload"])["id"]) for r in rows}
