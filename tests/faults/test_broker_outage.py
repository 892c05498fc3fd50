"""RabbitMQ outage: the broker stops for 5 s (``rabbitmqctl stop_app``) while items are created.

The outbox absorbs the events: every write still answers 201. Meanwhile
``/readyz`` answers 503 naming the broker and ``/healthz`` keeps answering 200
(a replica waiting for its broker must leave the load balancer, not be
restarted). Once the broker is back, the relay reconnects on its own and every
event reaches the consumer queue; the relay logs one line when publishing starts
failing and one when it works again, and no traceback.

The broker is shared by every test on the machine: the scenario holds the
machine's disruption lock for its whole run and always starts the broker again.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import anyio
import httpx
import pytest

from scoped_resources.testing import TempPostgres

from ._events import event_queue, outbox_items, unsent
from ._harness import dirty_lines, fetchval, latency_ms, report, running_service, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.anyio]

DISRUPT_LOCK = "/tmp/sr-disrupt.lock"  # the lock every disruptive test takes
LOCK_WAIT = 60.0
WORKERS = 4
BEFORE = 1.5  # seconds of load before the broker stops
OUTAGE = 5.0  # seconds the broker is stopped
AFTER = 4.0  # seconds of load after it is back
DELIVERY_BUDGET = 20.0  # every event must be published within this after the broker is back
PROBE_EVERY = 0.1
MAX_WRITES = 20_000


def _take_lock() -> int:
    fd = os.open(DISRUPT_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TimeoutError(f"{DISRUPT_LOCK} held for over {LOCK_WAIT} s") from None
            time.sleep(0.2)  # another disruptive test runs: wait for its end
        else:
            return fd


@asynccontextmanager
async def disruption_lock() -> AsyncIterator[None]:
    """Hold the machine's lock for disruptive tests (``flock`` on the same file)."""
    fd = await anyio.to_thread.run_sync(_take_lock)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


async def _rabbitmqctl(*args: str) -> None:
    await anyio.run_process(["rabbitmqctl", *args], check=True)


async def _broker_answers(amqp_url: str) -> bool:
    try:
        conn = await aio_pika.connect(amqp_url, timeout=2)
    except (OSError, aio_pika.exceptions.AMQPError):
        return False
    await conn.close()
    return True


@asynccontextmanager
async def broker_stopped(amqp_url: str) -> AsyncIterator[None]:
    """Stop the RabbitMQ application; start it again (and wait for it) whatever happens."""
    await _rabbitmqctl("stop_app")
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await _rabbitmqctl("start_app")
            await _rabbitmqctl("await_startup")
            back = await wait_until(lambda: _broker_answers(amqp_url), 30, interval=0.2)
            assert back is not None, "RabbitMQ does not answer after start_app"


@dataclass
class Probe:
    """One probe answer: when (monotonic), the path, the status and the body."""

    at: float
    path: str
    status: int | str
    body: str


@dataclass
class WriteOutcome:
    """One POST /items: when it started and ended, and its status or error name."""

    start: float
    end: float
    status: int | str


async def _writer(
    worker: int, client: httpx.AsyncClient, url: str, writes: list[WriteOutcome]
) -> None:
    for n in range(MAX_WRITES):
        start = time.monotonic()
        try:
            response = await client.post(f"{url}/items", json={"name": f"o-{worker}-{n}"})
            status: int | str = response.status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        writes.append(WriteOutcome(start, time.monotonic(), status))


async def _prober(client: httpx.AsyncClient, url: str, probes: list[Probe]) -> None:
    while True:
        for path in ("/healthz", "/readyz"):
            try:
                response = await client.get(f"{url}{path}")
                probes.append(Probe(time.monotonic(), path, response.status_code, response.text))
            except httpx.HTTPError as exc:
                probes.append(Probe(time.monotonic(), path, type(exc).__name__, ""))
        await anyio.sleep(PROBE_EVERY)  # a probe's period, as a kubelet has


async def _backlog(dsn: str, samples: list[tuple[float, int]]) -> None:
    while True:
        samples.append((time.monotonic(), await unsent(dsn)))
        await anyio.sleep(PROBE_EVERY)


