"""Outbox under crashes: two replicas create items while one is killed (SIGKILL) again and again.

Both replicas run a relay on the same outbox. ``OUTBOX_LINGER_SECONDS`` makes
each relay wait a little after a wake-up before it publishes, so at any moment
there are committed events not yet published: a kill lands between COMMIT and
publish (the test counts those rows just before each kill). At the end both
replicas are killed at once and only one restarts: its relay must publish what
the dead ones left. One write in ten names a "poison" item whose COMMIT the
database refuses (a deferred trigger): a rolled-back item that must have no event.

Afterwards, read behind the service: every committed item has exactly one outbox
row, and the consumer queue received exactly one distinct event id per committed
item (copies of one id, from a crash between publish and "sent", are counted and
reported), and none for a rolled-back item.
"""

from __future__ import annotations

import random
import subprocess
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

from scoped_resources.testing import TempPostgres
from tests.service.processes import started_service

from ._events import EventQueue, event_queue, outbox_items, unsent
from ._harness import probe, report, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.anyio]

KILLS = 4  # kill -9 of one replica, each followed by a restart
WORKERS = 4
LINGER = 0.4  # OUTBOX_LINGER_SECONDS: the window between COMMIT and publish the kills hit
POISON_EVERY = 10
MAX_WRITES = 5_000
DRAIN_BUDGET = 30.0  # seconds for the last relay to publish what is left

_POISON = [
    "CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'commit refused by the test'; END $$",
    "CREATE CONSTRAINT TRIGGER poison AFTER INSERT ON items DEFERRABLE INITIALLY DEFERRED "
    "FOR EACH ROW WHEN (NEW.name LIKE 'poison-%') EXECUTE FUNCTION refuse_commit()",
]


class Replica:
    """One service process that the test kills with SIGKILL and starts again."""

    def __init__(self, name: str, env: dict[str, str], folder: Path) -> None:
        self.name = name
        self.env = env
        self.folder = folder
        self.starts = 0
        self.url: str | None = None
        self._cm: AbstractContextManager[tuple[subprocess.Popen[str], str]] | None = None
        self._proc: subprocess.Popen[str] | None = None

    async def start(self) -> None:
        """Start the process (a new log file each time) and wait until it listens."""
        self.starts += 1
        log = self.folder / f"{self.name}-{self.starts}.log"
        cm = started_service(self.env, log)
        self._proc, url = await anyio.to_thread.run_sync(cm.__enter__)
        self._cm = cm
        self.url = url

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no cleanup, transactions cut where they are."""
        self.url = None
        if self._proc is not None:
            self._proc.kill()
        if self._cm is not None:
            await anyio.to_thread.run_sync(self._cm.__exit__, None, None, None)
        self._cm = self._proc = None

    async def stop(self) -> None:
        """Stop the process at the end of the test, if it still runs."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            await anyio.to_thread.run_sync(self._wait)
        await self.kill()

    def _wait(self) -> None:
        assert self._proc is not None
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._proc.kill()


@dataclass
class Write:
    """One POST /items: the name sent, and the status or the transport error's name."""

    name: str
    status: int | str
    item_id: int | None

    @property
    def poison(self) -> bool:
        """True for an item whose COMMIT the database refuses."""
        return self.name.startswith("poison-")


async def _writer(
    worker: int, replicas: list[Replica], client: httpx.AsyncClient, writes: list[Write]
) -> None:
    """POST items to the replicas in turn (to the other while one is down), until cancelled."""
    for n in range(1, MAX_WRITES):
        kind = "poison" if n % POISON_EVERY == 0 else "item"
        name = f"{kind}-{worker}-{n}"
        up = [r.url for r in replicas if r.url is not None]
        if not up:
            await anyio.sleep(0.05)  # both are down: wait for a restart
            continue
        url = up[(worker + n) % len(up)]
        try:
            response = await client.post(f"{url}/items", json={"name": name})
        except httpx.TransportError as exc:  # the replica was killed under this request
            writes.append(Write(name, type(exc).__name__, None))
            continue
        item_id = response.json()["id"] if response.status_code == 201 else None
        writes.append(Write(name, response.status_code, item_id))


async def _committed(dsn: str) -> dict[int, str]:
    conn = await probe(dsn)
    try:
        return {
            int(r["id"]): str(r["name"]) for r in await conn.fetch("SELECT id, name FROM items")
        }
    finally:
        await conn.close()


