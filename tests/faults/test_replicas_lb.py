"""Three replicas behind one HAProxy port behave as one service, within the database's budget.

Mixed load on every endpoint goes through the load balancer, which names the
replica of each response: a cache value written through one replica is read
through another, ids never repeat, and the service's PostgreSQL sessions never
outnumber ``DB_POOL_SIZE x DB_REPLICAS``. A configuration whose pools could
exceed the server's ``max_connections`` is refused at start-up.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from scoped_resources.exceptions import StartupFailed
from scoped_resources.testing import AppLifespan, TempPostgres
from service import Settings, create_app
from tests.service.processes import run_service
from tests.service.upstream import FakeUpstream

from ._cluster import haproxy, replicas
from ._harness import dirty_lines, latency_ms, probe, report

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.timeout(120)]

REPLICAS = 3
POOL_SIZE = 5
WORKERS = 12
ROUNDS = 6  # passes over every endpoint per worker (about 13 requests each)
APP_NAME = "sr-service"

_SESSIONS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2"
    " AND backend_type = 'client backend'"
)


class Load:
    """What the workers saw: statuses by endpoint, latencies, ids, cross-replica reads."""

    def __init__(self) -> None:
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.item_ids: list[int] = []
        self.user_ids: list[int] = []
        self.served: Counter[str] = Counter()
        self.cross_replica_reads = 0
        self.stale_reads: list[str] = []

    async def call(
        self,
        client: httpx.AsyncClient,
        endpoint: str,
        method: str,
        url: str,
        expect: int,
        **kwargs: Any,
    ) -> httpx.Response:
        started = time.perf_counter()
        response = await client.request(method, url, **kwargs)
        self.latencies.append(time.perf_counter() - started)
        self.statuses[(endpoint, response.status_code)] += 1
        self.served[response.headers.get("x-replica", "?")] += 1
        if response.status_code != expect:
            self.failures.append(f"{method} {url}: {response.status_code} {response.text[:200]}")
        return response


async def _round(client: httpx.AsyncClient, load: Load, worker: int, turn: int) -> None:
    """One pass over every endpoint; the cache key is this worker's, so its last write wins."""
    tag = f"w{worker}-t{turn}"
    item = await load.call(client, "POST /items", "POST", "/items", 201, json={"name": tag})
    item_id = int(item.json()["id"])
    load.item_ids.append(item_id)
    await load.call(client, "GET /items", "GET", "/items?limit=5", 200)
    await load.call(client, "GET /items/{id}/enriched", "GET", f"/items/{item_id}/enriched", 200)
    user = await load.call(
        client,
        "POST /users",
        "POST",
        "/users",
        201,
        json={"name": tag, "email": f"{tag}-{uuid.uuid4().hex[:8]}@lb.test"},
    )
    user_id = int(user.json()["id"])
    load.user_ids.append(user_id)
    await load.call(client, "GET /users/{id}", "GET", f"/users/{user_id}", 200)
    key = f"lb-{worker}"
    written = await load.call(
        client, "POST /cache/{key}", "POST", f"/cache/{key}", 200, params={"value": tag}
    )
    read = await load.call(client, "GET /cache/{key}", "GET", f"/cache/{key}", 200)
    if read.status_code == 200 and read.json().get("value") != tag:
        load.stale_reads.append(f"{key}: wrote {tag}, read {read.json().get('value')}")
    if written.headers.get("x-replica") != read.headers.get("x-replica"):
        load.cross_replica_reads += 1
    await load.call(client, "GET /combo", "GET", "/combo", 200)
    if turn % 4 == 0:
        name = f"{tag}.bin"
        body = os.urandom(2048)
        await load.call(client, "POST /files", "POST", "/files", 201, files={"file": (name, body)})
        got = await load.call(client, "GET /files/{name}", "GET", f"/files/{name}", 200)
        if got.status_code == 200 and got.content != body:
            load.failures.append(f"GET /files/{name}: other bytes than uploaded")
    await load.call(client, "GET /healthz", "GET", "/healthz", 200)
    await load.call(client, "GET /readyz", "GET", "/readyz", 200)


async def _run(
    env: dict[str, str], fault_db: TempPostgres, tmp_path: Path, load: Load
) -> tuple[int, float, int, str]:
    """Start the replicas and the balancer, run the load; peak sessions, seconds, rows, logs."""
    peak_sessions = 0
    with replicas(env, tmp_path, REPLICAS) as running, haproxy(tmp_path, running) as balancer:
        conn = await probe(fault_db.dsn)
        try:
            done = anyio.Event()

            async def sample_sessions() -> None:
                nonlocal peak_sessions
                while not done.is_set():
                    count = await conn.fetchval(_SESSIONS, fault_db.name, APP_NAME)
                    peak_sessions = max(peak_sessions, int(count))
                    await anyio.sleep(0.05)

            async def work(client: httpx.AsyncClient, worker: int) -> None:
                for turn in range(ROUNDS):
                    await _round(client, load, worker, turn)

            limits = httpx.Limits(max_connections=WORKERS)
            async with httpx.AsyncClient(
                base_url=balancer.url, limits=limits, timeout=30
            ) as client:
                started = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(sample_sessions)
                    async with anyio.create_task_group() as workers:
                        for worker in range(WORKERS):
                            workers.start_soon(work, client, worker)
                    done.set()
                elapsed = time.perf_counter() - started
            stored = int(await conn.fetchval("SELECT count(*) FROM items"))
        finally:
            await conn.close()
        logs = "".join(r.log_text() for r in running)
    return peak_sessions, elapsed, stored, logs


