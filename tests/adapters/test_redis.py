"""The Redis adapter against the real Redis on 127.0.0.1."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
import redis.asyncio
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from scoped_resources import Resources, Use
from scoped_resources.adapters.redis import BusyAwarePool, Redis, UnexecutedPipelineError
from scoped_resources.exceptions import ReleaseFailed, ResourceBusy
from scoped_resources.testing import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A unique key prefix; every key under it is deleted after the test."""
    value = f"sr-test:{uuid.uuid4().hex}:"
    yield value
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{value}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def _app(resources: Resources) -> FastAPI:
    return FastAPI(lifespan=resources.lifespan)


@asynccontextmanager
async def _serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


class TestLifecycle:
    async def test_client_opens_pings_and_closes(self, redis_url: str) -> None:
        """The app client answers PING while open and its pool is closed at shutdown."""
        resources = Resources("t")
        cache = Redis(resources, redis_url)
        async with resources.open() as app_scope:
            client = await app_scope.get(cache.client)
            assert await client.ping()
            assert await app_scope.ping(2.0) == {"redis": None}
            pool = client.connection_pool
        kept = [*pool._available_connections, *pool._in_use_connections]
        assert kept
        assert not any(conn.is_connected for conn in kept)

    async def test_ping_reports_an_unreachable_server(self, redis_url: str) -> None:
        """The ping hook raises when the server stops answering."""
        parts = urlsplit(redis_url)
        async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
            resources = Resources("t")
            url = f"redis://127.0.0.1:{proxy.port}/0"
            Redis(resources, url, ping_timeout=1.0, socket_timeout=1.0)
            async with resources.open() as app_scope:
                assert await app_scope.ping(2.0) == {"redis": None}
                proxy.cut()
                result = await app_scope.ping(3.0)
                assert result["redis"] is not None

    async def test_repr_hides_the_password(self) -> None:
        """The adapter's repr shows the URL with its password redacted."""
        cache = Redis(Resources("t"), "redis://user:hunter2@127.0.0.1:6379/0")
        assert "hunter2" not in repr(cache)
        assert "***" in repr(cache)


class TestTutorialCase:
    async def test_asynccontextmanager_request_resource_works_in_a_route(
        self, redis_url: str, prefix: str
    ) -> None:
        """The tutorial's redis_client, declared with @resources.request, serves a route."""
        resources = Resources("t")
        events: list[str] = []

        @resources.request
        @asynccontextmanager
        async def redis_client() -> AsyncIterator[redis.asyncio.Redis]:
            client = redis.asyncio.Redis.from_url(redis_url)  # aioredis.from_url was awaited
            events.append("open")
            try:
                yield client
            finally:
                await client.aclose()
                events.append("close")

        app = _app(resources)

        @app.post("/cache/{key}")
        async def set_cache(
            key: str, value: str, r: Annotated[redis.asyncio.Redis, Use(redis_client)]
        ) -> dict[str, str]:
            await r.set(prefix + key, value, ex=3600)
            return {"msg": "cached"}

        async with _serve(app) as http:
            response = await http.post("/cache/k", params={"value": "v"})
        assert response.json() == {"msg": "cached"}
        assert events == ["open", "close"]
        check = redis.asyncio.Redis.from_url(redis_url)
        try:
            assert await check.get(prefix + "k") == b"v"
        finally:
            await check.aclose()