@pytest.mark.timeout(150)
async def test_every_committed_item_has_exactly_one_event_despite_kills(
    fault_db: TempPostgres, amqp_url: str, service_env: dict[str, str], tmp_path: Path
) -> None:
    """Killing replicas (also between COMMIT and publish) loses no event and invents none."""
    rng = random.Random(13)
    async with event_queue(amqp_url) as queue:
        env = {
            **service_env,
            "AMQP_URL": amqp_url,
            "EVENTS_EXCHANGE": queue.exchange,
            "OUTBOX_LINGER_SECONDS": str(LINGER),
            "OUTBOX_POLL_SECONDS": "1",
            "DB_POOL_SIZE": "5",
        }
        a, b = Replica("a", env, tmp_path), Replica("b", env, tmp_path)
        try:
            await a.start()  # migrates the database
            conn = await probe(fault_db.dsn)
            try:
                for statement in _POISON:
                    await conn.execute(statement)
            finally:
                await conn.close()
            await b.start()
            figures = await _crash_run(rng, a, b, fault_db.dsn, queue)
        finally:
            await a.stop()
            await b.stop()
        report("outbox_crash", **figures)


async def _crash_run(
    rng: random.Random, a: Replica, b: Replica, dsn: str, queue: EventQueue
) -> dict[str, object]:
    writes: list[Write] = []
    unsent_at_kill: list[int] = []
    limits = httpx.Limits(max_connections=WORKERS, max_keepalive_connections=0)
    async with (
        httpx.AsyncClient(timeout=15, limits=limits) as client,
        anyio.create_task_group() as load,
    ):
        for worker in range(WORKERS):
            load.start_soon(_writer, worker, [a, b], client, writes)
        for _ in range(KILLS):
            await anyio.sleep(rng.uniform(0.5, 1.2))  # load runs meanwhile
            unsent_at_kill.append(await unsent(dsn))
            await a.kill()
            await a.start()
        await anyio.sleep(rng.uniform(0.5, 1.0))
        # Both at once: nobody is left to publish what they committed.
        unsent_at_kill.append(await unsent(dsn))
        await a.kill()
        await b.kill()
        load.cancel_scope.cancel()
    left_by_the_dead = await unsent(dsn)
    await a.start()  # only one comes back: its relay must publish the rest
    drained = await wait_until(lambda: _no_unsent(dsn), DRAIN_BUDGET, interval=0.1)
    assert drained is not None, f"{await unsent(dsn)} events still unsent {DRAIN_BUDGET} s after"

    committed = await _committed(dsn)
    rows = await outbox_items(dsn)
    delivered = await queue.drain()

    answers = Counter(str(w.status) for w in writes)
    created = [w for w in writes if w.status == 201]
    assert created, f"no item was created: {answers}"
    assert all(w.status != 201 for w in writes if w.poison)
    assert any(w.poison and w.status == 500 for w in writes), "no COMMIT was refused"
    # What the service confirmed is stored; what it refused is not.
    assert {w.item_id for w in created} <= committed.keys()
    assert not [name for name in committed.values() if name.startswith("poison-")]
    # One outbox row per committed item, none for anything else.
    assert sorted(rows.values()) == sorted(committed), "outbox rows do not match the items"
    # Delivered: exactly the outbox's event ids, one distinct id per committed item.
    assert delivered.ids == rows.keys()
    per_item = delivered.ids_per_item()
    assert per_item.keys() == committed.keys()
    assert all(len(ids) == 1 for ids in per_item.values())
    assert all(rows[e.message_id] == e.item_id for e in delivered.events)
    assert not [e for e in delivered.events if e.name.startswith("poison-")]
    # The kills did land between COMMIT and publish.
    assert sum(unsent_at_kill) > 0, f"no kill found committed, unpublished events: {unsent_at_kill}"
    assert left_by_the_dead > 0, "the double kill left nothing for the restarted relay"
    return {
        "writes": len(writes),
        "answers": dict(answers),
        "committed_items": len(committed),
        "rolled_back_poison": sum(1 for w in writes if w.poison and w.status == 500),
        "kills": KILLS + 2,
        "unsent_just_before_each_kill": unsent_at_kill,
        "unsent_left_by_the_double_kill": left_by_the_dead,
        "drain_after_last_restart_s": round(drained, 2),
        "events_delivered": len(delivered.events),
        "distinct_event_ids": len(delivered.ids),
        "duplicates": delivered.duplicates,
        "publishers": len(delivered.publishers()),
    }


async def _no_unsent(dsn: str) -> bool:
    return await unsent(dsn) == 0