class TestReplicasBehindOnePort:
    async def test_mixed_load_through_haproxy_behaves_as_one_service(
        self, service_env: dict[str, str], fault_db: TempPostgres, tmp_path: Path
    ) -> None:
        """Every endpoint answers through HAProxy, reads see other replicas' writes, ids are
        unique, and sessions stay within the pools' budget."""
        load = Load()
        async with FakeUpstream().serve() as upstream:
            env = {
                **service_env,
                "DB_POOL_SIZE": str(POOL_SIZE),
                "DB_REPLICAS": str(REPLICAS),
                "UPSTREAM_URL": upstream.url,
            }
            peak_sessions, elapsed, stored, logs = await _run(env, fault_db, tmp_path, load)
        requests = sum(load.statuses.values())
        report(
            "replicas_lb",
            replicas=REPLICAS,
            pool_size=POOL_SIZE,
            requests=requests,
            seconds=round(elapsed, 2),
            req_per_s=round(requests / elapsed),
            latency_ms=latency_ms(load.latencies),
            served_by=dict(load.served),
            cross_replica_cache_reads=load.cross_replica_reads,
            stale_reads=len(load.stale_reads),
            failures=len(load.failures),
            peak_sessions=peak_sessions,
            session_budget=POOL_SIZE * REPLICAS,
        )
        assert load.failures == []
        assert load.stale_reads == []
        assert len(set(load.item_ids)) == len(load.item_ids) == WORKERS * ROUNDS
        assert len(set(load.user_ids)) == len(load.user_ids)
        assert stored == len(load.item_ids)
        assert set(load.served) == {f"r{i}" for i in range(REPLICAS)}
        assert load.cross_replica_reads > 0
        assert 0 < peak_sessions <= POOL_SIZE * REPLICAS
        assert dirty_lines(logs) == []


class TestPoolBudget:
    def _start(self, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
        return run_service(env, tmp_path)

    async def test_pools_beyond_max_connections_refuse_to_start(
        self, service_env: dict[str, str], fault_db: TempPostgres, tmp_path: Path
    ) -> None:
        """Pools that could exceed max_connections stop the start with exit 2 and every number."""
        conn = await probe(fault_db.dsn)
        try:
            max_connections = int(await conn.fetchval("SHOW max_connections"))
            reserved = int(await conn.fetchval("SHOW superuser_reserved_connections"))
            pool = min(max_connections, 1000)
            env = {**service_env, "DB_POOL_SIZE": str(pool), "DB_REPLICAS": "2"}
            # Held open during the start: the check must count it as in use by another client.
            result = await anyio.to_thread.run_sync(self._start, env, tmp_path)
            applied = await conn.fetchval(
                "SELECT count(*) FROM pg_tables WHERE tablename = 'items'"
            )
        finally:
            await conn.close()
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        report("pool_budget", exit_code=result.returncode, message=message)
        assert result.returncode == 2, result.stderr
        assert f"DB_POOL_SIZE={pool} x DB_REPLICAS=2 = {2 * pool} connections" in message
        assert f"max_connections={max_connections}" in message
        assert f"superuser_reserved_connections={reserved}" in message
        in_use = re.search(r"- (\d+) sessions in use by other clients", message)
        assert in_use is not None, message
        assert int(in_use.group(1)) >= 1, message
        assert "Lower DB_POOL_SIZE" in message
        assert "DATABASE_PGBOUNCER=1" in message
        assert "Traceback" not in result.stderr
        assert applied == 0  # refused before migrating

    async def test_an_app_made_in_process_fails_its_start_over_budget(
        self, fault_db: TempPostgres, tmp_path: Path
    ) -> None:
        """The same check runs in the app's start-up: it fails naming the schema resource."""
        settings = Settings(
            database_url=fault_db.dsn,
            db_pool_size=1000,
            db_replicas=2,
            files_dir=tmp_path / "files",
            _env_file=None,  # type: ignore[call-arg]
        )
        with pytest.raises(StartupFailed) as failed:
            async with AppLifespan(create_app(settings)):
                pytest.fail("the app started with pools beyond the budget")
        message = str(failed.value)
        assert "'schema'" in message
        assert "PoolBudgetExceeded" in message
        assert "DB_POOL_SIZE=1000 x DB_REPLICAS=2 = 2000 connections" in message
