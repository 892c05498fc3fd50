"""The HTTP adapter against local servers on 127.0.0.1 that the tests control."""

import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated

import anyio
import httpx
import pytest
from anyio.abc import SocketStream
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from scoped_resources import Resources, Use
from scoped_resources.adapters.http import HTTP, SlotTransport
from scoped_resources.exceptions import ResourceBusy
from scoped_resources.testing import TcpProxy

pytestmark = pytest.mark.anyio


class Upstream:
    """A tiny HTTP/1.1 server: ``/hold`` waits for ``release``; anything else answers at once."""

    def __init__(self) -> None:
        self.port = 0
        self.holding = 0
        self.release = anyio.Event()
        self.arrived = anyio.Event()
        self.hold_target = 1

    async def handle(self, stream: SocketStream) -> None:
        async with stream:
            buffer = b""
            try:
                while True:
                    while b"\r\n\r\n" not in buffer:
                        buffer += await stream.receive()
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    path = head.split(b" ", 2)[1]
                    if path == b"/hold":
                        self.holding += 1
                        if self.holding >= self.hold_target:
                            self.arrived.set()
                        await self.release.wait()
                        self.holding -= 1
                    body = b"x" * 100_000 if path == b"/big" else b"ok"
                    head_out = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n\r\n"
                    await stream.send(head_out.encode() + body)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                pass


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """A running Upstream server, stopped after the test."""
    server = Upstream()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    server.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server.handle)
        yield server
        server.release.set()
        tg.cancel_scope.cancel()


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A port whose listener never accepts: with a full backlog, connects hang mid-handshake."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@asynccontextmanager
async def _serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def _slots(client: httpx.AsyncClient) -> SlotTransport:
    transport = client._transport
    assert isinstance(transport, SlotTransport)
    return transport


async def _hold_all(client: httpx.AsyncClient, upstream: Upstream, count: int) -> None:
    """Send *count* /hold requests at once and return when all reached the server together."""
    upstream.hold_target = count
    upstream.arrived = anyio.Event()
    upstream.release = anyio.Event()
    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(client.get, f"http://127.0.0.1:{upstream.port}/hold")
        with anyio.fail_after(5):
            await upstream.arrived.wait()
        upstream.release.set()


class TestLifecycle:
    async def test_client_is_shared_and_closed(self, upstream: Upstream) -> None:
        """One client serves the app's scopes and is closed at shutdown."""
        resources = Resources("t")
        http = HTTP(resources, base_url=f"http://127.0.0.1:{upstream.port}")
        async with resources.open() as app_scope:
            async with app_scope.child() as one, app_scope.child() as two:
                client = await one.get(http.client)
                assert client is await two.get(http.client)
            assert (await client.get("/")).text == "ok"
        assert client.is_closed

    async def test_repr_hides_the_password(self) -> None:
        """The adapter's repr shows its base URL with the password redacted."""
        http = HTTP(Resources("t"), base_url="https://me:hunter2@api.example/")
        assert "hunter2" not in repr(http)


class TestPing:
    async def test_ping_answers_for_a_live_upstream(self, upstream: Upstream) -> None:
        """With ping_url, readiness GETs it; a live upstream is ready."""
        resources = Resources("t")
        HTTP(resources, base_url=f"http://127.0.0.1:{upstream.port}", ping_url="/")
        async with resources.open() as app_scope:
            assert await app_scope.ping(timeout=2) == {"http": None}

    async def test_ping_fails_when_the_upstream_is_gone(self, unaccepting_port: int) -> None:
        """An upstream that does not answer fails the ping (within its timeout)."""
        resources = Resources("t")
        HTTP(
            resources,
            base_url=f"http://127.0.0.1:{unaccepting_port}",
            ping_url="/",
            ping_timeout=0.2,
        )
        async with resources.open() as app_scope:
            result = await app_scope.ping(timeout=2)
        assert result["http"] is not None


class TestAcquireTimeout:
    async def test_all_slots_busy_raises_resource_busy(self, upstream: Upstream) -> None:
        """A request that waits longer than acquire_timeout for a slot raises ResourceBusy."""
        resources = Resources("t")
        http = HTTP(resources, name="api", max_connections=1, acquire_timeout=0.2)
        async with resources.open() as app_scope:
            client = await app_scope.get(http.client)
            url = f"http://127.0.0.1:{upstream.port}"
            async with http.stream(client, "GET", url + "/big"):
                with pytest.raises(ResourceBusy, match="'api'"):
                    await client.get(url + "/")
            assert (await client.get(url + "/")).text == "ok"

    async def test_busy_answers_503(self, upstream: Upstream) -> None:
        """In FastAPI, a busy client answers 503 with Retry-After."""
        resources = Resources("t")
        http = HTTP(resources, max_connections=1, acquire_timeout=0.2)
        app = FastAPI(lifespan=resources.lifespan)
        url = f"http://127.0.0.1:{upstream.port}"

        @app.get("/proxy")
        async def proxy(client: Annotated[httpx.AsyncClient, Use(http.client)]) -> str:
            async with http.stream(client, "GET", url + "/big"):
                return (await client.get(url + "/")).text

        async with _serve(app) as api:
            response = await api.get("/proxy")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"


