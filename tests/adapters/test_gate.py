"""The pool admission gate: arrival order, predictive refusal, Retry-After, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.lowlevel import checkpoint
from hypothesis import given
from hypothesis import strategies as st

from scoped_resources import Resources
from scoped_resources._resource import Resource
from scoped_resources.adapters._gate import MAX_RETRY_AFTER, Gate, GateStats
from scoped_resources.adapters.http import HTTP, SlotTransport
from scoped_resources.adapters.postgres import Postgres
from scoped_resources.adapters.rabbitmq import RabbitMQ
from scoped_resources.adapters.redis import Redis
from scoped_resources.adapters.sqlalchemy import SQLAlchemy
from scoped_resources.adapters.sqlite import SQLite
from scoped_resources.exceptions import ResourceBusy
from scoped_resources.testing import cancel_at_each_await

pytestmark = pytest.mark.anyio


class Clock:
    """The monotonic clock, plus jumps the test makes by hand (``clock.now += s``)."""

    def __init__(self) -> None:
        self.offset = 0.0

    @property
    def now(self) -> float:
        return time.monotonic() + self.offset

    @now.setter
    def now(self, value: float) -> None:
        self.offset += value - self.now

    def __call__(self) -> float:
        return self.now


def warmed(clock: Clock, capacity: int, hold: float, **options: object) -> Gate:
    """A gate whose estimate has five samples of *hold* seconds."""
    gate = Gate("db.connection", capacity, clock=clock, **options)  # type: ignore[arg-type]
    for _ in range(5):
        ticket = gate._take(clock.now)
        gate._in_use += 1
        clock.now += hold
        gate.release(ticket)
    return gate


async def fill(gate: Gate) -> list[int]:
    """Take every slot of *gate* (none waits)."""
    return [await gate.acquire() for _ in range(gate.capacity)]


class TestOrder:
    """Admitted waiters are served first come, first served (on asyncio and on trio)."""

    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    async def test_waiters_are_served_in_arrival_order(self) -> None:
        """Five waiters queued behind one holder get the slot in the order they arrived."""
        gate = Gate("db.connection", 1, timeout=5.0)
        holder = await gate.acquire()
        served: list[int] = []

        async def wait(i: int) -> None:
            ticket = await gate.acquire()
            served.append(i)
            gate.release(ticket)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(wait, i)
                await anyio.wait_all_tasks_blocked()
            assert gate.stats().waiting == 5
            gate.release(holder)
        assert served == [0, 1, 2, 3, 4]
        assert dataclasses.replace(gate.stats(), hold_estimate=None) == GateStats(
            name="db.connection",
            capacity=1,
            in_use=0,
            waiting=0,
            hold_estimate=None,
            shed=0,
            timed_out=0,
            shedding=True,
        )

    async def test_a_newcomer_does_not_overtake_a_queued_waiter(self) -> None:
        """A slot freed while someone waits goes to the waiter, not to the next caller."""
        gate = Gate("db.connection", 1, timeout=5.0)
        holder = await gate.acquire()
        got: list[str] = []

        async def wait(who: str) -> None:
            gate.release(await gate.acquire())
            got.append(who)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, "queued")
            await anyio.wait_all_tasks_blocked()
            gate.release(holder)
            tg.start_soon(wait, "newcomer")
        assert got == ["queued", "newcomer"]


class TestPrediction:
    """A wait that cannot end within the deadline is refused at once."""

    async def test_a_waiter_whose_expected_wait_exceeds_its_deadline_is_refused_at_once(
        self,
    ) -> None:
        """With holds of 1 s on 2 slots and a 3.2 s deadline, the 7th waiter is refused."""
        clock = Clock()
        gate = warmed(clock, 2, 1.0, timeout=3.2)
        tickets = await fill(gate)
        async with anyio.create_task_group() as tg:
            for _ in range(6):  # expected waits 0.5, 1.0, ... 3.0 s: all admitted
                tg.start_soon(gate.acquire)
                await anyio.wait_all_tasks_blocked()
            with pytest.raises(ResourceBusy) as refused:
                await gate.acquire()
            tg.cancel_scope.cancel()
        assert refused.value.expected_wait == pytest.approx(3.5, abs=0.05)
        assert refused.value.resource == "db.connection"
        assert refused.value.retry_after == 4
        assert "expected wait" in str(refused.value)
        assert "db.connection" in str(refused.value)
        stats = gate.stats()
        assert (stats.shed, stats.waiting, stats.in_use) == (1, 0, 2)
        for ticket in tickets:
            gate.release(ticket)
        assert gate.stats().in_use == 0

    async def test_a_cold_gate_with_a_free_slot_has_no_estimate(self) -> None:
        """Before any lease ended, and with a slot free, nothing is predicted."""
        clock = Clock()
        gate = Gate("db.connection", 2, timeout=1.0, clock=clock)
        holder = await gate.acquire()
        clock.now += 30.0
        assert gate.hold_estimate() is None
        assert gate.expected_wait(5) is None
        gate.release(holder)

    async def test_a_cold_gate_predicts_from_the_age_of_its_stuck_holders(self) -> None:
        """No lease ended yet, both slots held for 3 s: one waiter ahead means 1/2 x 3 s."""
        clock = Clock()
        gate = Gate("db.connection", 2, timeout=1.0, clock=clock)
        tickets = await fill(gate)
        clock.now += 3.0
        assert gate.hold_estimate() == pytest.approx(3.0, abs=0.05)
        # The head of a cold queue is not predicted: the holders may end any moment.
        assert gate.expected_wait(0) is None
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(gate.acquire, 30.0)  # the head: waits
                await anyio.wait_all_tasks_blocked()
                with pytest.raises(ResourceBusy) as refused:
                    await gate.acquire()
                tg.cancel_scope.cancel()
        assert refused.value.expected_wait == pytest.approx(1.5, abs=0.05)
        assert refused.value.waited == 0.0
        assert refused.value.retry_after == 2
        assert (gate.stats().shed, gate.stats().timed_out, gate.stats().waiting) == (1, 0, 0)
        for ticket in tickets:
            gate.release(ticket)

    async def test_queued_waiters_are_refused_once_stuck_holders_outlive_the_estimate(
        self,
    ) -> None:
        """A holder stuck for 18 s (the estimate said 0.1 s) makes the queue's tail give up."""
        clock = Clock()
        gate = warmed(clock, 1, 0.1, timeout=100.0, recheck=0.001)
        holder = await gate.acquire()
        outcomes: dict[int, str] = {}
        expected: dict[int, float] = {}

        async def wait(i: int) -> None:
            try:
                ticket = await gate.acquire()
            except ResourceBusy as busy:
                outcomes[i] = "refused"
                expected[i] = busy.expected_wait or 0.0
            else:
                outcomes[i] = "served"
                gate.release(ticket)

        with anyio.fail_after(200):  # later than the gate's 100 s, so it does not shorten it
            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(wait, i)
                    await anyio.wait_all_tasks_blocked()
                assert gate.stats().waiting == 6
                clock.now += 18.0  # expected waits now 18, 36, ... 108 s; 82 s left
                while len(outcomes) < 2:
                    await anyio.sleep(0.001)
                assert gate.stats().waiting == 4, outcomes
                gate.release(holder)
        assert outcomes == {
            0: "served",
            1: "served",
            2: "served",
            3: "served",
            4: "refused",
            5: "refused",
        }
        # 5 and 6 leases of (18 s + the real time the test took) each.
        assert expected[4] == pytest.approx(90, abs=5)
        assert expected[5] == pytest.approx(108, abs=6)
        assert gate.stats().shed == 2

    async def test_an_earlier_cancel_scope_deadline_shortens_the_budget(self) -> None:
        """A request deadline closer than the acquire timeout is what the prediction must meet."""
        clock = Clock()
        gate = warmed(clock, 1, 1.0, timeout=100.0)
        holder = await gate.acquire()
        with anyio.move_on_after(0.5), pytest.raises(ResourceBusy) as refused:
            await gate.acquire()  # expects 1 s; the scope leaves 0.5 s
        assert refused.value.expected_wait == pytest.approx(1.0, abs=0.05)
        gate.release(holder)

    async def test_shed_false_waits_the_full_deadline(self) -> None:
        """With prediction off, a hopeless waiter is still refused only at its deadline."""
        clock = Clock()
        gate = warmed(clock, 1, 10.0, timeout=0.05, shed=False)
        holder = await gate.acquire()
        clock.now += 50.0
        with anyio.fail_after(5), pytest.raises(ResourceBusy) as late:
            await gate.acquire()
        assert late.value.expected_wait is None
        # The estimate (the holder's 50 s so far) still informs Retry-After.
        assert 50 <= late.value.retry_after <= 51
        assert gate.stats().shed == 0
        assert not gate.stats().shedding
        gate.release(holder)


