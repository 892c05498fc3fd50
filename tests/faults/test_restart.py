"""Restart: PostgreSQL, then Redis, is stopped for real under load and started again.

Not a proxy cut: the server process goes away (its sessions are terminated, new
connections are refused, then "the database system is starting up"), which is
what a failover or an upgrade does. Each scenario holds the machine's disruption
lock and always starts the server again, waiting until it answers.
"""

import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import anyio
import asyncpg
import httpx
import pytest
import redis.asyncio
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from scoped_resources import Resources, Use
from scoped_resources.adapters.postgres import Postgres
from scoped_resources.testing import TempPostgres

from ._harness import fetchval, latency_ms, report, running_service, wait_until
from .test_broker_outage import disruption_lock

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.anyio]

WORKERS = 6
BEFORE = 1.0  # seconds of load before the stop
DOWN = 2.0  # seconds the server stays stopped
AFTER = 1.5  # seconds of load after the first success
FIRST_SUCCESS_BUDGET = 1.0  # after the server answers again
MAX_REQUESTS = 20_000
CLIENT_TIMEOUT = 15.0
START_WAIT = 30.0

CLUSTER = (os.listdir("/etc/postgresql") or ["15"])[0] if os.path.isdir("/etc/postgresql") else "15"
PG_CTL = ["pg_ctlcluster", "--skip-systemctl-redirect", CLUSTER, "main"]
REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
    "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip
REDIS_STOP = ["redis-cli", "-p", "6379", "shutdown", "nosave"]


@dataclass
class Outcome:
    """One request: its path, when it started and ended (monotonic), its status or error."""

    path: str
    start: float
    end: float
    status: int | str
    retry_after: str | None = None
    body: str = ""

    @property
    def ok(self) -> bool:
        """True when the service did its work: 2xx, or a 4xx such as a missing key."""
        return isinstance(self.status, int) and 200 <= self.status < 500


@dataclass
class RestartRun:
    """What the clients saw around one restart."""

    outcomes: list[Outcome]
    stopped_at: float
    answering_at: float
    first_ok: float | None
    written: list[int] = field(default_factory=list)
    log: str = ""
    #: /readyz while the server was down: status and body (None: not asked).
    readiness: tuple[int, str] | None = None

    def failed(self) -> list[Outcome]:
        """The answers that were 5xx or no answer at all."""
        return [o for o in self.outcomes if not o.ok]


