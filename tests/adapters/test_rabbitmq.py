"""The RabbitMQ adapter against the real broker on 127.0.0.1."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated
from urllib.parse import urlsplit

import aio_pika
import anyio
import httpx
import pytest
from aio_pika.abc import AbstractChannel
from aio_pika.exceptions import ChannelNotFoundEntity
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from scoped_resources import Resources, Use
from scoped_resources.adapters.rabbitmq import RabbitMQ
from scoped_resources.exceptions import ResourceBusy, StartupFailed
from scoped_resources.testing import TcpProxy, cancel_at_each_await

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def _queue_name() -> str:
    return f"sr-test-{uuid.uuid4().hex}"


@asynccontextmanager
async def _serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


class TestLifecycle:
    async def test_publish_with_confirm_and_consume(self, amqp_url: str) -> None:
        """A leased channel publishes with a broker confirm and the message is consumed."""
        resources = Resources("t")
        mq = RabbitMQ(resources, amqp_url)
        async with resources.open() as app_scope, app_scope.child() as scope:
            channel = await scope.get(mq.channel)
            queue = await channel.declare_queue(_queue_name(), exclusive=True, auto_delete=True)
            confirm = await channel.default_exchange.publish(
                aio_pika.Message(b"hello"), routing_key=queue.name
            )
            assert type(confirm).__name__ == "Ack"
            message = await queue.get(timeout=5)
            await message.ack()
            assert message.body == b"hello"

    async def test_channel_is_reused_after_success(self, amqp_url: str) -> None:
        """A clean channel goes back to the pool and is lent again."""
        resources = Resources("t")
        mq = RabbitMQ(resources, amqp_url)
        async with resources.open() as app_scope:
            async with app_scope.child() as scope:
                first = await scope.get(mq.channel)
            async with app_scope.child() as scope:
                assert await scope.get(mq.channel) is first

    async def test_ping_and_close(self, amqp_url: str) -> None:
        """The connection answers its ping while open and is closed at shutdown."""
        resources = Resources("t")
        mq = RabbitMQ(resources, amqp_url)
        async with resources.open() as app_scope:
            assert await app_scope.ping(5.0) == {"rabbitmq": None}
            connection = await app_scope.get(mq.connection)
        assert connection.is_closed

    async def test_repr_and_errors_hide_the_password(self) -> None:
        """Neither the repr nor a connect error shows the URL's password."""
        resources = Resources("t", startup_timeout=5.0)
        mq = RabbitMQ(resources, "amqp://guest:hunter2@127.0.0.1:1/", connect_timeout=2.0)
        assert "hunter2" not in repr(mq)
        with pytest.raises(Exception) as info:  # noqa: PT011 - any startup error; checked below
            async with resources.open():
                pass
        text = f"{info.value} {info.value.__cause__}"
        assert "hunter2" not in text
        assert "rabbitmq" in text


class TestConnectErrors:
    """A connection that cannot be made says why, without the URL's password."""

    async def test_a_refused_connection(self) -> None:
        resources = Resources("t")
        RabbitMQ(resources, "amqp://guest:hunter2@127.0.0.1:1/", connect_timeout=2.0)
        with pytest.raises(StartupFailed, match="'rabbitmq'") as info:
            async with resources.open():
                pass
        text = str(info.value)
        assert "cannot connect to amqp://guest:***@127.0.0.1:1/" in text
        assert "Connect call failed" in text
        assert "hunter2" not in text

    async def test_refused_credentials(self, amqp_url: str) -> None:
        parts = urlsplit(amqp_url)
        url = f"amqp://guest:hunter2wrong@{parts.hostname}:{parts.port or 5672}/"
        resources = Resources("t")
        RabbitMQ(resources, url, connect_timeout=5.0)
        with pytest.raises(StartupFailed, match="'rabbitmq'") as info:
            async with resources.open():
                pass
        text = str(info.value)
        assert "ACCESS_REFUSED" in text
        assert "hunter2wrong" not in text


class TestAcquireTimeout:
    async def test_exhausted_channels_raise_resource_busy(self, amqp_url: str) -> None:
        """With every channel leased, the next lease raises ResourceBusy naming the channel."""
        resources = Resources("t")
        mq = RabbitMQ(resources, amqp_url, channels=1, acquire_timeout=0.2)
        async with resources.open() as app_scope, app_scope.child() as held:
            await held.get(mq.channel)
            async with app_scope.child() as scope:
                with pytest.raises(ResourceBusy, match=r"'rabbitmq\.channel'"):
                    await scope.get(mq.channel)

    async def test_exhausted_channels_answer_503(self, amqp_url: str) -> None:
        """In FastAPI, a lease that cannot get a channel answers 503."""
        resources = Resources("t")
        mq = RabbitMQ(resources, amqp_url, channels=1, acquire_timeout=0.2)
        app = FastAPI(lifespan=resources.lifespan)

        @app.get("/publish")
        async def publish(channel: Annotated[AbstractChannel, Use(mq.channel)]) -> bool:
            return not channel.is_closed

        async with _serve(app) as http:
            (app_scope,) = resources._open
            async with app_scope.child() as held:
                await held.get(mq.channel)
                assert (await http.get("/publish")).status_code == 503
            assert (await http.get("/publish")).json() is True


