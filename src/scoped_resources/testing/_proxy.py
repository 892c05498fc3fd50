"""A TCP proxy on 127.0.0.1 that a test controls: cut, slow down, restore."""

from __future__ import annotations

from types import TracebackType

import anyio
from anyio.abc import SocketStream, TaskGroup


class TcpProxy:
    """Forward a local port to *target_host*:*target_port*, under the test's control.

    ``async with TcpProxy("127.0.0.1", 5432) as proxy``: connect clients to
    ``proxy.port``. :meth:`cut` closes every open connection and refuses new ones
    (a server that went away); :meth:`restore` accepts again; ``proxy.delay`` adds
    latency to every chunk forwarded. Everything stops when the block ends.
    """

    def __init__(self, target_host: str, target_port: int, *, delay: float = 0.0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.delay = delay
        self.port = 0
        self.accepted = 0
        self._refusing = False
        self._tg: TaskGroup | None = None
        self._conns: set[anyio.CancelScope] = set()

    @property
    def cut_off(self) -> bool:
        """True while the proxy refuses connections."""
        return self._refusing

    @property
    def open_connections(self) -> int:
        """How many client connections are being forwarded now."""
        return len(self._conns)

    async def __aenter__(self) -> TcpProxy:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._serve, listener)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(exc_type, exc, tb)

    def cut(self) -> None:
        """Drop every forwarded connection and refuse new ones."""
        self._refusing = True
        for scope in list(self._conns):
            scope.cancel()

    def restore(self) -> None:
        """Accept and forward connections again."""
        self._refusing = False

    async def _serve(self, listener: anyio.abc.Listener[SocketStream]) -> None:
        async with listener:
            await listener.serve(self._handle)

    async def _handle(self, client: SocketStream) -> None:
        async with client:
            if self._refusing:
                return
            try:
                upstream = await anyio.connect_tcp(self.target_host, self.target_port)
            except OSError:
                return
            self.accepted += 1
            async with upstream:
                with anyio.CancelScope() as scope:
                    self._conns.add(scope)
                    try:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(self._pipe, client, upstream, tg.cancel_scope)
                            tg.start_soon(self._pipe, upstream, client, tg.cancel_scope)
                    finally:
                        self._conns.discard(scope)

    async def _pipe(self, src: SocketStream, dst: SocketStream, done: anyio.CancelScope) -> None:
        try:
            async for chunk in src:
                if self.delay:
                    await anyio.sleep(self.delay)
                await dst.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        done.cancel()