class TestEstimate:
    """The hold estimate and the Retry-After built from it."""

    async def test_a_failed_pool_acquire_is_not_a_hold_sample(self) -> None:
        """release(record=False) frees the slot without teaching the estimate anything."""
        clock = Clock()
        gate = Gate("db.connection", 1, timeout=1.0, clock=clock, min_samples=1)
        ticket = await gate.acquire()
        clock.now += 3.0
        gate.release(ticket, record=False)
        gate.release(ticket)  # a second release is a no-op
        assert gate.stats().hold_estimate is None
        assert gate.stats().in_use == 0

    @given(st.lists(st.floats(min_value=0.0, max_value=1e4), min_size=5, max_size=50))
    def test_the_estimate_stays_within_the_samples(self, holds: list[float]) -> None:
        """An EWMA never leaves the range of the durations it averages."""
        clock = Clock()
        gate = Gate("db.connection", 3, timeout=1.0, clock=clock)
        for hold in holds:
            gate._in_use += 1
            ticket = gate._take(clock.now)
            clock.now += hold
            gate.release(ticket)
        estimate = gate.stats().hold_estimate
        assert estimate is not None
        assert min(holds) - 1e-6 <= estimate <= max(holds) + 0.01  # + the real time passed

    @given(
        st.floats(min_value=0.0, max_value=1e5),
        st.integers(min_value=1, max_value=64),
        st.integers(min_value=0, max_value=10_000),
    )
    def test_retry_after_is_between_one_second_and_a_minute(
        self, hold: float, capacity: int, ahead: int
    ) -> None:
        """Retry-After is whole seconds in [1, 60], and never shrinks as the queue grows."""
        clock = Clock()
        gate = warmed(clock, capacity, hold, timeout=1.0)
        retry = gate._retry_after(ahead)
        assert 1 <= retry <= MAX_RETRY_AFTER
        assert retry == math.floor(retry)
        assert gate._retry_after(ahead + capacity) >= retry

    def test_a_gate_without_capacity_is_refused(self) -> None:
        """Capacity 0 is a configuration error naming the resource."""
        with pytest.raises(ValueError, match="db.connection"):
            Gate("db.connection", 0, timeout=1.0)