class TestCancellation:
    async def test_cancel_mid_connect_keeps_every_slot(
        self, upstream: Upstream, unaccepting_port: int
    ) -> None:
        """Many requests cancelled mid-connect leave all max_connections slots usable."""
        resources = Resources("t")
        # shed=False: every request waits for a slot and is cancelled (none refused early).
        http = HTTP(resources, max_connections=3, acquire_timeout=1.0, shed=False)
        async with resources.open() as app_scope:
            client = await app_scope.get(http.client)

            async def doomed() -> None:
                with anyio.move_on_after(0.2):
                    await client.get(f"http://127.0.0.1:{unaccepting_port}/")

            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(doomed)
            await _hold_all(client, upstream, 3)
            assert _slots(client).free_slots == 3
            pool = _slots(client).inner._pool  # type: ignore[attr-defined]
            assert not any(conn.info() == "CONNECTING" for conn in pool.connections)

    async def test_cancelled_stream_reader_frees_its_slot(self, upstream: Upstream) -> None:
        """A reader cancelled in the middle of a streamed body gives its slot back."""
        resources = Resources("t")
        http = HTTP(resources, max_connections=1, acquire_timeout=1.0)
        async with resources.open() as app_scope:
            client = await app_scope.get(http.client)
            with anyio.CancelScope() as cs:
                async with http.stream(client, "GET", f"http://127.0.0.1:{upstream.port}/big"):
                    cs.cancel()
                    await anyio.lowlevel.checkpoint()
            assert cs.cancelled_caught
            assert _slots(client).free_slots == 1

    async def test_cancel_while_waiting_for_a_slot(self, upstream: Upstream) -> None:
        """A request cancelled while waiting for a slot takes none."""
        resources = Resources("t")
        # shed=False: the request waits (a refusal by prediction would end it first).
        http = HTTP(resources, max_connections=1, acquire_timeout=5.0, shed=False)
        async with resources.open() as app_scope:
            client = await app_scope.get(http.client)
            url = f"http://127.0.0.1:{upstream.port}"
            async with http.stream(client, "GET", url + "/big"):
                with anyio.move_on_after(0.1) as cs:
                    await client.get(url + "/")
                assert cs.cancelled_caught
            assert _slots(client).free_slots == 1


class TestStreaming:
    async def test_after_response_stream_is_closed_when_the_body_is_sent(
        self, upstream: Upstream
    ) -> None:
        """A streamed upstream body held until the response is sent is then closed."""
        resources = Resources("t")
        http = HTTP(resources, base_url=f"http://127.0.0.1:{upstream.port}", max_connections=1)
        seen: list[httpx.Response] = []

        @resources.request(release="after_response")
        async def big(
            client: Annotated[httpx.AsyncClient, Use(http.client)],
        ) -> AsyncIterator[httpx.Response]:
            async with http.stream(client, "GET", "/big") as response:
                seen.append(response)
                yield response

        app = FastAPI(lifespan=resources.lifespan)

        @app.get("/relay")
        async def relay(response: Annotated[httpx.Response, Use(big)]) -> StreamingResponse:
            return StreamingResponse(response.aiter_bytes())

        async with _serve(app) as api:
            answer = await api.get("/relay")
            assert len(answer.content) == 100_000
            assert seen[0].is_closed
            assert (await api.get("/relay")).status_code == 200


class TestShutdown:
    async def test_shutdown_with_a_stream_out_is_bounded(self, upstream: Upstream) -> None:
        """Closing the app while a streamed response is still open finishes within deadlines."""
        resources = Resources("t", drain_timeout=0.2)
        http = HTTP(resources, release_timeout=1.0)
        opened = anyio.Event()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                async with resources.open() as app_scope:
                    client = await app_scope.get(http.client)

                    async def hold() -> None:
                        async with http.stream(client, "GET", f"http://127.0.0.1:{upstream.port}/big"):
                            opened.set()
                            await anyio.sleep_forever()

                    tg.start_soon(hold)
                    await opened.wait()
                assert client.is_closed
                tg.cancel_scope.cancel()


class TestConnectionCut:
    async def test_requests_succeed_after_restore(self, upstream: Upstream) -> None:
        """After the upstream connection is cut and restored, requests succeed again."""
        async with TcpProxy("127.0.0.1", upstream.port) as proxy:
            resources = Resources("t")
            http = HTTP(resources, base_url=f"http://127.0.0.1:{proxy.port}", max_connections=2)
            async with resources.open() as app_scope:
                client = await app_scope.get(http.client)
                assert (await client.get("/")).text == "ok"
                proxy.cut()
                with pytest.raises(httpx.TransportError):
                    await client.get("/")
                proxy.restore()
                assert (await client.get("/")).text == "ok"
                assert _slots(client).free_slots == 2
