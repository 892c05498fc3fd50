"""Rolling restart: two replicas behind HAProxy restarted one at a time with SIGTERM, under load.

The shape: HAProxy checks each replica's readiness endpoint; a replica that gets
SIGTERM stops listening at once and finishes the requests it holds (uvicorn's
graceful shutdown, then the app scope closes); a connection refused by it, or
reset before its request was read, is sent again to another replica
(``retry-on conn-failure empty-response``, ``option redispatch``, the request
buffered whole so that a POST can be re-sent). No client
request may fail while each replica in turn stops and comes back on its port.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import anyio
import httpx
import pytest

from scoped_resources.testing import TempPostgres

from ._cluster import Balancer, Replica, haproxy, replicas, server_name
from ._harness import dirty_lines, latency_ms, probe, report

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.timeout(150)]

REPLICAS = 2
WORKERS = 8


class Traffic:
    """Requests sent until told to stop: statuses, failures, latencies, replicas that served."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.served: Counter[str] = Counter()
        self.item_ids: list[int] = []
        self.stop = anyio.Event()

    async def send(
        self, client: httpx.AsyncClient, method: str, url: str, expect: int, **kwargs: object
    ) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            response = await client.request(method, url, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            self.failures.append(f"{method} {url}: {type(exc).__name__} {exc}")
            return None
        self.latencies.append(time.perf_counter() - started)
        self.statuses[response.status_code] += 1
        self.served[response.headers.get("x-replica", "?")] += 1
        if response.status_code != expect:
            self.failures.append(f"{method} {url}: {response.status_code} {response.text[:200]}")
            return None
        return response

    async def worker(self, client: httpx.AsyncClient, index: int) -> None:
        turn = 0
        while not self.stop.is_set():
            turn += 1
            tag = f"w{index}-t{turn}"
            created = await self.send(client, "POST", "/items", 201, json={"name": tag})
            if created is not None:
                self.item_ids.append(int(created.json()["id"]))
            await self.send(client, "GET", "/items?limit=5", 200)
            await self.send(client, "POST", f"/cache/roll-{index}", 200, params={"value": tag})
            await self.send(client, "GET", f"/cache/roll-{index}", 200)


def _roll(balancer: Balancer, replica: Replica) -> dict[str, float | int]:
    """Restart *replica* with SIGTERM and wait until HAProxy sends it traffic again."""
    name = server_name(replica)
    started = time.monotonic()
    code = replica.terminate()
    stopped = time.monotonic()
    balancer.wait_state(name, "DOWN")
    replica.start()
    listening = time.monotonic()
    balancer.wait_state(name, "UP")
    up = time.monotonic()
    return {
        "exit_code": code,
        "drain_s": round(stopped - started, 2),
        "start_s": round(listening - stopped, 2),
        "back_in_rotation_s": round(up - listening, 2),
    }


class TestRollingRestart:
    async def test_replicas_restarted_one_at_a_time_under_load_fail_no_request(
        self, service_env: dict[str, str], fault_db: TempPostgres, tmp_path: Path
    ) -> None:
        """Each replica in turn gets SIGTERM and comes back while load runs: 0 failed requests."""
        env = {**service_env, "DB_POOL_SIZE": "5", "DB_REPLICAS": str(REPLICAS)}
        traffic = Traffic()
        restarts: list[dict[str, float | int]] = []
        with replicas(env, tmp_path, REPLICAS) as running, haproxy(tmp_path, running) as balancer:
            limits = httpx.Limits(max_connections=WORKERS)
            async with httpx.AsyncClient(
                base_url=balancer.url, limits=limits, timeout=30
            ) as client:
                started = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for index in range(WORKERS):
                        tg.start_soon(traffic.worker, client, index)
                    await anyio.sleep(1)  # load before the first restart
                    for replica in running:
                        roll = await anyio.to_thread.run_sync(_roll, balancer, replica)
                        restarts.append(roll)
                    await anyio.sleep(1)  # and after the last
                    traffic.stop.set()
                elapsed = time.perf_counter() - started
            logs = "".join(r.log_text() for r in running)
        conn = await probe(fault_db.dsn)
        try:
            stored = int(await conn.fetchval("SELECT count(*) FROM items"))
        finally:
            await conn.close()
        requests = sum(traffic.statuses.values()) + sum(1 for f in traffic.failures if "Error" in f)
        report(
            "rolling_restart",
            replicas=REPLICAS,
            requests=requests,
            seconds=round(elapsed, 2),
            req_per_s=round(requests / elapsed),
            failed=len(traffic.failures),
            latency_ms=latency_ms(traffic.latencies),
            served_by=dict(traffic.served),
            restarts=restarts,
        )
        assert traffic.failures == []
        # uvicorn ends a clean stop "terminated by SIGTERM" (-15), as the shell conventions want.
        assert all(r["exit_code"] in (0, -signal.SIGTERM) for r in restarts), restarts
        assert stored == len(traffic.item_ids) == len(set(traffic.item_ids))
        assert all(r.starts == 2 for r in running)
        assert dirty_lines(logs) == []
