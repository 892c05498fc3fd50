"""Restart: PostgreSQL, then Redis, is stopped for real under load and started again.

Not a proxy cut: the server process goes away (its sessions are terminated, new
connections are refused, then "the database system is starting up"), which is
what a failover or an upgrade does. Each scenario holds the machine's disruption
lock and always starts the server again, waiting until it answers.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest
import redis.asyncio

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
                if status == 201 and path == "/items":
                    written.append(int(response.json()["id"]))
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            outcomes.append(Outcome(path, start, time.monotonic(), status, retry_after))
            if not (isinstance(status, int) and status < 500):
                await anyio.sleep(0.01)  # a client that retries, not a busy loop

    async with anyio.create_task_group() as tg:
        for w in range(WORKERS):
            tg.start_soon(worker, w)


async def _restart_under_load(
    url: str,
    paths: Callable[[int, int], tuple[str, str]],
    stop_cmd: list[str],
    start_cmd: list[str],
    answers: Callable[[], Awaitable[bool]],
) -> RestartRun:
    outcomes: list[Outcome] = []
    written: list[int] = []
    stop = anyio.Event()
    async with (
        disruption_lock(),
        httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT) as client,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(_load, client, paths, outcomes, written, stop)
        try:
            await anyio.sleep(BEFORE)
            stopped_at = time.monotonic()
            async with server_stopped(stop_cmd, start_cmd, answers) as answering:
                await anyio.sleep(DOWN)
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
    return RestartRun(outcomes, stopped_at, answering_at, first_ok, written)


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
    assert set(statuses) == {"503"}, f"{statuses}; see the service log:\n{run.log[-6000:]}"
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

        async with running_service(service_env, tmp_path) as svc:
            run = await _restart_under_load(
                svc.url,
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

        async with running_service(service_env, tmp_path) as svc:
            run = await _restart_under_load(
                svc.url, paths, REDIS_STOP, REDIS_START, lambda: _redis_answers(redis_url)
            )
            run.log = svc.log_text()
        _figures(run, "redis_restart")
        _judge(run)
