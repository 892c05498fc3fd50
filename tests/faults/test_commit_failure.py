"""Commit failure: writes whose COMMIT fails are answered 5xx and leave nothing behind."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import anyio
import httpx
import pytest

from scoped_resources.testing import TempPostgres

from ._harness import (
    busy,
    fetchval,
    probe,
    report,
    running_service,
    service_backends,
    wait_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.anyio]

WRITES = 40  # of each kind: poisoned and good
CONCURRENCY = 10
EVENT_WAIT = 15.0

#: A deferred constraint trigger: every statement succeeds, the COMMIT fails.
POISON = [
    "CREATE FUNCTION faults_refuse_commit() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'commit refused by the fault suite'; END $$",
    "CREATE CONSTRAINT TRIGGER faults_poison AFTER INSERT ON items "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.name LIKE 'poison-%') "
    "EXECUTE FUNCTION faults_refuse_commit()",
]


@pytest.fixture
async def exchange(amqp_url: str) -> AsyncIterator[str]:
    """A RabbitMQ exchange name of this test's own, deleted afterwards."""
    name = f"sr-faults-{uuid.uuid4().hex[:10]}"
    yield name
    conn = await aio_pika.connect(amqp_url)
    try:
        channel = await conn.channel()
        await channel.exchange_delete(name)
    finally:
        await conn.close()


class TestCommitFailure:
    """A write whose COMMIT fails is a 5xx and stores no row and no event."""

    @pytest.mark.timeout(90)
    async def test_failed_commits_answer_5xx_with_no_rows_and_no_events(
        self,
        service_env: dict[str, str],
        fault_db: TempPostgres,
        amqp_url: str,
        exchange: str,
        tmp_path: Path,
    ) -> None:
        """Poisoned writes get 5xx, leave zero rows and zero events; good ones all arrive."""
        service_env.update(AMQP_URL=amqp_url, EVENTS_EXCHANGE=exchange, OUTBOX_POLL_SECONDS="0.2")
        dsn = fault_db.dsn
        broker = await aio_pika.connect(amqp_url)
        try:
            channel = await broker.channel()
            async with running_service(service_env, tmp_path) as svc:
                # The service declared the exchange at start-up; listen to all of it.
                ex = await channel.declare_exchange(
                    exchange, aio_pika.ExchangeType.TOPIC, durable=True
                )
                queue = await channel.declare_queue(exclusive=True)
                await queue.bind(ex, routing_key="#")
                conn = await probe(dsn)
                try:
                    for statement in POISON:
                        await conn.execute(statement)
                finally:
                    await conn.close()

                statuses: dict[str, list[int]] = {"poison": [], "good": []}
                limiter = anyio.Semaphore(CONCURRENCY)
                async with httpx.AsyncClient(base_url=svc.url, timeout=30) as client:

                    async def write(kind: str, i: int) -> None:
                        async with limiter:
                            response = await client.post("/items", json={"name": f"{kind}-{i}"})
                            statuses[kind].append(response.status_code)

                    start = time.monotonic()
                    async with anyio.create_task_group() as tg:
                        for i in range(WRITES):
                            tg.start_soon(write, "poison", i)
                            tg.start_soon(write, "good", i)
                    write_seconds = time.monotonic() - start

                    # Events are delivered at least once: count distinct message ids.
                    # Wait for every good event, then a second more for a late poisoned one.
                    names: dict[str, str] = {}
                    deadline = time.monotonic() + EVENT_WAIT
                    while time.monotonic() < deadline:
                        message = await queue.get(no_ack=True, fail=False)
                        if message is None:
                            await anyio.sleep(0.05)
                            continue
                        names[str(message.message_id)] = json.loads(message.body)["name"]
                        if sum(n.startswith("good-") for n in names.values()) == WRITES:
                            deadline = min(deadline, time.monotonic() + 1.0)

                    after = await client.post("/items", json={"name": "after"})

                # The outbox relay polls every 0.2 s: it may be caught mid-query, but
                # nothing may stay busy (a failed COMMIT left in a transaction).
                async def quiet() -> bool:
                    return not busy(await service_backends(dsn, fault_db.name))

                quiet_after = await wait_until(quiet, timeout=5, interval=0.02)
                poison_items = await fetchval(
                    dsn, "SELECT count(*) FROM items WHERE name LIKE 'poison-%'"
                )
                orphan_logs = await fetchval(
                    dsn, "SELECT count(*) FROM logs WHERE item_id NOT IN (SELECT id FROM items)"
                )
                poison_outbox = await fetchval(
                    dsn, "SELECT count(*) FROM outbox WHERE payload LIKE '%\"poison-%'"
                )
                good_items = await fetchval(
                    dsn, "SELECT count(*) FROM items WHERE name LIKE 'good-%'"
                )
        finally:
            await broker.close()

        poison_events = sum(n.startswith("poison-") for n in names.values())
        good_events = sum(n.startswith("good-") for n in names.values())
        report(
            "commit_failure",
            writes_each=WRITES,
            write_seconds=round(write_seconds, 2),
            poison_statuses=sorted(set(statuses["poison"])),
            good_statuses=sorted(set(statuses["good"])),
            poison_rows=poison_items,
            orphan_log_rows=orphan_logs,
            poison_outbox_rows=poison_outbox,
            poison_events=poison_events,
            good_rows=good_items,
            good_events=good_events,
            quiet_after_s=None if quiet_after is None else round(quiet_after, 2),
            failed_commits_logged=svc.log_text().count("releasing resource 'tx' failed"),
            write_after_failures=after.status_code,
        )
        assert all(500 <= s < 600 for s in statuses["poison"]), statuses["poison"]
        assert statuses["good"] == [201] * WRITES
        assert (poison_items, orphan_logs, poison_outbox, poison_events) == (0, 0, 0, 0)
        assert good_items == WRITES
        assert good_events == WRITES
        assert quiet_after is not None, "a service connection stays busy"
        assert after.status_code == 201


