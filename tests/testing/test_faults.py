"""Fault helpers: the TCP proxy fixture and cancellation at every await point."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest

from scoped_resources import Resources
from scoped_resources.testing import (
    CancelledAtError,
    TcpProxy,
    cancel_at_each_await,
    count_await_points,
)

pytestmark = pytest.mark.anyio


class TestTcpProxyFixture:
    """The proxy fixture cuts and restores a connection to the real PostgreSQL."""

    @pytest.mark.integration
    async def test_cut_breaks_the_connection_and_restore_allows_a_new_one(
        self, tcp_proxy: Callable[[str, int], Awaitable[TcpProxy]], pg_dsn: str
    ) -> None:
        """A query through a cut proxy fails; after restore a new connection works."""
        import asyncpg

        proxy = await tcp_proxy("127.0.0.1", 5432)
        dsn = pg_dsn.replace(":5432/", f":{proxy.port}/")
        conn = await asyncpg.connect(dsn)
        try:
            proxy.cut()
            with pytest.raises((ConnectionError, asyncpg.PostgresError, OSError)):
                await conn.fetchval("SELECT 1")
        finally:
            conn.terminate()
        proxy.restore()
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()


async def three_points(log: list[str]) -> str:
    """Suspend three times, logging around each suspension."""
    for n in range(3):
        log.append(f"before {n}")
        await anyio.lowlevel.checkpoint()
    log.append("done")
    return "done"


class TestCancelAtEachAwait:
    """Every await point is cancelled once, and the full run is counted."""

    async def test_counts_the_await_points(self) -> None:
        """An uncancelled run of three checkpoints counts three points."""
        assert await count_await_points(lambda: three_points([])) == 3

    async def test_cancels_at_each_point_then_completes(self) -> None:
        """Runs 1..3 stop after 1..3 suspensions; run 4 completes; the result is 3."""
        log: list[str] = []
        checked: list[int] = []
        points = await cancel_at_each_await(lambda: three_points(log), after_each=checked.append)
        assert points == 3
        assert checked == [1, 2, 3]
        assert log.count("done") == 1
        assert log.count("before 0") == 4

    async def test_an_error_on_cancellation_names_the_point(self) -> None:
        """A coroutine that turns the cancellation into another error is reported with the point."""

        async def misbehaves() -> None:
            try:
                await anyio.lowlevel.checkpoint()
                await anyio.lowlevel.checkpoint()
            except anyio.get_cancelled_exc_class():
                raise ValueError("swallowed the cancel") from None

        with pytest.raises(CancelledAtError, match="await point 1") as caught:
            await cancel_at_each_await(misbehaves)
        assert caught.value.point == 1

    async def test_a_scope_cancelled_anywhere_releases_its_resource(self) -> None:
        """Cancelling a request scope at each await point always releases the connection."""
        resources = Resources()
        held: list[str] = []

        @resources.request
        async def connection() -> AsyncIterator[str]:
            held.append("conn")
            try:
                await anyio.lowlevel.checkpoint()
                yield "conn"
            finally:
                held.remove("conn")
                await anyio.lowlevel.checkpoint()

        async def request() -> None:
            async with resources.scope("request") as scope:
                await scope.get(connection)
                await anyio.lowlevel.checkpoint()

        def nothing_held(point: int) -> None:
            assert held == [], f"leaked after a cancel at point {point}"

        async with resources.open():
            points = await cancel_at_each_await(request, after_each=nothing_held)
        assert points >= 2
