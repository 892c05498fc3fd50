"""Shutdown in flight: SIGTERM while requests are in flight."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import anyio
import httpx
import pytest

from scoped_resources.testing import TempPostgres

from ._harness import (
    dirty_lines,
    fetchval,
    lock_waiters,
    owned_service,
    report,
    service_backends,
    table_lock,
    wait_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.anyio]

IN_FLIGHT = 5
#: ``python -m service`` gives uvicorn ``timeout_graceful_shutdown=10``.
GRACE = 10.0
#: How long the in-flight requests stay stuck after the signal.
STUCK_AFTER_SIGNAL = 1.0


class TestShutdownInFlight:
    """SIGTERM lets the requests in flight finish, then the process exits cleanly."""

    @pytest.mark.timeout(60)
    async def test_in_flight_requests_complete_and_the_exit_is_clean(
        self, service_env: dict[str, str], fault_db: TempPostgres, tmp_path: Path
    ) -> None:
        """5 writes stuck on a lock at SIGTERM all answer 201; exit 0 in the grace period."""
        service_env["DB_POOL_SIZE"] = str(IN_FLIGHT)
        dsn, db = fault_db.dsn, fault_db.name
        statuses: list[int | str] = []
        with owned_service(service_env, tmp_path) as svc:
            async with httpx.AsyncClient(base_url=svc.url, timeout=GRACE + 5) as client:

                async def write(i: int) -> None:
                    try:
                        response = await client.post("/items", json={"name": f"inflight-{i}"})
                        statuses.append(response.status_code)
                    except httpx.HTTPError as exc:
                        statuses.append(type(exc).__name__)

                async def all_in_flight() -> bool:
                    return len(lock_waiters(await service_backends(dsn, db))) == IN_FLIGHT

                async with anyio.create_task_group() as tg, table_lock(dsn):
                    for i in range(IN_FLIGHT):
                        tg.start_soon(write, i)
                    in_flight = await wait_until(all_in_flight, timeout=10)
                    svc.proc.send_signal(signal.SIGTERM)
                    signalled = time.monotonic()
                    await anyio.sleep(STUCK_AFTER_SIGNAL)
                    # A newcomer after the signal is turned away, not served.
                    try:
                        late: int | str = (await client.get("/healthz")).status_code
                    except httpx.HTTPError as exc:
                        late = type(exc).__name__
                    # the lock is released: the requests in flight can finish
                answered = time.monotonic() - signalled

            try:
                code: int | None = await anyio.to_thread.run_sync(svc.proc.wait, GRACE + 5)
            except subprocess.TimeoutExpired:
                code = None
            exited = time.monotonic() - signalled
            assert svc.proc.stdout is not None
            log = svc.log_text() + svc.proc.stdout.read()

        leftover = await service_backends(dsn, db)
        stored = await fetchval(dsn, "SELECT count(*) FROM items WHERE name LIKE 'inflight-%'")
        report(
            "shutdown_in_flight",
            in_flight=IN_FLIGHT,
            statuses=statuses,
            request_after_signal=late,
            answered_after_signal_s=round(answered, 2),
            exit_code=code,
            exited_after_signal_s=round(exited, 2),
            grace_s=GRACE,
            rows_stored=stored,
            leftover_connections=len(leftover),
            dirty_log_lines=dirty_lines(log),
        )
        assert in_flight is not None, "the requests never reached the database"
        assert statuses == [201] * IN_FLIGHT
        assert stored == IN_FLIGHT
        # uvicorn re-raises the signal it caught once the graceful shutdown is done, so
        # a clean stop ends "terminated by SIGTERM" (-15), as the shell conventions want.
        assert code in (0, -signal.SIGTERM), code
        assert "Application shutdown complete" in log
        assert exited <= GRACE
        assert dirty_lines(log) == []
        assert leftover == []