class TestTimerLoop:
    """The gate's timer runs only while someone waits; a gate outlives its loops."""

    @staticmethod
    def _run_and_drop(
        scenario: Callable[[Gate], Awaitable[None]], gate: Gate
    ) -> weakref.ref[asyncio.AbstractEventLoop]:
        """Run *scenario* on a loop of its own, close the loop; a weak reference to it."""
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(scenario(gate))
        finally:
            loop.close()
        gone = weakref.ref(loop)
        del loop
        gc.collect()
        return gone

    def test_a_loop_whose_waiter_expired_is_not_kept_by_the_gate(self) -> None:
        """The timer fired and ended the wait: the gate keeps no reference to its loop."""

        async def expire(gate: Gate) -> None:
            held = await gate.acquire()
            with pytest.raises(ResourceBusy):
                await gate.acquire()  # queued; the gate's timer ends the wait
            gate.release(held)

        gate = Gate("db.connection", 1, timeout=0.05, shed=False)
        assert self._run_and_drop(expire, gate)() is None
        assert gate._timer is None

    def test_a_loop_whose_waiter_was_served_is_not_kept_by_the_gate(self) -> None:
        """Served before its deadline: the timer armed for it is stopped with the queue empty."""

        async def serve(gate: Gate) -> None:
            held = await gate.acquire()
            asyncio.get_running_loop().call_soon(gate.release, held)
            gate.release(await gate.acquire())

        gate = Gate("db.connection", 1, timeout=60.0, shed=False)
        assert self._run_and_drop(serve, gate)() is None
        assert gate._timer is None

    async def test_the_last_waiter_cancelled_stops_the_timer(self) -> None:
        """A waiter cancelled while it queues leaves no timer armed behind it."""
        gate = Gate("db.connection", 1, timeout=60.0, shed=False)
        held = await gate.acquire()
        with anyio.move_on_after(0.01):
            await gate.acquire()
        assert gate.stats().waiting == 0
        assert gate._timer is None
        assert gate._timer_loop is None
        gate.release(held)