class TestPipelineAndPubSub:
    async def test_pipeline_executes_in_a_route(self, redis_url: str, prefix: str) -> None:
        """A pipeline leased by a route runs its commands when executed."""
        resources = Resources("t")
        cache = Redis(resources, redis_url)
        app = _app(resources)

        @app.get("/incr")
        async def incr(pipe: Annotated[Pipeline, Use(cache.pipeline)]) -> list[int]:
            pipe.incr(prefix + "n")
            pipe.incr(prefix + "n")
            return list(await pipe.execute())

        async with _serve(app) as http:
            assert (await http.get("/incr")).json() == [1, 2]

    async def test_unexecuted_pipeline_fails_the_request(self, redis_url: str, prefix: str) -> None:
        """Queued commands never executed make the release fail instead of vanishing."""
        resources = Resources("t")
        cache = Redis(resources, redis_url)
        async with resources.open() as app_scope:
            failed = pytest.RaisesGroup(
                UnexecutedPipelineError, check=lambda g: isinstance(g, ReleaseFailed)
            )
            with failed:
                async with app_scope.child() as scope:
                    pipe = await scope.get(cache.pipeline)
                    pipe.set(prefix + "lost", 1)
            client = await app_scope.get(cache.client)
            assert await client.exists(prefix + "lost") == 0

    async def test_pubsub_is_closed_on_release(self, redis_url: str, prefix: str) -> None:
        """A leased PubSub receives a message and is closed with the scope."""
        resources = Resources("t")
        cache = Redis(resources, redis_url)
        async with resources.open() as app_scope:
            async with app_scope.child() as scope:
                ps: PubSub = await scope.get(cache.pubsub)
                client = await scope.get(cache.client)
                await ps.subscribe(prefix + "ch")
                await client.publish(prefix + "ch", "hello")
                with anyio.fail_after(5):
                    while True:
                        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if msg is not None:
                            break
                assert msg["data"] == b"hello"
            assert ps.connection is None


class TestAcquireTimeout:
    async def test_exhausted_pool_raises_resource_busy(self, redis_url: str, prefix: str) -> None:
        """A command that waits too long for a connection raises ResourceBusy naming it."""
        resources = Resources("t")
        cache = Redis(resources, redis_url, name="cache", max_connections=1, acquire_timeout=0.2)
        async with resources.open() as app_scope:
            client = await app_scope.get(cache.client)
            held = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                with pytest.raises(ResourceBusy, match="'cache'"):
                    await client.get(prefix + "x")
            finally:
                await client.connection_pool.release(held)
            assert await client.get(prefix + "x") is None

    async def test_exhausted_pool_answers_503(self, redis_url: str, prefix: str) -> None:
        """In FastAPI, an exhausted pool answers 503 with Retry-After."""
        resources = Resources("t")
        cache = Redis(resources, redis_url, max_connections=1, acquire_timeout=0.2)
        app = _app(resources)

        @app.get("/get")
        async def get(r: Annotated[redis.asyncio.Redis, Use(cache.client)]) -> str | None:
            value = await r.get(prefix + "x")
            return None if value is None else str(value)

        async with _serve(app) as http:
            pool = _open_pool(resources, cache)
            held = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                response = await http.get("/get")
            finally:
                await pool.release(held)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert (await http.get("/get")).status_code == 200


def _open_pool(resources: Resources, cache: Redis) -> redis.asyncio.ConnectionPool:
    (app_scope,) = resources._open
    client: redis.asyncio.Redis = app_scope._cache[cache.client].value
    return client.connection_pool


async def _blpop(client: redis.asyncio.Redis, key: str) -> None:
    await client.blpop([key], 10)


