"""Two outbox relays on one PostgreSQL table (two replicas) never publish the same row."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import aio_pika
import anyio
import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from scoped_resources.adapters.rabbitmq import ChannelPool
from scoped_resources.testing import TempPostgres, create_postgres_database, drop_postgres_database
from service import Settings
from service.database import make_engine, migrate, write_connection
from service.outbox import ITEM_CREATED, OutboxRelay, add_event
from service.signals import Wakeup
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
