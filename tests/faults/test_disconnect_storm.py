"""Disconnect storm: clients vanish at random moments while the database hangs on a lock."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import anyio
import httpx
import pytest

from scoped_resources.testing import TempPostgres

from ._harness import (
    backends_on,
    busy,
    dirty_lines,
    fetchval,
    latency_ms,
    lock_waiters,
    probe,
    report,
    running_service,
    service_backends,
    table_lock,
    vanishing_client,
    wait_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.anyio]

#: Abandoned requests (2 shared CPUs: enough to cycle the pool ~100 times, done in seconds).
STORM_REQUESTS = 1500
#: Clients connected at once during the storm.
STORM_CONCURRENCY = 100
#: The longest a client waits before it vanishes (long enough to reach the database
#: even when the 2 shared cores are busy).
MAX_CLIENT_WAIT = 1.0
#: Hard bound of the storm itself.
STORM_BUDGET = 40.0
POOL_SIZE = 10
NORMAL_REQUESTS = 60


async def _normal_latencies(client: httpx.AsyncClient, tag: str) -> list[float]:
    """Sequential ordinary requests (alternating write and read); each must succeed."""
    samples = []
    for i in range(NORMAL_REQUESTS):
        start = time.monotonic()
        if i % 2:
            response = await client.get("/items", params={"limit": 5})
            assert response.status_code == 200, response.text
        else:
            response = await client.post("/items", json={"name": f"{tag}-{i}"})
            assert response.status_code == 201, response.text
        samples.append(time.monotonic() - start)
    return samples


class TestDisconnectStorm:
    """Abandoned requests give back every connection and transaction at once."""

    @pytest.mark.timeout(120)
    async def test_no_connection_is_left_busy_after_the_storm(
        self, service_env: dict[str, str], fault_db: TempPostgres, tmp_path: Path
    ) -> None:
        """After 1,500 abandoned writes on a locked table, nothing is busy and the pool is whole."""
        service_env["DB_POOL_SIZE"] = str(POOL_SIZE)
        dsn, db = fault_db.dsn, fault_db.name
        rng = random.Random(6)
        async with (
            running_service(service_env, tmp_path) as svc,
            httpx.AsyncClient(base_url=svc.url, timeout=30) as client,
        ):
            before = await _normal_latencies(client, "before")

            moments: Counter[str] = Counter()
            peak_backends = peak_waiting = 0
            async with table_lock(dsn):
                limiter = anyio.Semaphore(STORM_CONCURRENCY)

                async def one(i: int) -> None:
                    async with limiter:
                        moments[
                            await vanishing_client(svc.port, f"storm-{i}", rng, MAX_CLIENT_WAIT)
                        ] += 1

                async def sample() -> None:
                    nonlocal peak_backends, peak_waiting
                    conn = await probe(dsn)
                    try:
                        while True:
                            now = await backends_on(conn, db)
                            peak_backends = max(peak_backends, len(now))
                            peak_waiting = max(peak_waiting, len(lock_waiters(now)))
                            await anyio.sleep(0.05)
                    finally:
                        with anyio.CancelScope(shield=True):
                            await conn.close()

                storm_start = time.monotonic()
                with anyio.move_on_after(STORM_BUDGET):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(sample)
                        async with anyio.create_task_group() as storm:
                            for i in range(STORM_REQUESTS):
                                storm.start_soon(one, i)
                        tg.cancel_scope.cancel()
                storm_seconds = time.monotonic() - storm_start

                # Every client is gone: the work they started must be cancelled without
                # the lock ever being released (nothing in the database may still wait).
                async def nobody_waits() -> bool:
                    return not lock_waiters(await service_backends(dsn, db))

                cancel_seconds = await wait_until(nobody_waits, timeout=15)
            released_at = time.monotonic()

            await anyio.sleep(2 - (time.monotonic() - released_at))
            after_2s = await service_backends(dsn, db)
            committed = await fetchval(dsn, "SELECT count(*) FROM items WHERE name LIKE 'storm-%'")

            # The pool is whole: POOL_SIZE requests can all be inside the database at once.
            statuses: list[int] = []

            async def write(i: int) -> None:
                response = await client.post("/items", json={"name": f"whole-{i}"})
                statuses.append(response.status_code)

            async def all_inside() -> bool:
                return len(lock_waiters(await service_backends(dsn, db))) == POOL_SIZE

            async with anyio.create_task_group() as tg, table_lock(dsn):
                for i in range(POOL_SIZE):
                    tg.start_soon(write, i)
                inside = await wait_until(all_inside, timeout=10)
                # the lock is released here: the writes finish

            after = await _normal_latencies(client, "after")
            log = svc.log_text()

        report(
            "disconnect_storm",
            requests=sum(moments.values()),
            moments=dict(moments),
            storm_seconds=round(storm_seconds, 2),
            peak_service_connections=peak_backends,
            peak_waiting_on_the_lock=peak_waiting,
            pool_size=POOL_SIZE,
            cancelled_within_s=None if cancel_seconds is None else round(cancel_seconds, 2),
            busy_after_2s=len(busy(after_2s)),
            storm_rows_committed=committed,
            pool_whole=statuses.count(201) == POOL_SIZE,
            latency_before_ms=latency_ms(before),
            latency_after_ms=latency_ms(after),
            dirty_log_lines=len(dirty_lines(log)),
        )
        assert sum(moments.values()) == STORM_REQUESTS, "the storm did not finish in its budget"
        assert cancel_seconds is not None, "abandoned requests still wait in the database"
        assert busy(after_2s) == [], after_2s
        assert committed == 0
        assert peak_backends <= POOL_SIZE
        assert peak_waiting > 0, "the storm never reached the database"
        assert inside is not None, "the pool is not whole: fewer connections reach the database"
        assert statuses == [201] * POOL_SIZE
        assert latency_ms(after)["p95"] <= 3 * latency_ms(before)["p95"] + 50
        assert dirty_lines(log) == []