class TestCancellation:
    async def test_cancelled_command_leaves_pool_healthy(self, redis_url: str, prefix: str) -> None:
        """Commands cancelled while blocked leave every pool slot usable, with no stale reply."""
        resources = Resources("t")
        cache = Redis(resources, redis_url, max_connections=2, acquire_timeout=1.0)
        async with resources.open() as app_scope:
            client = await app_scope.get(cache.client)
            with anyio.move_on_after(0.3):
                async with anyio.create_task_group() as tg:
                    for key in ("a", "b"):
                        tg.start_soon(_blpop, client, prefix + key)
            pool = client.connection_pool
            with anyio.fail_after(2):
                first = await pool.get_connection()  # type: ignore[no-untyped-call]
                second = await pool.get_connection()  # type: ignore[no-untyped-call]
            await pool.release(first)
            await pool.release(second)
            await client.set(prefix + "k", "v")
            assert await client.get(prefix + "k") == b"v"

    async def test_cancel_during_acquire_frees_the_waiter(
        self, redis_url: str, prefix: str
    ) -> None:
        """A command cancelled while waiting for a connection leaves the pool usable."""
        resources = Resources("t")
        cache = Redis(resources, redis_url, max_connections=1, acquire_timeout=5.0)
        async with resources.open() as app_scope:
            client = await app_scope.get(cache.client)
            held = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            with anyio.move_on_after(0.1) as cs:
                await client.get(prefix + "x")
            assert cs.cancelled_caught
            await client.connection_pool.release(held)
            with anyio.fail_after(2):
                assert await client.get(prefix + "x") is None

    async def test_cancel_during_release_still_resets_the_pipeline(
        self, redis_url: str, prefix: str
    ) -> None:
        """A scope cancelled while closing still resets its pipeline (the release is shielded)."""
        resources = Resources("t")
        cache = Redis(resources, redis_url, max_connections=1, acquire_timeout=1.0)
        async with resources.open() as app_scope:
            client = await app_scope.get(cache.client)
            with anyio.CancelScope() as cs:
                async with app_scope.child() as scope:
                    pipe = await scope.get(cache.pipeline)
                    await pipe.watch(prefix + "w")  # takes the only connection
                    cs.cancel()
                    await anyio.lowlevel.checkpoint()
            assert cs.cancelled_caught
            with anyio.fail_after(2):
                assert await client.set(prefix + "after", 1)


class TestShutdown:
    async def test_shutdown_with_a_lease_out_is_bounded(self, redis_url: str, prefix: str) -> None:
        """Closing the app while a pipeline is still leased finishes within the deadlines."""
        resources = Resources("t", drain_timeout=0.2)
        cache = Redis(resources, redis_url, release_timeout=1.0)
        leased = anyio.Event()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                async with resources.open() as app_scope:

                    async def hold() -> None:
                        async with app_scope.child() as scope:
                            pipe = await scope.get(cache.pipeline)
                            await pipe.watch(prefix + "w")
                            leased.set()
                            await anyio.sleep_forever()

                    tg.start_soon(hold)
                    await leased.wait()
                client = app_scope._cache.get(cache.client)
                assert client is None  # the app scope closed with the lease still out
                tg.cancel_scope.cancel()


class TestConnectionCut:
    async def test_requests_succeed_after_restore(self, redis_url: str, prefix: str) -> None:
        """A cut connection answers 503 with Retry-After; after the restore requests succeed."""
        parts = urlsplit(redis_url)
        async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
            resources = Resources("t")
            cache = Redis(resources, f"redis://127.0.0.1:{proxy.port}/0", socket_timeout=1.0)
            app = _app(resources)

            @app.put("/k")
            async def put(r: Annotated[redis.asyncio.Redis, Use(cache.client)]) -> bool:
                return bool(await r.set(prefix + "k", "v"))

            async with _serve(app) as http:
                assert (await http.put("/k")).json() is True
                proxy.cut()
                lost = await http.put("/k")
                assert lost.status_code == 503, lost.text  # an outage, not a bug
                assert int(lost.headers["retry-after"]) >= 1
                proxy.restore()
                assert (await http.put("/k")).json() is True


@asynccontextmanager
async def _direct_client(
    url: str, size: int, **options: Any
) -> AsyncIterator[redis.asyncio.Redis]:
    """An open app client of a Redis adapter with a pool of *size*."""
    resources = Resources("t")
    cache = Redis(resources, url, max_connections=size, **options)
    async with resources.open() as app_scope:
        yield await app_scope.get(cache.client)


