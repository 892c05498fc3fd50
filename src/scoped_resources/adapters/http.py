"""Outgoing HTTP through ``httpx``: one shared ``AsyncClient`` per app, bounded and leak-proof.

================================  ===================================================
guarantee                         how
================================  ===================================================
one client, one pool              ``.client`` is app-scoped; ``aclose()`` at shutdown,
                                  bounded by *release_timeout*
bounded concurrency               at most *max_connections* requests in flight; a
                                  request that waits longer than *acquire_timeout* for
                                  a slot raises :class:`~scoped_resources.exceptions.
                                  ResourceBusy` (as does httpx's ``PoolTimeout``)
cancel-safe slots                 slots are counted by the adapter, not by httpcore:
                                  httpcore 1.0.9 loses a pool slot for good when a
                                  request is cancelled right after a connection was
                                  assigned to it while it waited in httpcore's queue
                                  (httpcore #785, #1093); the adapter admits at most
                                  *max_connections* requests, so none ever waits in
                                  that queue, gives httpcore no limit of its own, and
                                  prunes any orphaned connection as a backstop
bodies are always closed          a slot is held until the response body is closed;
                                  :meth:`HTTP.stream` closes it, shielded and bounded,
                                  even when the caller is cancelled
no secrets in errors              ``repr`` shows the base URL redacted
================================  ===================================================

For a streamed response that outlives the route, declare the stream as a request
resource with ``release="after_response"``::

    @resources.request(release="after_response")
    async def upstream(client: Annotated[httpx.AsyncClient, Use(http.client)]):
        async with http.stream(client, "GET", "/big") as response:
            yield response
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx

from .._registry import Resources
from .._resource import Resource
from ..exceptions import ResourceBusy
from ._common import redact
from ._gate import Gate

__all__ = ["HTTP", "SlotTransport"]

DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


class SlotTransport(httpx.AsyncBaseTransport):
    """Wraps a transport: at most *slots* requests in flight, a slot per open response.

    A slot is taken before the request is sent (waiting at most *acquire_timeout*,
    then ResourceBusy) and given back when the response body is closed, or at once
    when the request fails or is cancelled.
    """

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        *,
        name: str,
        slots: int,
        acquire_timeout: float | None,
        shed: bool = True,
    ) -> None:
        self.inner = inner
        self.name = name
        self.acquire_timeout = acquire_timeout
        #: Admission to the slots: arrival order, and a refusal at once when the wait
        #: cannot end within acquire_timeout (``shed=False``: deadline only).
        self.gate = Gate(name, slots, timeout=acquire_timeout, shed=shed)

    @property
    def free_slots(self) -> int:
        """How many more requests could be sent now."""
        stats = self.gate.stats()
        return stats.capacity - stats.in_use

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        ticket = await self.gate.acquire()
        try:
            response = await self.inner.handle_async_request(request)
        except httpx.PoolTimeout:
            self.gate.release(ticket, record=False)
            raise ResourceBusy(self.name, self.acquire_timeout or 0.0) from None
        except BaseException:
            self.gate.release(ticket)  # it held the slot while it failed: a hold sample
            self._prune_orphans()
            raise
        response.stream = _SlotStream(response.stream, self.gate, ticket)
        return response

    def _prune_orphans(self) -> None:
        # httpcore keeps a connection it assigned to a request that was cancelled
        # before connecting: never connected, never closed, never reused. Drop those
        # (best effort: these are httpcore internals; the slots above stay correct
        # without this, it only stops the list from growing).
        pool = getattr(self.inner, "_pool", None)
        conns = getattr(pool, "_connections", None)
        requests = getattr(pool, "_requests", None)
        if not isinstance(conns, list) or not isinstance(requests, list):
            return
        in_use = {id(getattr(r, "connection", None)) for r in requests}
        for conn in list(conns):
            never_connected = (
                getattr(conn, "_connection", 0) is None
                and getattr(conn, "_connect_failed", True) is False
            )
            if never_connected and id(conn) not in in_use:
                conns.remove(conn)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _SlotStream(httpx.AsyncByteStream):
    def __init__(self, inner: Any, gate: Gate, ticket: int) -> None:
        self._inner = inner
        self._gate: Gate | None = gate
        self._ticket = ticket

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        gate, self._gate = self._gate, None
        try:
            await self._inner.aclose()
        finally:
            if gate is not None:
                gate.release(self._ticket)


class HTTP:
    """The outgoing-HTTP resources of one app: ``.client`` and :meth:`stream`.

    Extra keyword arguments go to ``httpx.AsyncClient``; pass ``transport=`` to
    send through another transport (it is wrapped, slots still apply).
    """

    def __init__(
        self,
        resources: Resources,
        *,
        name: str = "http",
        base_url: str | None = None,
        max_connections: int = 10,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        acquire_timeout: float = 5.0,
        release_timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        ping_url: str | None = None,
        ping_timeout: float = 2.0,
        shed: bool = True,
        **client_kwargs: Any,
    ) -> None:
        self.name = name
        self.shed = shed
        self.ping_url = ping_url
        self.ping_timeout = ping_timeout
        self.base_url = base_url
        self.max_connections = max_connections
        self.timeout = timeout
        self.acquire_timeout = acquire_timeout
        self.release_timeout = release_timeout
        self._transport = transport
        self._client_kwargs = client_kwargs
        self.client: Resource[httpx.AsyncClient] = resources.app(
            name=name, release_timeout=release_timeout, terminate=_terminate, ping=self._ping
        )(self._open_client)

    async def _ping(self, client: httpx.AsyncClient) -> None:
        """Readiness: the client is open and, with *ping_url*, that URL answers below 500."""
        if client.is_closed:
            raise RuntimeError(f"HTTP client {self.name!r} is closed")
        if self.ping_url is None:
            return
        with anyio.fail_after(self.ping_timeout):
            response = await client.get(self.ping_url)
        if response.status_code >= 500:
            raise ConnectionError(f"{redact(str(response.url))} answered {response.status_code}")

    def __repr__(self) -> str:
        base = redact(self.base_url) if self.base_url else "no base_url"
        return f"<HTTP {self.name!r} {base} max_connections={self.max_connections}>"

    async def _open_client(self) -> AsyncIterator[httpx.AsyncClient]:
        inner = self._transport or httpx.AsyncHTTPTransport(
            # No limit in httpcore: the slots count; keep-alive stays bounded.
            limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=self.max_connections
            ),
        )
        transport = SlotTransport(
            inner,
            name=self.name,
            slots=self.max_connections,
            acquire_timeout=self.acquire_timeout,
            shed=self.shed,
        )
        kwargs: dict[str, Any] = dict(self._client_kwargs)
        if self.base_url is not None:
            kwargs["base_url"] = self.base_url
        client = httpx.AsyncClient(transport=transport, timeout=self.timeout, **kwargs)
        try:
            yield client
        finally:
            await client.aclose()

    @asynccontextmanager
    async def stream(
        self, client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
    ) -> AsyncIterator[httpx.Response]:
        """Send a request and yield the response with its body unread; always close it.

        The close is shielded from cancellation and bounded by *release_timeout*,
        so a cancelled reader never keeps a connection slot.
        """
        request = client.build_request(method, url, **kwargs)
        response = await client.send(request, stream=True)
        try:
            yield response
        finally:
            with anyio.move_on_after(self.release_timeout, shield=True):
                await response.aclose()


async def _terminate(client: httpx.AsyncClient) -> None:
    # A close that overran its deadline: drop the pool without waiting for peers.
    transport = getattr(client, "_transport", None)
    if isinstance(transport, SlotTransport):
        with anyio.move_on_after(1.0, shield=True):
            await transport.inner.aclose()
