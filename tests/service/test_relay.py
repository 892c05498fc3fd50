"""The outbox relay on PostgreSQL and RabbitMQ: two relays on one table (two replicas) never
publish the same row, and a relay rides out a broker outage with one line in the log each way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import aio_pika
import anyio
import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from scoped_resources.adapters.rabbitmq import ChannelPool
from scoped_resources.testing import (
    TcpProxy,
    TempPostgres,
    create_postgres_database,
    drop_postgres_database,
)
from service import Settings
from service.database import make_engine, migrate, write_connection
from service.outbox import ITEM_CREATED, OutboxRelay, add_event
from service.signals import Wakeup
from service.tables import outbox
from tests.faults._events import EventQueue, event_queue

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

EVENTS = 300
BATCH = 10
HELD = 5

MakeRelay = Callable[[str], OutboxRelay]


@pytest.fixture
async def database(pg_dsn: str) -> AsyncIterator[TempPostgres]:
    """A fresh database with the service's schema."""
    db = await create_postgres_database(pg_dsn, prefix="sr_relay_")
    try:
        engine = _engine(db.dsn)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()
        yield db
    finally:
        await drop_postgres_database(pg_dsn, db.name)


@pytest.fixture
async def queue(amqp_url: str) -> AsyncIterator[EventQueue]:
    """A consumer queue on an exchange of the test's own."""
    async with event_queue(amqp_url) as made:
        yield made


@pytest.fixture
async def make_relay(
    database: TempPostgres, amqp_url: str, queue: EventQueue
) -> AsyncIterator[MakeRelay]:
    """Builds relays as replicas have them: each its own engine, broker connection and channels.

    The relays are not entered (no task of their own): the tests drive ``relay_once``.
    """
    async with AsyncExitStack() as stack:

        def make(name: str) -> OutboxRelay:
            engine = _engine(database.dsn)
            stack.push_async_callback(engine.dispose)
            return OutboxRelay(
                engine,
                channels[name],
                Wakeup(),
                exchange=queue.exchange,
                poll_seconds=1,
                batch=BATCH,
                name=name,
            )

        channels: dict[str, ChannelPool] = {}
        for name in ("relay-a", "relay-b"):
            conn = await aio_pika.connect_robust(amqp_url)
            stack.push_async_callback(conn.close)
            channels[name] = ChannelPool(
                conn,
                name=f"{name}.channel",
                size=2,
                acquire_timeout=5,
                publisher_confirms=True,
                close_timeout=5,
            )
            stack.push_async_callback(channels[name].aclose)
        yield make


async def _write_events(dsn: str, count: int) -> set[str]:
    """Commit *count* events in one transaction, as routes do; return their ids."""
    engine = _engine(dsn)
    ids = set()
    try:
        async with engine.connect() as conn:
            await write_connection(conn)
            async with conn.begin():
                for n in range(count):
                    ids.add(await add_event(conn, ITEM_CREATED, {"id": n, "name": f"e-{n}"}))
    finally:
        await engine.dispose()
    return ids


def _engine(dsn: str) -> AsyncEngine:
    return make_engine(Settings(database_url=dsn, _env_file=None))  # type: ignore[call-arg]


