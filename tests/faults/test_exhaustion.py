"""Exhaustion: 20x the pool size of concurrent slow requests."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import anyio
import httpx
import pytest

from scoped_resources.testing import TempPostgres

from ._harness import (
    busy,
    item_request,
    latency_ms,
    lock_waiters,
    percentile,
    report,
    running_service,
    service_backends,
    table_lock,
    wait_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.anyio]

POOL_SIZE = 10
REQUESTS = 20 * POOL_SIZE
#: Writes before the lock, so that the pool's hold estimate has samples to predict with.
WARM_UP = 4 * POOL_SIZE
#: How long a request may wait for a connection: the acquire deadline of the
#: SQLAlchemy adapter's ``db.connection`` (its default, which the service keeps).
ACQUIRE_DEADLINE = 5.0
#: Every refusal is answered within its deadline plus this (the bound asked for).
SLACK = 0.1
#: The lock (the slowness) lasts past the deadline, so that the extras must give up.
LOCK_SECONDS = ACQUIRE_DEADLINE + 2.0
CLIENT_TIMEOUT = 30.0


async def raw_post_item(port: int, name: str) -> tuple[int, str | None, float]:
    """``POST /items`` on a connection of its own: status, ``Retry-After``, when it was sent.

    Raw sockets rather than one ``httpx.AsyncClient``: a client pool of 200
    connections spends milliseconds per response on its own bookkeeping, which
    showed up as seconds of latency that the service never caused.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(item_request(port, name))
        await writer.drain()
        sent = time.monotonic()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = int(head.split(" ", 2)[1])
        fields = {
            key.strip().lower(): value.strip()
            for key, _, value in (line.partition(":") for line in head.split("\r\n")[1:])
            if value
        }
        await reader.readexactly(int(fields.get("content-length", "0")))
        return status, fields.get("retry-after"), sent
    finally:
        writer.close()


class TestExhaustion:
    """Past the pool, requests are refused in time with 503 + Retry-After; none hangs."""

    @pytest.mark.timeout(90)
    @pytest.mark.parametrize("warm_up", [WARM_UP, 0], ids=["warm", "cold"])
    async def test_extras_get_503_with_retry_after_within_the_deadline(
        self, service_env: dict[str, str], fault_db: TempPostgres, tmp_path: Path, warm_up: int
    ) -> None:
        """200 concurrent writes on a 10-connection pool while the database is locked for 7 s.

        Warm: the pool's hold estimate has samples first. Cold: the burst is the
        first traffic the service sees, so no lease has ever ended.
        """
        service_env["DB_POOL_SIZE"] = str(POOL_SIZE)
        dsn, db = fault_db.dsn, fault_db.name
        results: list[tuple[int | str, float, str | None]] = []
        probes: list[tuple[str, int, float]] = []
        #: Refusals counted from before the connection was opened (the client's share too).
        since_connect: list[float] = []
        async with (
            running_service(service_env, tmp_path) as svc,
            httpx.AsyncClient(
                base_url=svc.url,
                timeout=CLIENT_TIMEOUT,
                limits=httpx.Limits(max_connections=REQUESTS + 10),
            ) as client,
        ):

            async def write(i: int) -> None:
                start = sent = time.monotonic()
                status: int | str
                try:
                    with anyio.fail_after(CLIENT_TIMEOUT):
                        status, retry, sent = await raw_post_item(svc.port, f"slow-{i}")
                except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
                    status, retry = type(exc).__name__, None
                end = time.monotonic()
                results.append((status, end - sent, retry))
                if status == 503:
                    since_connect.append(end - start)

            async def probe_health(path: str) -> None:
                start = time.monotonic()
                response = await client.get(path)
                probes.append((path, response.status_code, time.monotonic() - start))

            warm = [
                (await client.post("/items", json={"name": f"warm-{i}"})).status_code
                for i in range(warm_up)
            ]

            async with anyio.create_task_group() as tg, table_lock(dsn):
                for i in range(REQUESTS):
                    tg.start_soon(write, i)

                async def pool_in_use() -> bool:
                    return len(lock_waiters(await service_backends(dsn, db))) == POOL_SIZE

                in_use = await wait_until(pool_in_use, timeout=5)
                await probe_health("/healthz")
                await probe_health("/readyz")
                await anyio.sleep(LOCK_SECONDS)
                # the lock is released: the requests holding the pool finish

            async def quiet() -> bool:
                return not busy(await service_backends(dsn, db))

            quiet_after = await wait_until(quiet, timeout=5)
            after = [
                (await client.post("/items", json={"name": f"after-{i}"})).status_code
                for i in range(POOL_SIZE * 2)
            ]

        statuses = Counter(str(s) for s, _, _ in results)
        refused = [(t, r) for s, t, r in results if s == 503]
        served = [t for s, t, _ in results if s == 201]
        report(
            "exhaustion",
            gate="warm" if warm_up else "cold",
            pool_size=POOL_SIZE,
            requests=len(results),
            answers=dict(statuses),
            refused_latency_ms=latency_ms([t for t, _ in refused]),
            retry_after=sorted({str(r) for _, r in refused}),
            served_latency_ms=latency_ms(served),
            refused_since_connect_ms=latency_ms(since_connect),
            lock_seconds=LOCK_SECONDS,
            probes_while_exhausted={p: [s, round(t * 1000, 1)] for p, s, t in probes},
            quiet_after_s=None if quiet_after is None else round(quiet_after, 2),
            after=after,
        )
        assert in_use is not None, "the pool never filled up"
        assert len(results) == REQUESTS
        assert statuses == {"503": REQUESTS - POOL_SIZE, "201": POOL_SIZE}
        assert warm == [201] * warm_up
        assert all(t <= ACQUIRE_DEADLINE + SLACK for t, _ in refused)
        assert all(r is not None and int(r) >= 1 for _, r in refused)
        # Shedding predicted the waits: most refusals came at once, not at the deadline.
        assert percentile([t for t, _ in refused], 50) < ACQUIRE_DEADLINE / 2
        assert {p: s for p, s, _ in probes}["/healthz"] == 200
        assert quiet_after is not None
        assert after == [201] * (POOL_SIZE * 2)
