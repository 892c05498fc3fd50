"""Events through the transactional outbox: on SQLite and on PostgreSQL, with RabbitMQ."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import anyio
import pytest
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy import text

from service import Settings

from .conftest import Running, SettingsFactory, running, scalar

pytestmark = pytest.mark.anyio

NextEvent = Callable[[], Awaitable[AbstractIncomingMessage]]


@pytest.fixture
def settings(make_settings: SettingsFactory, amqp_url: str, events_exchange: str) -> Settings:
    """Both backends with the broker: the embedded one gets AMQP_URL too."""
    return make_settings(amqp_url=amqp_url, events_exchange=events_exchange)


@pytest.fixture
async def next_event(amqp_url: str, events_exchange: str) -> AsyncIterator[NextEvent]:
    """Returns the next item.created event, from a queue of the test's own."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key="item.created")
        async with queue.iterator() as messages:

            async def get() -> AbstractIncomingMessage:
                with anyio.fail_after(10):
                    message = await anext(messages)
                await message.ack()
                return message

            yield get
    finally:
        await connection.close()


async def outbox_row(settings: Settings, name: str) -> tuple[str, object] | None:
    """The (id, sent_at) of the outbox row of the item named *name*, if any."""
    ident = await scalar(
        settings, "SELECT id FROM outbox WHERE payload LIKE :p", p=f'%"name":"{name}"%'
    )
    if ident is None:
        return None
    sent = await scalar(settings, "SELECT sent_at FROM outbox WHERE id = :i", i=ident)
    return str(ident), sent


async def wait_until_sent(settings: Settings, name: str) -> str:
    """Poll the outbox until the item's event is marked sent; return the event id."""
    with anyio.fail_after(10):
        while True:
            row = await outbox_row(settings, name)
            if row is not None and row[1] is not None:
                return row[0]
            await anyio.sleep(0.05)  # the relay is another task: watch its effect


async def create(svc: Running, name: str) -> int:
    """Create an item named *name*; return its id."""
    response = await svc.client.post("/items", json={"name": name})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


class TestOutbox:
    async def test_created_item_publishes_its_event_once(
        self, service: Running, next_event: NextEvent
    ) -> None:
        """Creating an item publishes item.created whose message id is the outbox row's id."""
        item_id = await create(service, "evt-1")
        message = await next_event()
        payload = json.loads(message.body)
        assert payload["id"] == item_id
        assert payload["name"] == "evt-1"
        assert message.type == "item.created"
        assert message.message_id == await wait_until_sent(service.settings, "evt-1")

    async def test_rolled_back_item_publishes_nothing(
        self, service: Running, next_event: NextEvent, commit_fails_for_poison: None
    ) -> None:
        """An item whose COMMIT failed leaves no outbox row and publishes no event."""
        failed = await service.client.post("/items", json={"name": "poison"})
        assert failed.status_code >= 500
        await create(service, "after-poison")
        message = await next_event()  # the first event after the failure is the next item's
        assert json.loads(message.body)["name"] == "after-poison"
        assert await outbox_row(service.settings, "poison") is None

    async def test_event_committed_without_a_relay_is_published_later(
        self, make_settings: SettingsFactory, settings: Settings, next_event: NextEvent
    ) -> None:
        """An event whose publisher died after the commit is published by the next relay."""
        no_relay = make_settings(
            amqp_url=settings.amqp_url,
            events_exchange=settings.events_exchange,
            outbox_relay=False,
        )
        async with running(no_relay) as crashed:
            await create(crashed, "orphan")
        row = await outbox_row(settings, "orphan")
        assert row is not None
        assert row[1] is None  # committed, never sent
        async with running(settings):
            message = await next_event()
        assert json.loads(message.body)["name"] == "orphan"
        assert message.message_id == row[0]

    async def test_redelivered_event_keeps_its_id(
        self, service: Running, next_event: NextEvent
    ) -> None:
        """An event published again (its 'sent' mark was lost) carries the same message id."""
        await create(service, "twice")
        first = await next_event()
        event_id = await wait_until_sent(service.settings, "twice")
        engine = service.engine
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    text("UPDATE outbox SET sent_at = NULL WHERE id = :i"), {"i": event_id}
                )
        finally:
            await engine.dispose()
        second = await next_event()
        assert first.message_id == second.message_id == event_id
