"""A fake upstream items API on 127.0.0.1, served from the test's own event loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class FakeUpstream:
    """Answers ``GET /items/{id}`` the way :attr:`mode` says.

    ``ok`` (JSON), ``error`` (500), ``missing`` (404), ``garbage`` (not JSON),
    ``slow`` (never answers until the server stops).
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.paths: list[str] = []
        self.url = ""
        self._release = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.paths.append(head.split(b" ", 2)[1].decode())
            if self.mode == "slow":
                await self._release.wait()
                return
            status, body = {
                "ok": (200, json.dumps({"id": -1, "price": 12.5, "stock": 3}).encode()),
                "error": (500, b'{"error": "boom"}'),
                "missing": (404, b'{"error": "no such item"}'),
                "garbage": (200, b"<html>not json</html>"),
            }[self.mode]
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()
            self._writers.discard(writer)

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[FakeUpstream]:
        """Listen on a free port while the block runs."""
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            self._release.set()
            server.close()
            for writer in list(self._writers):
                writer.close()
            await server.wait_closed()
