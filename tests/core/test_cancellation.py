"""Cancellation at every await point of acquire and release leaves nothing open."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import pytest

from scoped_resources import AppScope, Resource, Resources, Use
from scoped_resources.exceptions import ReleaseFailed

from .helpers import Checkpoints, Journal, generator_resource

pytestmark = pytest.mark.anyio

AWAITS = 3  # await points in each acquire and in each release
TOTAL = 4 * AWAITS + 1  # two resources acquired and released, plus the work


async def _run_cancelled_at(point: int) -> tuple[Journal, Checkpoints]:
    resources = Resources()
    journal = Journal()
    points = Checkpoints(cancel_at=point)
    first = generator_resource(resources, journal, "first", awaits=AWAITS, points=points)
    second = generator_resource(resources, journal, "second", awaits=AWAITS, points=points)
    async with resources.open() as app_scope:
        with anyio.CancelScope() as cancel:
            points.scope = cancel
            async with app_scope.child() as scope:
                await scope.get(first)
                await scope.get(second)
                await points.point()
        assert app_scope.inflight == 0
    return journal, points


#: Await points in opening three app resources (two independent, one using the first).
START_UP = 3 * AWAITS


async def _start_up_cancelled_at(point: int) -> tuple[Journal, anyio.CancelScope]:
    """Open three app resources in a scope that is cancelled at await point *point*."""
    resources = Resources()
    journal = Journal()
    points = Checkpoints(cancel_at=point)
    pool = generator_resource(resources, journal, "pool", scope="app", awaits=AWAITS, points=points)
    generator_resource(resources, journal, "config", scope="app", awaits=AWAITS, points=points)

    @resources.app
    async def cache(p: Annotated[str, Use(pool)]) -> AsyncIterator[str]:
        for _ in range(AWAITS):
            await points.point()
        journal.add("acquire cache")
        journal.open.add("cache")
        try:
            yield p
        finally:
            journal.add("release cache")
            journal.open.discard("cache")

    with anyio.CancelScope() as outer:
        points.scope = outer
        async with resources.open():
            await points.point()
    return journal, outer


async def _release_fails(app_scope: AppScope, *wanted: Resource[Any]) -> ReleaseFailed:
    """Get *wanted* in a child scope in a task of its own; the ReleaseFailed its close raises."""

    async def request() -> None:
        async with app_scope.child() as scope:
            for resource in wanted:
                await scope.get(resource)

    with pytest.raises(ReleaseFailed) as caught:
        await asyncio.ensure_future(request())
    return caught.value


def _pending_cancels() -> int:
    """How many cancellation requests the current task has pending."""
    task = asyncio.current_task()
    assert task is not None
    return task.cancelling()


class TestCancelEverywhere:
    """A cancel at any await point: every instance that was opened is released."""

    @pytest.mark.parametrize("point", range(1, TOTAL + 1))
    async def test_nothing_is_left_open(self, point: int) -> None:
        """Cancelling at await point N leaves no instance open."""
        journal, points = await _run_cancelled_at(point)
        assert journal.open == set()
        assert points.seen >= point

    @pytest.mark.parametrize("point", range(2 * AWAITS + 2, TOTAL + 1))
    async def test_a_release_in_progress_runs_to_its_end(self, point: int) -> None:
        """A cancel during release is held off: every release point still runs."""
        journal, points = await _run_cancelled_at(point)
        assert points.seen == TOTAL
        assert journal.events[-2:] == ["release second", "release first"]

    @pytest.mark.parametrize("point", range(AWAITS + 1, 2 * AWAITS + 1))
    async def test_a_cancelled_acquire_releases_what_came_before(self, point: int) -> None:
        """A cancel while acquiring the second resource releases the first with the outcome."""
        journal, _ = await _run_cancelled_at(point)
        assert "acquire second" not in journal.events
        assert journal.events[-1].startswith("release first after ")


class TestStartUpCancelledFromOutside:
    """A start-up cancelled from outside (its deadline, a signal) at any await point ends,
    and releases every app resource it had opened: each of those holds its resource in a
    shielded wait until it is told to release it."""

    @pytest.mark.parametrize("point", range(1, START_UP + 1))
    async def test_it_ends_and_leaves_nothing_open(self, point: int) -> None:
        with anyio.fail_after(10):
            journal, outer = await _start_up_cancelled_at(point)
        assert outer.cancelled_caught
        assert journal.open == set()

    @pytest.mark.parametrize("point", range(1, START_UP + 1))
    async def test_a_dependent_is_released_before_what_it_uses(self, point: int) -> None:
        journal, _ = await _start_up_cancelled_at(point)
        if "acquire cache" in journal.events:
            assert journal.events.index("release cache") < journal.events.index("release pool")

    async def test_begun_in_a_cancelled_scope_it_ends_at_once(self) -> None:
        """A resource that opens without an await point still opens, and is released."""
        resources = Resources()
        journal = Journal()
        generator_resource(resources, journal, "config", scope="app")
        with anyio.CancelScope() as outer:
            outer.cancel()
            async with resources.open():
                pytest.fail("the app must not start")
        assert outer.cancelled_caught
        assert journal.open == set()


class TestCancelDuringCleanup:
    """Cleanup itself is shielded and never abandoned half-way."""

    async def test_an_outer_cancel_waits_for_a_slow_release(self) -> None:
        """A release waiting on I/O finishes even though its caller was cancelled."""
        resources = Resources()
        journal = Journal()
        flushing = anyio.Event()
        may_finish = anyio.Event()

        @resources.request
        async def conn() -> AsyncIterator[str]:
            yield "conn"
            flushing.set()
            await may_finish.wait()
            journal.add("flushed")

        async with resources.open() as app_scope, anyio.create_task_group() as tg:

            async def request() -> None:
                async with app_scope.child() as scope:
                    await scope.get(conn)

            tg.start_soon(request)
            await flushing.wait()
            tg.cancel_scope.cancel()
            may_finish.set()
        assert journal.events == ["flushed"]

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_a_native_cancel_mid_release_terminates_and_goes_on(self) -> None:
        """A bare task.cancel() interrupts one release: it is terminated, the rest still run."""
        resources = Resources()
        journal = Journal()
        terminated: list[str] = []
        in_release = anyio.Event()
        first = generator_resource(resources, journal, "first")

        @resources.request(terminate=terminated.append)
        async def second() -> AsyncIterator[str]:
            yield "second"
            in_release.set()
            await anyio.sleep_forever()

        async with resources.open() as app_scope:

            async def request() -> None:
                async with app_scope.child() as scope:
                    await scope.get(first)
                    await scope.get(second)

            task = asyncio.ensure_future(request())
            await in_release.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert terminated == ["second"]
        assert journal.events == ["acquire first", "release first"]


class TestNativeTimerPath:
    """On asyncio outside anyio cancel scopes, deadlines run on native timers."""

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_the_native_path_is_taken_outside_anyio_scopes(self) -> None:
        """A bare asyncio task qualifies; one inside an anyio cancel scope does not."""
        from scoped_resources._guard import native_task

        async def probe() -> bool:
            return native_task() is not None

        assert await asyncio.ensure_future(probe()) is True
        with anyio.CancelScope():  # noqa: ASYNC100 - only its presence matters
            assert native_task() is None

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_a_hanging_release_is_terminated_on_the_native_timer(self) -> None:
        """Past release_timeout the release is cancelled, terminated, and the rest go on."""
        from scoped_resources.exceptions import ReleaseTimeout

        resources = Resources()
        journal = Journal()
        terminated: list[str] = []
        first = generator_resource(resources, journal, "first")

        @resources.request(release_timeout=0.02, terminate=terminated.append)
        async def stuck() -> AsyncIterator[str]:
            yield "stuck"
            await anyio.sleep_forever()

        async with resources.open() as app_scope:
            failed = await _release_fails(app_scope, first, stuck)
        assert isinstance(failed.exceptions[0], ReleaseTimeout)
        assert terminated == ["stuck"]
        assert journal.events == ["acquire first", "release first"]

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_an_acquire_past_its_deadline_is_busy_on_the_native_timer(self) -> None:
        """acquire_timeout raises ResourceBusy, and the task is not left cancelled."""
        from scoped_resources.exceptions import ResourceBusy

        resources = Resources()

        @resources.request(acquire_timeout=0.02)
        async def exhausted() -> str:
            await anyio.sleep_forever()
            return "never"

        async with resources.open() as app_scope:

            async def request() -> int:
                async with app_scope.child() as scope:
                    with pytest.raises(ResourceBusy):
                        await scope.get(exhausted)
                await asyncio.sleep(0)  # the task is not cancelled any more
                return _pending_cancels()

            assert await asyncio.ensure_future(request()) == 0

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_a_cancel_from_outside_is_not_taken_for_the_deadline(self) -> None:
        """A task.cancel() during a timed acquire stays a cancellation."""
        resources = Resources()
        waiting = anyio.Event()

        @resources.request(acquire_timeout=10)
        async def slow() -> str:
            waiting.set()
            await anyio.sleep_forever()
            return "never"

        async with resources.open() as app_scope:

            async def request() -> None:
                async with app_scope.child() as scope:
                    await scope.get(slow)

            task = asyncio.ensure_future(request())
            await waiting.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


class TestScopeHold:
    """A scope keeps the task and wheel its first step found, and checks them per step."""

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_a_later_step_inside_an_anyio_cancel_scope_is_not_on_the_wheel(self) -> None:
        """Entering an anyio cancel scope between two gets moves the second off the wheel."""
        from scoped_resources._guard import wheel_of

        resources = Resources()
        on_wheel: dict[str, int] = {}

        def count(name: str) -> None:
            task = asyncio.current_task()
            assert task is not None
            on_wheel[name] = len(wheel_of(task).entries)

        @resources.request
        async def first() -> AsyncIterator[str]:
            count("first")
            yield "first"

        @resources.request
        async def second() -> AsyncIterator[str]:
            count("second")
            yield "second"

        async with resources.open() as app_scope:

            async def request() -> None:
                async with app_scope.child() as scope:
                    await scope.get(first)
                    with anyio.CancelScope():
                        await scope.get(second)

            await asyncio.ensure_future(request())
        assert on_wheel == {"first": 1, "second": 0}

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_a_closed_scope_keeps_no_reference_to_its_task(self) -> None:
        """A closed scope a caller keeps lets the task that ran its steps go."""
        import gc
        import weakref

        resources = Resources()

        @resources.request
        async def first() -> AsyncIterator[str]:
            yield "first"

        @resources.request
        async def second() -> AsyncIterator[str]:
            yield "second"

        async with resources.open() as app_scope:

            async def request() -> Any:
                async with app_scope.child() as scope:
                    await scope.get(first)
                    await scope.get(second)
                return scope

            task = asyncio.ensure_future(request())
            kept = await task
            gone = weakref.ref(task)
            del task
            await asyncio.sleep(0)  # asyncio's wake-up of this task holds it one turn
            gc.collect()
            assert gone() is None
            assert kept.state == "closed"

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_a_step_from_another_task_is_timed_for_that_task(self) -> None:
        """A get from a second task is cancelled at its deadline; the scope's task is not."""
        from scoped_resources.exceptions import ResourceBusy

        resources = Resources()
        first = generator_resource(resources, Journal(), "first")

        @resources.request(acquire_timeout=0.02)
        async def exhausted() -> AsyncIterator[str]:
            await anyio.sleep_forever()
            yield "never"

        async with resources.open() as app_scope:

            async def request() -> int:
                async with app_scope.child() as scope:
                    await scope.get(first)

                    async def other() -> None:
                        await scope.get(exhausted)

                    with pytest.raises(ResourceBusy):
                        await asyncio.ensure_future(other())
                    await asyncio.sleep(0)
                return _pending_cancels()

            assert await asyncio.ensure_future(request()) == 0

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_each_hanging_release_of_a_run_is_terminated_at_its_deadline(self) -> None:
        """After one release timed out, the next one is still bounded by its own deadline."""
        from scoped_resources.exceptions import ReleaseTimeout

        resources = Resources()
        terminated: list[str] = []

        def stuck_resource(name: str) -> Resource[str]:
            @resources.request(name=name, release_timeout=0.02, terminate=terminated.append)
            async def stuck() -> AsyncIterator[str]:
                yield name
                await anyio.sleep_forever()

            return stuck

        one, two = stuck_resource("one"), stuck_resource("two")

        async with resources.open() as app_scope:
            failed = await _release_fails(app_scope, one, two)
        assert [type(e) for e in failed.exceptions] == [ReleaseTimeout, ReleaseTimeout]
        assert terminated == ["two", "one"]

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_a_release_with_no_deadline_outlives_the_previous_ones(self) -> None:
        """A release with release_timeout=None is not cut at the deadline of the one before."""
        resources = Resources()
        journal = Journal()

        @resources.request(release_timeout=None)
        async def slow() -> AsyncIterator[str]:
            yield "slow"
            await asyncio.sleep(0.1)
            journal.events.append("released slow")

        @resources.request(release_timeout=0.03)
        async def quick() -> AsyncIterator[str]:
            yield "quick"
            journal.events.append("released quick")

        async with resources.open() as app_scope:

            async def request() -> None:
                async with app_scope.child() as scope:
                    await scope.get(slow)
                    await scope.get(quick)

            await asyncio.ensure_future(request())
        assert journal.events == ["released quick", "released slow"]

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    @pytest.mark.parametrize("hang", [False, True])
    async def test_the_wheel_keeps_no_record_once_a_scope_closed(self, hang: bool) -> None:
        """Closing a scope, cleanly or past a release deadline, leaves the wheel empty."""
        from scoped_resources._guard import wheel_of
        from scoped_resources.exceptions import ReleaseFailed

        resources = Resources()
        first = generator_resource(resources, Journal(), "first")

        @resources.request(release_timeout=0.02)
        async def second() -> AsyncIterator[str]:
            yield "second"
            if hang:
                await anyio.sleep_forever()

        async with resources.open() as app_scope:

            async def request() -> int:
                task = asyncio.current_task()
                assert task is not None
                try:
                    async with app_scope.child() as scope:
                        await scope.get(first)
                        await scope.get(second)
                except ReleaseFailed:
                    assert hang
                return len(wheel_of(task).entries)

            assert await asyncio.ensure_future(request()) == 0

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_concurrent_gets_on_the_wheel_share_one_acquisition(self) -> None:
        """Two asyncio tasks asking at once for a timed resource wait for one acquire."""
        resources = Resources()
        gate = asyncio.Event()
        made: list[object] = []

        @resources.request(acquire_timeout=5)
        async def slow() -> AsyncIterator[object]:
            await gate.wait()
            made.append(object())
            yield made[-1]

        async with resources.open() as app_scope:

            async def request() -> list[object]:
                async with app_scope.child() as scope:
                    first = asyncio.ensure_future(scope.get(slow))
                    second = asyncio.ensure_future(scope.get(slow))
                    await asyncio.sleep(0)
                    gate.set()
                    got = [await first, await second]
                return got  # noqa: RET504 - after the block: its exit may suppress (mypy)

            got = await asyncio.ensure_future(request())
        assert len(made) == 1
        assert got[0] is got[1] is made[0]