class TestDirectLending:
    """Behind its gate the pool lends as redis-py's does, without its lock, event and metrics."""

    async def test_a_plain_pool_lends_directly_and_takes_every_connection_back(
        self, redis_url: str, prefix: str
    ) -> None:
        """Concurrent commands on a small pool all succeed, and every connection comes back."""
        async with _direct_client(redis_url, 3) as client:
            pool = client.connection_pool
            assert isinstance(pool, BusyAwarePool)
            assert pool._direct

            async def one(i: int) -> None:
                await client.set(f"{prefix}{i}", i)
                assert await client.get(f"{prefix}{i}") == str(i).encode()

            async with anyio.create_task_group() as tg:
                for i in range(30):
                    tg.start_soon(one, i)
            assert len(pool._in_use_connections) == 0
            assert 1 <= len(pool._available_connections) <= 3

    async def test_a_connection_marked_for_reconnect_is_disconnected_when_given_back(
        self, redis_url: str
    ) -> None:
        """A connection the server asked to move is closed on release, then lent fresh."""
        async with _direct_client(redis_url, 1) as client:
            pool = client.connection_pool
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            conn.mark_for_reconnect()
            await pool.release(conn)
            assert not conn.is_connected
            assert await client.ping()

    async def test_a_release_cancelled_while_disconnecting_keeps_the_pool_whole(
        self, redis_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A give-back cancelled in its disconnect still returns the connection and its slot."""
        async with _direct_client(redis_url, 1) as client:
            pool = client.connection_pool
            assert isinstance(pool, BusyAwarePool)
            conn = await pool.get_connection()
            conn.mark_for_reconnect()  # type: ignore[no-untyped-call, unused-ignore]
            disconnecting = anyio.Event()
            real_disconnect = conn.disconnect

            async def slow_disconnect(nowait: bool = False) -> None:
                disconnecting.set()
                await anyio.sleep_forever()

            monkeypatch.setattr(conn, "disconnect", slow_disconnect)
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.release, conn)
                await disconnecting.wait()
                tg.cancel_scope.cancel()
            monkeypatch.setattr(conn, "disconnect", real_disconnect)
            assert conn in pool._available_connections
            assert conn not in pool._in_use_connections
            assert pool.gate is not None
            assert pool.gate.stats().in_use == 0
            with anyio.fail_after(5):
                assert await client.ping()

    async def test_a_failed_connect_gives_the_slot_back(self, redis_url: str) -> None:
        """A lend whose connect fails returns the connection and its slot to the pool."""
        parts = urlsplit(redis_url)
        async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
            url = f"redis://127.0.0.1:{proxy.port}/0"
            async with _direct_client(url, 1, socket_timeout=1.0) as client:
                pool = client.connection_pool
                await client.connection_pool.disconnect()
                proxy.cut()
                with pytest.raises(redis.exceptions.ConnectionError):
                    await client.ping()
                assert len(pool._in_use_connections) == 0
                proxy.restore()
                with anyio.fail_after(5):
                    assert await client.ping()

    async def test_a_credential_provider_keeps_the_pools_own_path(self, redis_url: str) -> None:
        """With a credential provider (it may re-authenticate on release) the pool's methods run."""
        provider = redis.credentials.UsernamePasswordCredentialProvider()
        async with _direct_client(redis_url, 10, credential_provider=provider) as client:
            assert isinstance(client.connection_pool, BusyAwarePool)
            assert not client.connection_pool._direct
            assert await client.ping()
            assert len(client.connection_pool._in_use_connections) == 0


def _assert_closed_and_given_back(client: redis.asyncio.Redis) -> None:
    """The client's connections are closed, none is lent, and every gate slot is back."""
    pool = client.connection_pool
    assert isinstance(pool, BusyAwarePool)
    assert not pool._in_use_connections
    assert not any(conn.is_connected for conn in pool._available_connections)
    assert pool.gate is not None
    assert pool.gate.stats().in_use == 0


class TestCommandWrites:
    """A command is written without a task of its own; a write that waits is still bounded."""

    async def test_commands_start_no_task(self, redis_url: str, prefix: str) -> None:
        """Commands and a pipeline are written without a task per write."""
        started: list[str] = []
        loop = asyncio.get_running_loop()

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
            started.append(coro.__qualname__)
            return asyncio.Task(coro, loop=loop, **kwargs)

        async with _direct_client(redis_url, 2) as client:
            await client.ping()  # the connection is made (its handshake too) before counting
            loop.set_task_factory(factory)
            try:
                for i in range(5):
                    await client.set(f"{prefix}{i}", i)
                    assert await client.get(f"{prefix}{i}") == str(i).encode()
                async with client.pipeline() as pipe:
                    pipe.incr(prefix + "n")
                    pipe.incr(prefix + "n")
                    assert await pipe.execute() == [1, 2]
            finally:
                loop.set_task_factory(None)
        # (redis-py gives a pipeline's connection back in a task of its own.)
        assert [name for name in started if "send" in name] == []

    async def test_a_write_the_server_does_not_read_times_out(
        self, redis_url: str, prefix: str
    ) -> None:
        """A command the server stops reading fails after socket_timeout; its slot comes back."""
        parts = urlsplit(redis_url)
        async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
            url = f"redis://127.0.0.1:{proxy.port}/0"
            no_retry = Retry(NoBackoff(), 0)
            async with _direct_client(url, 1, socket_timeout=0.5, retry=no_retry) as client:
                assert await client.ping()
                proxy.delay = 3600  # the proxy holds the next chunk: it stops reading
                with (
                    anyio.fail_after(10),
                    pytest.raises(redis.exceptions.TimeoutError, match="writing"),
                ):
                    # Far more than the sockets of both ends can buffer.
                    await client.set(prefix + "big", b"x" * (64 << 20))
                _assert_closed_and_given_back(client)

    async def test_a_write_cancelled_while_waiting_closes_the_connection(
        self, redis_url: str, prefix: str
    ) -> None:
        """A command cancelled while its write waits leaves no half-sent command behind."""
        parts = urlsplit(redis_url)
        async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
            url = f"redis://127.0.0.1:{proxy.port}/0"
            async with _direct_client(url, 1, socket_timeout=30) as client:
                assert await client.ping()
                proxy.delay = 3600  # the proxy holds the next chunk: it stops reading
                with anyio.move_on_after(0.5) as waited:
                    await client.set(prefix + "big", b"x" * (64 << 20))
                assert waited.cancelled_caught
                _assert_closed_and_given_back(client)

    async def test_without_a_socket_timeout_writes_are_redis_pys_own(
        self, redis_url: str, prefix: str
    ) -> None:
        """With socket_timeout=None nothing bounds a write, as in redis-py: its own path runs."""
        async with _direct_client(redis_url, 1, socket_timeout=None) as client:
            assert await client.set(prefix + "k", "v")
            assert await client.get(prefix + "k") == b"v"

    async def test_a_write_on_a_lost_connection_closes_it_with_a_connection_error(
        self, redis_url: str
    ) -> None:
        """A command written on a connection lost under it raises redis-py's ConnectionError."""
        async with _direct_client(redis_url, 1, retry=Retry(NoBackoff(), 0)) as client:
            pool = client.connection_pool
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                conn._writer.transport.abort()
                with pytest.raises(redis.exceptions.ConnectionError, match="writing"):
                    await conn.send_command("PING")
                assert not conn.is_connected
            finally:
                await pool.release(conn)
            assert await client.ping()

    async def test_a_connection_class_that_sends_its_own_way_is_kept(self, redis_url: str) -> None:
        """A connection class given with its own send_packed_command is used as it is."""

        class Recording(redis.asyncio.Connection):
            sent = 0

            async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                Recording.sent += 1
                await super().send_packed_command(command, check_health)

        async with _direct_client(redis_url, 1, connection_class=Recording) as client:
            assert client.connection_pool.connection_class is Recording
            assert await client.ping()
        assert Recording.sent >= 1