class TestTwoRelays:
    async def test_concurrent_relays_share_the_rows_and_publish_each_once(
        self, database: TempPostgres, queue: EventQueue, make_relay: MakeRelay
    ) -> None:
        """Two relays released together publish every row exactly once between them."""
        a, b = make_relay("relay-a"), make_relay("relay-b")
        ids = await _write_events(database.dsn, EVENTS)
        barrier = asyncio.Barrier(2)
        batches: dict[str, int] = {a.name: 0, b.name: 0}

        async def drain(relay: OutboxRelay) -> None:
            await barrier.wait()  # both start claiming at the same moment
            for _ in range(EVENTS):
                if not await relay.relay_once():
                    return
                batches[relay.name] += 1

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain, a)
                tg.start_soon(drain, b)
        delivered = await queue.drain()

        assert delivered.duplicates == 0, "a row was published by both relays"
        assert delivered.ids == ids
        assert delivered.publishers() == {a.name: a.published, b.name: b.published}
        assert a.published > 0, batches
        assert b.published > 0, batches
        assert a.published + b.published == EVENTS
        print(f"\n{EVENTS} events: {delivered.publishers()} in {batches} batches")

    async def test_rows_claimed_by_another_relay_are_skipped_not_waited_for(
        self, database: TempPostgres, queue: EventQueue, make_relay: MakeRelay
    ) -> None:
        """A relay publishes the rows nobody holds at once and leaves the held ones alone."""
        relay = make_relay("relay-a")
        ids = await _write_events(database.dsn, BATCH)
        other = await asyncpg.connect(database.dsn)
        try:
            claim = other.transaction()
            await claim.start()
            held = {
                str(r["id"])
                for r in await other.fetch(
                    "SELECT id FROM outbox ORDER BY created_at, id LIMIT $1 FOR UPDATE", HELD
                )
            }
            with anyio.fail_after(10):  # waiting for the held rows would hang here
                assert await relay.relay_once() == BATCH - HELD
                assert await relay.relay_once() == 0
            first = await queue.drain()
            await claim.rollback()  # the other relay died before its publish
            assert await relay.relay_once() == HELD
        finally:
            await other.close()
        second = await queue.drain()

        assert first.ids == ids - held
        assert second.ids == held


class TestBrokerOutage:
    async def test_relay_publishes_everything_after_an_outage_and_logs_it_once_each_way(
        self,
        database: TempPostgres,
        amqp_url: str,
        queue: EventQueue,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Events written while the broker is cut off are published once it is back; two lines."""
        caplog.set_level(logging.DEBUG)
        port = int(amqp_url.rsplit(":", 1)[1].split("/", 1)[0])
        engine = _engine(database.dsn)
        ids: set[str] = set()
        async with AsyncExitStack() as stack:
            stack.push_async_callback(engine.dispose)
            proxy = await stack.enter_async_context(TcpProxy("127.0.0.1", port))
            url = amqp_url.replace(f":{port}", f":{proxy.port}", 1)
            conn = await aio_pika.connect_robust(url, reconnect_interval=0.2)
            stack.push_async_callback(conn.close)
            channels = ChannelPool(
                conn,
                name="outage.channel",
                size=2,
                acquire_timeout=0.5,
                publisher_confirms=True,
                close_timeout=1,
            )
            stack.push_async_callback(channels.aclose)
            wakeup = Wakeup()
            relay = OutboxRelay(
                engine, channels, wakeup, exchange=queue.exchange, poll_seconds=0.2, name="r"
            )
            await stack.enter_async_context(relay)

            async def write(count: int) -> None:
                for _ in range(count):
                    ids.update(await _write_events(database.dsn, 5))
                    wakeup.set()
                    await anyio.sleep(0.05)  # a trickle of writes, as routes make them

            await write(4)
            proxy.cut()
            await write(20)  # ~1 s of events, every wake-up a chance to retry at once
            assert relay.failing, "the relay did not notice the broker was gone"
            proxy.restore()
            with anyio.fail_after(15):
                while await _unsent(engine):
                    await anyio.sleep(0.05)  # the relay is a task of its own: watch its effect
            assert relay.running
            outages = relay.outages
        delivered = await queue.drain()

        assert delivered.ids == ids
        assert outages == 1
        relay_lines = [r.getMessage() for r in caplog.records if r.name == "service.outbox"]
        assert len(relay_lines) == 2, relay_lines
        assert "cannot publish events" in relay_lines[0]
        assert "publishing again" in relay_lines[1]
        loud = [
            r.getMessage()
            for r in caplog.records
            if r.name.startswith(("aiormq", "aio_pika")) and r.levelno >= logging.WARNING
        ]
        assert loud == [], loud


async def _unsent(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        rows = await conn.execute(outbox.select().where(outbox.c.sent_at.is_(None)))
        return len(rows.all())