class TestClosedChannels:
    async def test_broker_closed_channel_is_not_reused(self, amqp_url: str) -> None:
        """A channel the broker closed during use is discarded, and the next lease gets another."""
        resources = Resources("t")
        mq = RabbitMQ(resources, amqp_url, channels=1)
        async with resources.open() as app_scope:

            async def declare_missing() -> AbstractChannel:
                async with app_scope.child() as scope:
                    channel = await scope.get(mq.channel)
                    try:
                        await channel.declare_queue(_queue_name(), passive=True)
                    finally:
                        broken.append(channel)
                return channel

            broken: list[AbstractChannel] = []
            with pytest.raises(ChannelNotFoundEntity):
                await declare_missing()
            async with app_scope.child() as scope:
                fresh = await scope.get(mq.channel)
                assert fresh is not broken[0]
                assert not fresh.is_closed
                queue = await fresh.declare_queue(_queue_name(), exclusive=True, auto_delete=True)
                assert queue.name


class TestCancellation:
    async def test_cancel_while_waiting_for_a_channel(self, amqp_url: str) -> None:
        """A lease cancelled while waiting for a channel takes no slot."""
        resources = Resources("t")
        mq = RabbitMQ(resources, amqp_url, channels=1, acquire_timeout=5.0)
        async with resources.open() as app_scope:
            pool = await app_scope.get(mq.channels)
            async with app_scope.child() as held:
                await held.get(mq.channel)
                with anyio.move_on_after(0.1) as cs:
                    async with app_scope.child() as scope:
                        await scope.get(mq.channel)
                assert cs.cancelled_caught
            assert pool.free_slots == 1

    async def test_cancel_during_use_discards_the_channel(self, amqp_url: str) -> None:
        """A scope cancelled while using its channel closes that channel and frees the slot."""
        resources = Resources("t")
        mq = RabbitMQ(resources, amqp_url, channels=1)
        async with resources.open() as app_scope:
            pool = await app_scope.get(mq.channels)
            with anyio.CancelScope() as cs:
                async with app_scope.child() as scope:
                    channel = await scope.get(mq.channel)
                    cs.cancel()
                    await anyio.lowlevel.checkpoint()
            assert cs.cancelled_caught
            assert channel.is_closed
            assert pool.free_slots == 1


def _broker_tasks() -> list[asyncio.Task[object]]:
    """The tasks aio-pika and aiormq run for a connection (its reader, writer, reconnector)."""
    return [
        task
        for task in asyncio.all_tasks()
        if any(lib in task.get_coro().cr_code.co_filename for lib in ("aio_pika", "aiormq"))  # type: ignore[union-attr]
    ]


class TestOpenCancelled:
    async def test_a_connect_cancelled_at_any_await_point_leaves_no_connection(
        self, amqp_url: str
    ) -> None:
        """Cancelled anywhere in its first connect (start-up failed elsewhere, or its
        deadline passed), the connection is closed: aio-pika's reconnecting task does not
        go on connecting in the background."""
        assert _broker_tasks() == []
        resources = Resources("t")
        mq = RabbitMQ(resources, amqp_url)

        async def open_app() -> None:
            async with resources.open() as app_scope:
                await app_scope.get(mq.connection)

        async def nothing_left(point: int) -> None:
            with anyio.move_on_after(2):
                while _broker_tasks():
                    await anyio.sleep(0.01)
            assert _broker_tasks() == [], f"cancelled at await point {point}"

        points = await cancel_at_each_await(open_app, after_each=nothing_left)
        assert points > 3


class TestShutdown:
    async def test_shutdown_with_a_lease_out_is_bounded(self, amqp_url: str) -> None:
        """Closing the app while a channel is still leased finishes within the deadlines."""
        resources = Resources("t", drain_timeout=0.2)
        mq = RabbitMQ(resources, amqp_url, release_timeout=2.0)
        leased = anyio.Event()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                async with resources.open() as app_scope:
                    connection = await app_scope.get(mq.connection)

                    async def hold() -> None:
                        async with app_scope.child() as scope:
                            await scope.get(mq.channel)
                            leased.set()
                            await anyio.sleep_forever()

                    tg.start_soon(hold)
                    await leased.wait()
                assert connection.is_closed
                tg.cancel_scope.cancel()


class TestConnectionCut:
    async def test_publish_succeeds_after_restore(self, amqp_url: str) -> None:
        """After the broker connection is cut and restored, a new lease publishes again."""
        parts = urlsplit(amqp_url)
        async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
            url = f"amqp://{parts.username}:{parts.password}@127.0.0.1:{proxy.port}/"
            resources = Resources("t")
            mq = RabbitMQ(resources, url, reconnect_interval=0.2)
            async with resources.open() as app_scope:
                async with app_scope.child() as scope:
                    channel = await scope.get(mq.channel)
                    queue = await channel.declare_queue(_queue_name(), auto_delete=True)
                connection = await app_scope.get(mq.connection)
                reconnected = anyio.Event()
                connection.reconnect_callbacks.add(lambda *_: reconnected.set())
                proxy.cut()
                proxy.restore()
                with anyio.fail_after(15):
                    await reconnected.wait()
                    async with app_scope.child() as scope:
                        channel = await scope.get(mq.channel)
                        await channel.default_exchange.publish(
                            aio_pika.Message(b"back"), routing_key=queue.name
                        )
                        message = await queue.get(timeout=5)
                        await message.ack()
                        assert message.body == b"back"
                        await queue.delete(if_unused=False, if_empty=False)
