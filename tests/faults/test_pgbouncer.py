"""The service through PgBouncer in transaction mode, with ``DATABASE_PGBOUNCER=1``.

PgBouncer (started by the test, ``pool_mode = transaction``) hands each
transaction whichever server connection is free, so prepared statements must
neither be cached nor share names. The service's contract tests on the real
backend run through it, and a service process under concurrent writes keeps
PostgreSQL's sessions at PgBouncer's pool size, whatever its own pool.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest

from scoped_resources.testing import TempPostgres

from ._cluster import pgbouncer
from ._harness import PROBE_APP, dirty_lines, latency_ms, probe, report, running_service, with_port

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

ROOT = Path(__file__).resolve().parents[2]
#: The service's contract on the real backend: the API, auth, the outbox, two replicas.
#: (The file tests are left out: they never reach the database.)
CONTRACT = [
    "tests/service/test_api.py",
    "tests/service/test_auth.py",
    "tests/service/test_outbox.py",
    "tests/service/test_replicas.py",
]
WRITES = 200
BOUNCER_POOL = 3

_SERVER_SESSIONS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
    " AND backend_type = 'client backend' AND application_name <> $2"
)


class TestPgBouncer:
    @pytest.mark.timeout(400)
    def test_contract_suite_passes_through_pgbouncer(self, pg_dsn: str, tmp_path: Path) -> None:
        """The service's real-backend contract tests pass with the database behind PgBouncer."""
        with pgbouncer(tmp_path, pool_size=5) as bouncer:
            env = {
                **os.environ,
                "SR_TEST_PG_DSN": with_port(pg_dsn, bouncer.port),
                "DATABASE_PGBOUNCER": "1",
                "SR_REQUIRE_SERVICES": "1",
                "PYTHONPATH": str(ROOT),
            }
            started = time.perf_counter()
            result = subprocess.run(  # noqa: S603 - our own interpreter and test files
                [sys.executable, "-m", "pytest", "-q", *CONTRACT, "-k", "real or Replicas"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=360,
                check=False,
            )
            elapsed = time.perf_counter() - started
        summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        bouncer_log = bouncer.log.read_text(errors="replace")
        report("pgbouncer_contract", summary=summary, seconds=round(elapsed, 1))
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        assert " passed" in summary
        assert "skipped" not in summary
        # The suite's own database was reached through PgBouncer, not around it.
        assert "registered new auto-database: db=sr_service_test_" in bouncer_log

    @pytest.mark.timeout(120)
    async def test_service_writes_through_pgbouncer_on_its_pool(
        self, service_env: dict[str, str], fault_db: TempPostgres, tmp_path: Path
    ) -> None:
        """Concurrent writes through PgBouncer all succeed on no more sessions than its pool."""
        with pgbouncer(tmp_path, pool_size=BOUNCER_POOL) as bouncer:
            env = {
                **service_env,
                "DATABASE_URL": with_port(fault_db.dsn, bouncer.port),
                "DATABASE_PGBOUNCER": "1",
                "DB_POOL_SIZE": "10",
            }
            conn = await probe(fault_db.dsn)
            peak = 0
            try:
                async with running_service(env, tmp_path) as svc:
                    done = anyio.Event()

                    async def sample() -> None:
                        nonlocal peak
                        while not done.is_set():
                            count = await conn.fetchval(_SERVER_SESSIONS, fault_db.name, PROBE_APP)
                            peak = max(peak, int(count))
                            await anyio.sleep(0.05)

                    latencies: list[float] = []
                    statuses: list[int] = []

                    async def write(client: httpx.AsyncClient, index: int) -> None:
                        begun = time.perf_counter()
                        response = await client.post("/items", json={"name": f"pgb-{index}"})
                        latencies.append(time.perf_counter() - begun)
                        statuses.append(response.status_code)

                    limits = httpx.Limits(max_connections=20)
                    async with httpx.AsyncClient(
                        base_url=svc.url, limits=limits, timeout=30
                    ) as client:
                        started = time.perf_counter()
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(sample)
                            async with anyio.create_task_group() as writers:
                                for index in range(WRITES):
                                    writers.start_soon(write, client, index)
                            done.set()
                        elapsed = time.perf_counter() - started
                        listed = (await client.get("/items?limit=100")).status_code
                    log = svc.log_text()
                stored = int(await conn.fetchval("SELECT count(*) FROM items"))
            finally:
                await conn.close()
        report(
            "pgbouncer_writes",
            writes=WRITES,
            req_per_s=round(WRITES / elapsed),
            latency_ms=latency_ms(latencies),
            peak_server_sessions=peak,
            bouncer_pool=BOUNCER_POOL,
            service_pool=10,
        )
        assert statuses == [201] * WRITES
        assert listed == 200
        assert stored == WRITES
        assert 0 < peak <= BOUNCER_POOL
        assert dirty_lines(log) == []
