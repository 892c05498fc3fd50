"""Outage: the database connection is cut mid-load (a TCP proxy the test controls) and restored."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

from scoped_resources.testing import TcpProxy, create_postgres_database, drop_postgres_database

from ._harness import latency_ms, report, running_service, with_port

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.anyio]

WORKERS = 6
BEFORE = 2.0  # seconds of normal load before the cut
OUTAGE = 3.0  # seconds the database is unreachable
AFTER = 3.0  # seconds of load after the first success
RECOVERY_BUDGET = 15.0  # the first success must come within this after the restore
MAX_REQUESTS = 20_000
CLIENT_TIMEOUT = 15.0


@dataclass
class Outcome:
    """One request: when it started and ended (monotonic) and its status or error name."""

    start: float
    end: float
    status: int | str

    @property
    def ok(self) -> bool:
        """True for a 2xx answer."""
        return isinstance(self.status, int) and 200 <= self.status < 300


def _summary(outcomes: list[Outcome]) -> dict[str, object]:
    return {
        "requests": len(outcomes),
        "ok": sum(o.ok for o in outcomes),
        "answers": dict(Counter(str(o.status) for o in outcomes)),
        "latency_ms": latency_ms([o.end - o.start for o in outcomes]),
    }


@dataclass
class OutageRun:
    """What the clients saw around one outage."""

    before: list[Outcome]
    during: list[Outcome]
    after: list[Outcome]
    restored_at: float
    first_ok: float | None
    log: str
    retry_after: list[str | None]


async def _run_outage(pg_dsn: str, workdir: Path) -> OutageRun:
    """Load the service, cut its database for OUTAGE seconds, restore it, keep loading."""
    db = await create_postgres_database(pg_dsn, prefix="sr_faults_")
    try:
        async with TcpProxy("127.0.0.1", 5432) as proxy:
            env = {
                "DATABASE_URL": with_port(db.dsn, proxy.port),
                "DB_POOL_SIZE": "5",
                "FILES_DIR": str(workdir / "files"),
            }
            async with (
                running_service(env, workdir) as svc,
                httpx.AsyncClient(base_url=svc.url, timeout=CLIENT_TIMEOUT) as client,
            ):
                outcomes: list[Outcome] = []
                retry_after: list[str | None] = []
                stop = anyio.Event()

                async def worker(w: int) -> None:
                    i = 0
                    while not stop.is_set() and len(outcomes) < MAX_REQUESTS:
                        i += 1
                        start = time.monotonic()
                        try:
                            if i % 2:
                                response = await client.post("/items", json={"name": f"w{w}-{i}"})
                            else:
                                response = await client.get("/items", params={"limit": 5})
                            status: int | str = response.status_code
                            if response.status_code >= 500:
                                retry_after.append(response.headers.get("retry-after"))
                        except httpx.HTTPError as exc:
                            status = type(exc).__name__
                        outcomes.append(Outcome(start, time.monotonic(), status))
                        if not (isinstance(status, int) and status < 300):
                            await anyio.sleep(0.01)  # a client that retries, not a busy loop

                first_ok: float | None = None
                async with anyio.create_task_group() as tg:
                    for w in range(WORKERS):
                        tg.start_soon(worker, w)
                    await anyio.sleep(BEFORE)
                    cut_at = time.monotonic()
                    proxy.cut()
                    await anyio.sleep(OUTAGE)
                    restored_at = time.monotonic()
                    proxy.restore()
                    with anyio.move_on_after(RECOVERY_BUDGET):
                        while first_ok is None:
                            first_ok = min(
                                (o.end for o in outcomes if o.start >= restored_at and o.ok),
                                default=None,
                            )
                            await anyio.sleep(0.01)
                    if first_ok is not None:
                        await anyio.sleep(AFTER)
                    stop.set()
                log = svc.log_text()
    finally:
        await drop_postgres_database(pg_dsn, db.name)

    run = OutageRun(
        before=[o for o in outcomes if o.end < cut_at],
        during=[o for o in outcomes if cut_at <= o.start < restored_at],
        after=[o for o in outcomes if first_ok is not None and o.start >= first_ok],
        restored_at=restored_at,
        first_ok=first_ok,
        log=log,
        retry_after=retry_after,
    )
    report(
        "outage",
        workers=WORKERS,
        outage_s=OUTAGE,
        before=_summary(run.before),
        during=_summary(run.during),
        first_success_after_restore_s=(
            None if first_ok is None else round(first_ok - restored_at, 3)
        ),
        after=_summary(run.after),
        log_tracebacks=log.count("Traceback"),
    )
    return run


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Module scope, so that the one outage run is shared by this module's tests."""
    return "asyncio"


@pytest.fixture(scope="module")
async def outage(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> OutageRun:
    """One outage under load, shared by the tests that judge it (it cleans up after itself)."""
    return await _run_outage(pg_dsn, tmp_path_factory.mktemp("outage"))


class TestOutage:
    """The service answers through a database outage and recovers fully after it."""

    @pytest.mark.timeout(90)
    async def test_recovers_fully_after_the_outage(self, outage: OutageRun) -> None:
        """A 3 s cut under load: nothing hangs, a quick first success, then 100% success."""
        assert outage.before, "no request finished before the cut"
        assert all(o.ok for o in outage.before)
        assert outage.during, "no request was made during the outage"
        hung = [o for o in outage.during if o.end - o.start >= CLIENT_TIMEOUT - 1]
        assert not hung, "requests hung during the outage"
        assert outage.first_ok is not None, f"no success within {RECOVERY_BUDGET} s of the restore"
        assert outage.after, "no request after the first success"
        assert all(o.ok for o in outage.after), Counter(str(o.status) for o in outage.after)

    @pytest.mark.timeout(90)
    async def test_outage_errors_are_503_with_retry_after(self, outage: OutageRun) -> None:
        """Every request that fails during the outage is answered 503 with Retry-After."""
        failed = [o for o in outage.during if not o.ok]
        assert failed
        assert Counter(str(o.status) for o in failed) == {"503": len(failed)}
        assert all(value is not None for value in outage.retry_after)
        assert "Exception in ASGI application" not in outage.log