REFUSED = 100


async def _refused_commits(
    service_env: dict[str, str], fault_db: TempPostgres, tmp_path: Path
) -> tuple[list[int], list[str], str]:
    """Send REFUSED poisoned writes; their statuses, problem details and the service log."""
    async with running_service(service_env, tmp_path) as svc:
        conn = await probe(fault_db.dsn)
        try:
            for statement in POISON:
                await conn.execute(statement)
        finally:
            await conn.close()
        statuses: list[int] = []
        details: list[str] = []
        limiter = anyio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(base_url=svc.url, timeout=30) as client:

            async def write(i: int) -> None:
                async with limiter:
                    response = await client.post("/items", json={"name": f"poison-{i}"})
                    statuses.append(response.status_code)
                    details.append(str(response.json().get("detail", "")))

            async with anyio.create_task_group() as tg:
                for i in range(REFUSED):
                    tg.start_soon(write, i)
        log = svc.log_text()
    return statuses, details, log


class TestCommitRefusedLogs:
    """A refused COMMIT is one log record, not a chained traceback per request."""

    @pytest.mark.timeout(90)
    async def test_a_hundred_refused_commits_are_a_hundred_records_and_one_traceback(
        self, service_env: dict[str, str], fault_db: TempPostgres, tmp_path: Path
    ) -> None:
        """100 refused commits: 100 WARNING lines naming resource, route and cause; 1 traceback."""
        statuses, details, log = await _refused_commits(service_env, fault_db, tmp_path)
        lines = log.splitlines()
        at = [i for i, line in enumerate(lines) if "releasing resource 'tx' failed" in line]
        records = [lines[i] for i in at]
        with_traceback = [i for i in at if i + 1 < len(lines) and lines[i + 1].startswith("Trace")]
        report(
            "commit_refused_logs",
            writes=REFUSED,
            statuses=sorted(set(statuses)),
            records=len(records),
            records_with_traceback=len(with_traceback),
            traceback_parts=log.count("Traceback"),
            log_lines=len(log.splitlines()),
        )
        assert statuses == [500] * REFUSED
        assert all("commit refused by the fault suite" in d for d in details), details[0]
        assert len(records) == REFUSED
        assert all(line.startswith("WARNING scoped_resources:") for line in records), records[0]
        assert all("on POST /items" in line and "RaiseError (P0001)" in line for line in records)
        assert len(with_traceback) == 1
        assert log.count("Traceback") == 3  # the one traceback: driver, adapter, SQLAlchemy
        assert "Exception in ASGI application" not in log

    @pytest.mark.timeout(90)
    async def test_json_logs_carry_resource_route_and_cause(
        self, service_env: dict[str, str], fault_db: TempPostgres, tmp_path: Path
    ) -> None:
        """With LOG_FORMAT=json every log line is one JSON object; failures carry their fields."""
        service_env["LOG_FORMAT"] = "json"
        statuses, _, log = await _refused_commits(service_env, fault_db, tmp_path)
        docs = [json.loads(line) for line in log.splitlines()]
        failures = [d for d in docs if d.get("resource") == "tx"]
        assert statuses == [500] * REFUSED
        assert len(failures) == REFUSED
        first = failures[0]
        assert {"time", "level", "logger", "message", "route", "cause"} <= set(first)
        assert (first["level"], first["logger"], first["route"]) == (
            "WARNING",
            "scoped_resources",
            "POST /items",
        )
        assert first["cause"] == "RaiseError (P0001): commit refused by the fault suite"
        assert sum("traceback" in d for d in failures) == 1