class TestCancellation:
    """A cancelled waiter leaves the queue and never leaks a slot."""

    async def test_cancelled_at_each_await_point_no_slot_or_waiter_is_left(self) -> None:
        """Acquire-and-release behind a holder, cancelled at every point, leaves the gate clean."""
        gate = Gate("db.connection", 1, timeout=5.0)

        async def contended() -> None:
            holder = await gate.acquire()
            async with anyio.create_task_group() as tg:

                async def hand_back() -> None:
                    await checkpoint()
                    gate.release(holder)

                tg.start_soon(hand_back)
                ticket = await gate.acquire()
                await checkpoint()
                gate.release(ticket)

        def clean(point: int) -> None:
            stats = gate.stats()
            assert (stats.in_use, stats.waiting) in ((0, 0), (1, 0)), point
            for ticket in list(gate._held):  # the holder a cancelled run left behind
                gate.release(ticket)
            assert gate.stats().in_use == 0

        points = await cancel_at_each_await(contended, after_each=clean)
        assert points >= 2
        assert gate.stats().in_use == 0

    async def test_a_slot_handed_to_a_waiter_cancelled_meanwhile_goes_to_the_next(self) -> None:
        """A waiter cancelled in the same instant its slot arrives passes the slot on."""
        gate = Gate("db.connection", 1, timeout=5.0)
        holder = await gate.acquire()
        got: list[str] = []

        async def wait(who: str, scope: anyio.CancelScope) -> None:
            with scope:
                ticket = await gate.acquire()
                got.append(who)
                gate.release(ticket)

        first, second = anyio.CancelScope(), anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, "first", first)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(wait, "second", second)
            await anyio.wait_all_tasks_blocked()
            first.cancel()
            gate.release(holder)  # granted to "first", which is already cancelled
        assert got == ["second"]
        assert (gate.stats().in_use, gate.stats().waiting) == (0, 0)


# -- every pooled adapter, on its real server -----------------------------------------

#: Deadline of the leases below: long enough that a refusal at the deadline is obvious.
DEADLINE = 5.0
#: How long the holders stay stuck before the newcomers arrive.
STUCK = 0.3


async def sheds_when_stuck(
    gate: Gate,
    take: Callable[[AsyncExitStack], Awaitable[object]],
) -> None:
    """Warm *gate* with quick leases, hold every slot, queue waiters; the next is refused at once.

    *take* leases one slot and registers its release on the stack it is given.
    """
    for _ in range(5):  # quick leases: the estimate gets its samples
        async with AsyncExitStack() as stack:
            await take(stack)
    async with AsyncExitStack() as holders, anyio.create_task_group() as tg:
        for _ in range(gate.capacity):
            await take(holders)
        await anyio.sleep(STUCK)  # the holders outlive the estimate: it grows with them

        refusals: list[ResourceBusy] = []

        async def queued() -> None:
            try:
                async with AsyncExitStack() as stack:
                    await take(stack)
            except ResourceBusy as busy:
                refusals.append(busy)

        admitted = -1
        with anyio.fail_after(DEADLINE / 2):  # a refusal at the deadline would fail here
            while not refusals:
                tg.start_soon(queued)
                await anyio.wait_all_tasks_blocked()
                admitted += 1
        refused = refusals[0]
        assert refused.expected_wait is not None, "refused by the deadline, not predicted"
        assert refused.expected_wait > DEADLINE - STUCK - 1.0
        assert refused.retry_after >= 1
        assert admitted >= 1
        assert gate.stats().shed >= 1
        tg.cancel_scope.cancel()
    assert (gate.stats().in_use, gate.stats().waiting) == (0, 0)


def leasing(
    app_scope: Any, resource: Resource[Any]
) -> Callable[[AsyncExitStack], Awaitable[object]]:
    """*take* for :func:`sheds_when_stuck`: a request scope holding *resource*."""

    async def take(stack: AsyncExitStack) -> object:
        scope = await stack.enter_async_context(app_scope.child())
        return await scope.get(resource)

    return take


