"""Deadlines on the loop's wheel: each fires at its own time and only for its own task."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest

from scoped_resources._guard import DeadlineExpired, bounded, wheel_of


async def _sleep_then(seconds: float, value: str) -> str:
    await asyncio.sleep(seconds)
    return value


def _run(coro_factory: object) -> object:
    """Run a coroutine on a fresh asyncio loop, outside any anyio cancel scope."""
    return asyncio.run(coro_factory())  # type: ignore[operator]


def test_an_awaitable_past_its_deadline_raises_deadline_expired() -> None:
    """The wheel cancels the task at the deadline; the task is left with no pending cancel."""

    async def main() -> tuple[float, int]:
        task = asyncio.current_task()
        assert task is not None
        started = time.monotonic()
        with pytest.raises(DeadlineExpired):
            await bounded(_sleep_then(5.0, "late"), 0.05)
        return time.monotonic() - started, task.cancelling()

    took, cancelling = asyncio.run(main())
    assert took < 2.0
    assert cancelling == 0


def test_an_awaitable_within_its_deadline_returns_its_value() -> None:
    async def main() -> str:
        return await bounded(_sleep_then(0.01, "ok"), 5.0)

    assert _run(main) == "ok"


def test_a_shorter_deadline_recorded_after_a_longer_one_fires_first() -> None:
    """The one timer is re-armed for an earlier deadline, and the later one still fires."""

    async def main() -> list[str]:
        ended: list[str] = []

        async def wait(label: str, timeout: float) -> None:
            try:
                await bounded(_sleep_then(5.0, label), timeout)
            except DeadlineExpired:
                ended.append(label)

        patient = asyncio.ensure_future(wait("patient", 0.3))
        await asyncio.sleep(0)
        hurried = asyncio.ensure_future(wait("hurried", 0.05))
        await asyncio.wait_for(asyncio.gather(patient, hurried), 4.0)
        return ended

    assert _run(main) == ["hurried", "patient"]


def test_a_cancel_from_outside_is_not_taken_for_the_deadline() -> None:
    """A task cancelled by someone else gets its CancelledError, not DeadlineExpired."""

    async def main() -> str:
        async def guarded() -> None:
            await bounded(_sleep_then(5.0, "x"), 3.0)

        task = asyncio.ensure_future(guarded())
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        except DeadlineExpired:
            return "deadline"
        return "finished"

    assert _run(main) == "cancelled"


def test_a_loop_keeps_one_wheel_and_a_closed_loop_is_freed() -> None:
    """Every task of a loop gets the same wheel; once the loop is gone, nothing keeps it."""

    async def wheels() -> tuple[bool, weakref.ref[asyncio.AbstractEventLoop]]:
        task = asyncio.current_task()
        assert task is not None
        other = asyncio.ensure_future(asyncio.sleep(0))
        same = wheel_of(task) is wheel_of(other)
        await other
        return same, weakref.ref(asyncio.get_running_loop())

    same, first_loop = asyncio.run(wheels())
    asyncio.run(wheels())  # a second loop takes the cache's place
    gc.collect()
    assert same
    assert first_loop() is None, "a wheel kept its closed loop alive"