@pytest.mark.timeout(180)
async def test_writes_succeed_and_every_event_arrives_across_a_broker_outage(
    fault_db: TempPostgres, amqp_url: str, service_env: dict[str, str], tmp_path: Path
) -> None:
    """A 5 s broker stop under write load: 201s throughout, not ready, alive, all events after."""
    async with disruption_lock(), event_queue(amqp_url) as queue:
        env = {
            **service_env,
            "AMQP_URL": amqp_url,
            "EVENTS_EXCHANGE": queue.exchange,
            "OUTBOX_POLL_SECONDS": "1",
        }
        writes: list[WriteOutcome] = []
        probes: list[Probe] = []
        backlog: list[tuple[float, int]] = []
        async with (
            running_service(env, tmp_path) as svc,
            httpx.AsyncClient(timeout=15) as client,
        ):
            async with anyio.create_task_group() as load:
                for worker in range(WORKERS):
                    load.start_soon(_writer, worker, client, svc.url, writes)
                load.start_soon(_prober, client, svc.url, probes)
                load.start_soon(_backlog, fault_db.dsn, backlog)
                await anyio.sleep(BEFORE)
                stopping = time.monotonic()
                async with broker_stopped(amqp_url):
                    down = time.monotonic()
                    await anyio.sleep(OUTAGE)
                    restarting = time.monotonic()
                back = time.monotonic()
                await anyio.sleep(AFTER)
                load.cancel_scope.cancel()
            delivered_in = await wait_until(
                lambda: _all_sent(fault_db.dsn, backlog), DELIVERY_BUDGET, interval=0.05
            )
            log = svc.log_text()
        rows = await outbox_items(fault_db.dsn)
        delivered = await queue.drain()

    assert delivered_in is not None, f"{await unsent(fault_db.dsn)} events never left the outbox"
    answers = Counter(str(w.status) for w in writes)
    during = [w for w in writes if w.start >= down and w.end <= restarting]
    assert answers == {"201": len(writes)}, f"writes failed: {answers}"
    assert during, "no write ran while the broker was down"

    health = [p for p in probes if p.path == "/healthz"]
    ready = [p for p in probes if p.path == "/readyz"]
    assert {p.status for p in health} == {200}, Counter(str(p.status) for p in health)
    not_ready = [p for p in ready if down <= p.at <= back and p.status == 503]
    assert not_ready, "readiness never reported the broker down"
    assert all("rabbitmq" in p.body for p in not_ready), not_ready[0].body
    assert [p for p in ready if p.at < stopping and p.status == 200], "not ready before the stop"
    ready_again = [p.at - back for p in ready if p.at > back and p.status == 200]
    assert ready_again, "readiness did not come back after the broker"

    # Every item's event arrived, once per id (copies counted).
    assert delivered.ids == rows.keys()
    committed = int(await fetchval(fault_db.dsn, "SELECT count(*) FROM items"))
    assert len(rows) == committed >= len(writes)
    assert all(len(ids) == 1 for ids in delivered.ids_per_item().values())

    # The backlog the outbox absorbed, and how soon after the broker's return it was worked off
    # (while the load goes on, one event per writer may be in flight at any time).
    peak = max(n for _, n in backlog)
    cleared = [t - back for t, n in backlog if t > back and n <= WORKERS]
    assert peak > WORKERS, f"no backlog built up during the outage: {peak}"
    assert cleared, "the backlog was never worked off"

    relay_down = [line for line in log.splitlines() if "cannot publish events" in line]
    relay_up = [line for line in log.splitlines() if "publishing again" in line]
    assert len(relay_down) <= 1, relay_down
    assert len(relay_up) == len(relay_down), (relay_down, relay_up)
    assert "Traceback" not in log, log[-3000:]
    report(
        "broker_outage",
        writes=len(writes),
        writes_during_outage=len(during),
        answers=dict(answers),
        write_latency_ms=latency_ms([w.end - w.start for w in writes]),
        write_latency_during_outage_ms=latency_ms([w.end - w.start for w in during]),
        stop_app_s=round(down - stopping, 2),
        start_app_s=round(back - restarting, 2),
        readyz_503_during_outage=len(not_ready),
        readyz_200_again_after_s=round(min(ready_again), 2),
        healthz=dict(Counter(str(p.status) for p in health)),
        events=len(rows),
        duplicates=delivered.duplicates,
        backlog_peak=peak,
        backlog_cleared_after_broker_back_s=round(min(cleared), 2),
        all_delivered_after_load_stopped_s=round(delivered_in, 2),
        relay_log_lines=relay_down + relay_up,
        other_log_lines=len(dirty_lines(log)),
        broker_client_warnings=sum("Connection attempt" in line for line in log.splitlines()),
    )


async def _all_sent(dsn: str, backlog: list[tuple[float, int]]) -> bool:
    backlog.append((time.monotonic(), await unsent(dsn)))
    return backlog[-1][1] == 0