async def _pg_answers(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


async def _redis_answers(url: str) -> bool:
    client = redis.asyncio.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(await client.ping())
    except (OSError, redis.exceptions.RedisError):
        return False
    finally:
        await client.aclose()


@asynccontextmanager
async def server_stopped(
    stop: list[str], start: list[str], answers: Callable[[], Awaitable[bool]]
) -> AsyncIterator[list[float]]:
    """Stop a server; start it again whatever happens and wait until it answers.

    Yields a list that receives the monotonic time at which it answered again.
    """
    await anyio.run_process(stop, check=False)
    answering: list[float] = []
    try:
        yield answering
    finally:
        with anyio.CancelScope(shield=True):
            if not await answers():
                await anyio.run_process(start, check=False)
            back = await wait_until(answers, START_WAIT, interval=0.02)
            assert back is not None, f"{start[0]} does not answer after a restart"
            if not answering:
                answering.append(time.monotonic())


async def _load(
    client: httpx.AsyncClient,
    paths: Callable[[int, int], tuple[str, str]],
    outcomes: list[Outcome],
    written: list[int],
    stop: anyio.Event,
) -> None:
    async def worker(w: int) -> None:
        i = 0
        while not stop.is_set() and len(outcomes) < MAX_REQUESTS:
            i += 1
            method, path = paths(w, i)
            start = time.monotonic()
            retry_after = None
            try:
                if method == "POST" and path == "/items":
                    response = await client.post(path, json={"name": f"restart-{w}-{i}"})
                elif method == "POST":
                    response = await client.post(path, params={"value": f"v{i}"})
                else:
                    response = await client.get(path)
                status: int | str = response.status_code
                retry_after = response.headers.get("retry-after")
                code = response.status_code
                body = response.text[:500] if code >= 500 and code != 503 else ""
                if status == 201 and path == "/items":
                    written.append(int(response.json()["id"]))
            except httpx.HTTPError as exc:
                status, body = type(exc).__name__, str(exc)
            outcomes.append(Outcome(path, start, time.monotonic(), status, retry_after, body))
            if not (isinstance(status, int) and status < 500):
                await anyio.sleep(0.01)  # a client that retries, not a busy loop

    async with anyio.create_task_group() as tg:
        for w in range(WORKERS):
            tg.start_soon(worker, w)


async def _restart_under_load(
    client: httpx.AsyncClient,
    paths: Callable[[int, int], tuple[str, str]],
    stop_cmd: list[str],
    start_cmd: list[str],
    answers: Callable[[], Awaitable[bool]],
    *,
    ask_readiness: bool = True,
) -> RestartRun:
    outcomes: list[Outcome] = []
    written: list[int] = []
    stop = anyio.Event()
    async with disruption_lock(), anyio.create_task_group() as tg:
        tg.start_soon(_load, client, paths, outcomes, written, stop)
        try:
            await anyio.sleep(BEFORE)
            stopped_at = time.monotonic()
            readiness: tuple[int, str] | None = None
            async with server_stopped(stop_cmd, start_cmd, answers) as answering:
                await anyio.sleep(DOWN / 2)
                if ask_readiness:
                    ready = await client.get("/readyz")
                    readiness = (ready.status_code, ready.text)
                await anyio.sleep(DOWN / 2)
                await anyio.run_process(start_cmd, check=False)
                back = await wait_until(answers, START_WAIT, interval=0.01)
                assert back is not None
                answering.append(time.monotonic())
            answering_at = answering[0]
            first_ok: float | None = None
            with anyio.move_on_after(FIRST_SUCCESS_BUDGET + 10):
                while first_ok is None:
                    first_ok = min(
                        (o.end for o in outcomes if o.start >= answering_at and o.ok),
                        default=None,
                    )
                    await anyio.sleep(0.01)
            await anyio.sleep(AFTER)
        finally:
            stop.set()
    run = RestartRun(outcomes, stopped_at, answering_at, first_ok, written)
    run.readiness = readiness
    return run


def _figures(run: RestartRun, scenario: str) -> None:
    during = [o for o in run.outcomes if run.stopped_at <= o.start < run.answering_at]
    failed = run.failed()
    report(
        scenario,
        workers=WORKERS,
        down_s=DOWN,
        requests=len(run.outcomes),
        answers=dict(Counter(str(o.status) for o in run.outcomes)),
        during=dict(Counter(str(o.status) for o in during)),
        failed_latency_ms=latency_ms([o.end - o.start for o in failed]),
        first_success_after_restart_s=(
            None if run.first_ok is None else round(run.first_ok - run.answering_at, 3)
        ),
        acknowledged_writes=len(run.written),
        log_records=_log_summary(run.log),
    )


def _log_summary(log: str) -> dict[str, int]:
    return {
        "tracebacks": log.count("Traceback"),
        "asgi_exceptions": log.count("Exception in ASGI application"),
        "lines": len(log.splitlines()),
    }


def _judge(run: RestartRun) -> None:
    failed = run.failed()
    assert failed, "no request failed: the server was not really stopped under load"
    statuses = Counter(str(o.status) for o in failed)
    bodies = [o.body for o in failed if o.status != 503][:5]
    assert set(statuses) == {"503"}, f"{statuses}: {bodies}; the log:\n{run.log[-6000:]}"
    assert all(o.retry_after and int(o.retry_after) >= 1 for o in failed)
    assert run.first_ok is not None, "no success after the restart"
    assert run.first_ok - run.answering_at <= FIRST_SUCCESS_BUDGET
    assert "Exception in ASGI application" not in run.log


class TestPostgresRestart:
    """PostgreSQL stopped and started under read and write load."""

    @pytest.mark.timeout(120)
    async def test_restart_answers_503_loses_no_write_and_recovers_within_a_second(
        self, service_env: dict[str, str], fault_db: TempPostgres, tmp_path: Path
    ) -> None:
        """No 500, every failure 503 with Retry-After, every 201 stored, quick recovery."""
        dsn = fault_db.dsn

        def paths(w: int, i: int) -> tuple[str, str]:
            return ("POST", "/items") if i % 2 else ("GET", "/items?limit=5")

        async with (
            running_service(service_env, tmp_path) as svc,
            httpx.AsyncClient(base_url=svc.url, timeout=CLIENT_TIMEOUT) as client,
        ):
            run = await _restart_under_load(
                client,
                paths,
                [*PG_CTL, "stop", "-m", "fast"],
                [*PG_CTL, "start"],
                lambda: _pg_answers(dsn),
            )
            run.log = svc.log_text()
        stored = await fetchval(
            dsn, "SELECT count(*) FROM items WHERE id = ANY($1::bigint[])", run.written
        )
        _figures(run, "postgres_restart")
        report("postgres_restart_writes", acknowledged=len(run.written), stored=stored)
        _judge(run)
        assert run.readiness is not None
        assert run.readiness[0] == 503
        assert "not ready: db.engine" in run.readiness[1], run.readiness
        assert stored == len(run.written), "an acknowledged write is missing"


class TestRedisRestart:
    """Redis stopped and started under /cache and /combo load."""

    @pytest.mark.timeout(120)
    async def test_restart_answers_503_and_recovers_within_a_second(
        self, service_env: dict[str, str], redis_url: str, tmp_path: Path
    ) -> None:
        """No 500 on /cache or /combo while Redis restarts; every failure 503 with Retry-After."""

        def paths(w: int, i: int) -> tuple[str, str]:
            kind = (w + i) % 3
            if kind == 0:
                return "POST", f"/cache/restart-{w}"
            if kind == 1:
                return "GET", "/combo"
            return "GET", "/cache/restart-missing"

        async with (
            running_service(service_env, tmp_path) as svc,
            httpx.AsyncClient(base_url=svc.url, timeout=CLIENT_TIMEOUT) as client,
        ):
            run = await _restart_under_load(
                client, paths, REDIS_STOP, REDIS_START, lambda: _redis_answers(redis_url)
            )
            run.log = svc.log_text()
        _figures(run, "redis_restart")
        _judge(run)
        assert run.readiness is not None
        assert run.readiness[0] == 503
        assert "not ready: redis" in run.readiness[1], run.readiness


def _asyncpg_app(dsn: str) -> FastAPI:
    """An app on the asyncpg adapter with no error handlers of its own: the library's answers."""
    resources = Resources("restart")
    pg = Postgres(resources, dsn, name="pg", max_size=5)
    app = FastAPI(lifespan=resources.lifespan)

    @app.get("/items")
    async def list_items(conn: Annotated[asyncpg.Connection, Use(pg.connection)]) -> list[int]:
        return [r["id"] for r in await conn.fetch("SELECT id FROM t ORDER BY id DESC LIMIT 5")]

    @app.post("/items", status_code=201)
    async def create_item(
        body: dict[str, str], conn: Annotated[asyncpg.Connection, Use(pg.transaction)]
    ) -> dict[str, int]:
        item_id = await conn.fetchval("INSERT INTO t (name) VALUES ($1) RETURNING id", body["name"])
        return {"id": int(item_id)}

    return app


class TestPostgresRestartOnAsyncpg:
    """The same restart on the asyncpg adapter, answered by the library alone."""

    @pytest.mark.timeout(120)
    async def test_restart_answers_503_and_loses_no_write(self, fault_db: TempPostgres) -> None:
        """No 500 from the asyncpg path; every failure 503 with Retry-After; every 201 stored."""
        dsn = fault_db.dsn
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE TABLE t (id bigserial PRIMARY KEY, name text NOT NULL)")
        finally:
            await conn.close()

        def paths(w: int, i: int) -> tuple[str, str]:
            return ("POST", "/items") if i % 2 else ("GET", "/items")

        async with LifespanManager(_asyncpg_app(dsn)) as manager:
            transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://app", timeout=CLIENT_TIMEOUT
            ) as client:
                run = await _restart_under_load(
                    client,
                    paths,
                    [*PG_CTL, "stop", "-m", "fast"],
                    [*PG_CTL, "start"],
                    lambda: _pg_answers(dsn),
                    ask_readiness=False,
                )
        stored = await fetchval(
            dsn, "SELECT count(*) FROM t WHERE id = ANY($1::bigint[])", run.written
        )
        _figures(run, "postgres_restart_asyncpg")
        report("postgres_restart_asyncpg_writes", acknowledged=len(run.written), stored=stored)
        _judge(run)
        assert stored == len(run.written), "an acknowledged write is missing"