class TestAdaptersShedWhenStuck:
    """Every pooled adapter refuses at once when its holders are stuck and the queue is long."""

    async def test_postgres(self, pg_dsn: str) -> None:
        """asyncpg: ``pg.connection`` on a pool of 2."""
        resources = Resources("t")
        pg = Postgres(resources, pg_dsn, max_size=2, acquire_timeout=DEADLINE)
        async with resources.open() as app_scope:
            await sheds_when_stuck(pg.gate, leasing(app_scope, pg.connection))

    async def test_sqlalchemy(self, pg_dsn: str) -> None:
        """SQLAlchemy: ``db.connection`` on a pool of 2."""
        resources = Resources("t")
        url = pg_dsn.replace("postgresql://", "postgresql+asyncpg://")
        db = SQLAlchemy(resources, url, pool_size=2, acquire_timeout=DEADLINE)
        async with resources.open() as app_scope:
            await sheds_when_stuck(db.gate, leasing(app_scope, db.connection))

    async def test_sqlite_writer(self, tmp_path: Path) -> None:
        """SQLite: the single writer (``db.transaction``)."""
        resources = Resources("t")
        db = SQLite(resources, str(tmp_path / "gate.sqlite3"), acquire_timeout=DEADLINE)
        async with resources.open() as app_scope:
            await sheds_when_stuck(db.writer_gate, leasing(app_scope, db.transaction))

    async def test_redis(self, redis_url: str) -> None:
        """Redis: connections of a pool of 2."""
        resources = Resources("t")
        cache = Redis(resources, redis_url, max_connections=2, acquire_timeout=DEADLINE)
        async with resources.open() as app_scope:
            client = await app_scope.get(cache.client)
            pool = client.connection_pool

            async def take(stack: AsyncExitStack) -> object:
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
                stack.push_async_callback(pool.release, conn)
                return conn

            await sheds_when_stuck(cache.gate, take)

    async def test_rabbitmq_channels(self, amqp_url: str) -> None:
        """RabbitMQ: ``mq.channel`` from a pool of 2 channels."""
        resources = Resources("t")
        mq = RabbitMQ(resources, amqp_url, channels=2, acquire_timeout=DEADLINE)
        async with resources.open() as app_scope:
            pool = await app_scope.get(mq.channels)
            await sheds_when_stuck(pool.gate, leasing(app_scope, mq.channel))

    async def test_http_slots(self) -> None:
        """HTTP: slots held by open streamed responses from a real local server."""
        async with running_http_server() as url:
            resources = Resources("t")
            http = HTTP(resources, base_url=url, max_connections=2, acquire_timeout=DEADLINE)
            async with resources.open() as app_scope:
                client = await app_scope.get(http.client)
                transport = client._transport
                assert isinstance(transport, SlotTransport)

                async def take(stack: AsyncExitStack) -> object:
                    return await stack.enter_async_context(client.stream("GET", "/"))

                await sheds_when_stuck(transport.gate, take)


@contextlib.asynccontextmanager
async def running_http_server() -> AsyncIterator[str]:
    """A real HTTP/1.1 server on 127.0.0.1 answering every request with a short body."""

    async def answer(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += await stream.receive()
                    await stream.send(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    )

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, answer)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            tg.cancel_scope.cancel()


class TestOnTrio:
    """Off asyncio (trio) the gate waits under cancel scopes, with the same behaviour."""

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "trio"

    async def test_a_waiter_is_refused_at_its_deadline(self) -> None:
        """Without shedding, a waiter behind a stuck holder is refused when its time is up."""
        gate = Gate("db.connection", 1, timeout=0.05, shed=False)
        holder = await gate.acquire()
        with anyio.fail_after(5), pytest.raises(ResourceBusy):
            await gate.acquire()
        assert gate.stats().timed_out == 1
        assert gate.stats().waiting == 0
        gate.release(holder)

    async def test_a_queued_waiter_is_refused_once_the_holder_outlives_the_estimate(
        self,
    ) -> None:
        """The periodic re-check refuses a queued waiter whose wait became hopeless."""
        clock = Clock()
        gate = warmed(clock, 1, 0.1, timeout=100.0, recheck=0.001)
        holder = await gate.acquire()
        refused: list[ResourceBusy] = []

        async def wait() -> None:
            try:
                gate.release(await gate.acquire())
            except ResourceBusy as busy:
                refused.append(busy)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                clock.now += 3.0  # held 3 s: the wait expects 3 s more; fail_after leaves 2 s
        assert len(refused) == 1
        assert gate.stats().shed == 1
        gate.release(holder)

    async def test_a_cancelled_waiter_leaves_the_queue(self) -> None:
        """Cancelling a queued waiter removes it; the slot still goes to the next one."""
        gate = Gate("db.connection", 1, timeout=5.0)
        holder = await gate.acquire()
        with anyio.move_on_after(0.01):
            await gate.acquire()
        assert gate.stats().waiting == 0
        gate.release(holder)
        gate.release(await gate.acquire())
        assert gate.stats().in_use == 0


class TestEachWaitersDeadline:
    """Waiters with different deadlines each end at their own (on asyncio and on trio)."""

    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    async def test_a_shorter_deadline_queued_later_ends_first(self) -> None:
        """A waiter queued behind a patient one is refused at its own, earlier deadline."""
        gate = Gate("db.connection", 1, timeout=30.0, shed=False)
        holder = await gate.acquire()
        ended: list[str] = []

        async def wait(label: str, timeout: float) -> None:
            with pytest.raises(ResourceBusy):
                await gate.acquire(timeout)
            ended.append(label)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait, "patient", 5.0)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(wait, "hurried", 0.05)
                while not ended:
                    await anyio.sleep(0.01)
                assert ended == ["hurried"]
                assert gate.stats().waiting == 1
                tg.cancel_scope.cancel()
        assert gate.stats().timed_out == 1
        assert gate.stats().waiting == 0
        gate.release(holder)
