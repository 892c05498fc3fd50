"""Cancel a coroutine at each of its await points in turn, to test cancellation everywhere.

An *await point* is a place where the coroutine suspends (hands control to the
event loop): that is where a cancellation can arrive. Awaits that complete
without suspending are not points; nor are the suspensions of tasks the
coroutine starts (only the calling task is counted).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import anyio

__all__ = ["CancelledAtError", "cancel_at_each_await", "count_await_points"]


class CancelledAtError(Exception):
    """Raised when a run cancelled at an await point failed with another error.

    ``point`` is the 1-based await point the cancellation was requested at;
    ``__cause__`` is the error the coroutine raised.
    """

    def __init__(self, point: int, error: BaseException) -> None:
        self.point = point
        super().__init__(
            f"cancelled at await point {point}, the coroutine raised "
            f"{type(error).__name__}: {error} instead of stopping cleanly"
        )


class _Counted:
    """Drive a coroutine, counting its suspensions; cancel *scope* at the N-th."""

    __slots__ = ("_awaitable", "cancel_at", "points", "scope")

    def __init__(
        self, awaitable: Awaitable[Any], scope: anyio.CancelScope | None, cancel_at: int
    ) -> None:
        self._awaitable = awaitable
        self.scope = scope
        self.cancel_at = cancel_at
        self.points = 0

    def __await__(self) -> Generator[Any, Any, Any]:
        it = self._awaitable.__await__()
        send: Any = None
        error: BaseException | None = None
        while True:
            try:
                signal = it.send(send) if error is None else it.throw(error)
            except StopIteration as stop:
                return stop.value
            self.points += 1
            if self.points == self.cancel_at and self.scope is not None:
                # Delivered while the coroutine is suspended right here.
                self.scope.cancel()
            try:
                send = yield signal
                error = None
            except GeneratorExit:
                it.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - forwarded into the coroutine
                send, error = None, exc


async def count_await_points(func: Callable[[], Awaitable[Any]]) -> int:
    """Run ``func()`` once, uncancelled, and return how many times it suspended."""
    counted = _Counted(func(), None, 0)
    await counted
    return counted.points


async def cancel_at_each_await(
    func: Callable[[], Awaitable[Any]],
    *,
    after_each: Callable[[int], Awaitable[object] | object] | None = None,
    limit: int = 1000,
) -> int:
    """Run ``func()`` again and again, cancelling run N at its N-th await point.

    Stops when a run completes before reaching its cancellation point, and
    returns how many await points that full run passed. After each cancelled run
    ``after_each(n)`` is called (sync or async): check your invariants there (no
    lease left, no row half-written). A run that raises anything but the
    cancellation is reported as :class:`CancelledAtError` naming the point. A run that
    swallows the cancellation and returns is accepted: the cancel scope records it.
    Raises ``RuntimeError`` past *limit* points (a coroutine that never ends).
    """
    for point in range(1, limit + 1):
        with anyio.CancelScope() as scope:
            counted = _Counted(func(), scope, point)
            try:
                await counted
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:
                raise CancelledAtError(point, exc) from exc
        if counted.points < point:
            # It finished before reaching the point: every point was tried.
            return counted.points
        if after_each is not None:
            result = after_each(point)
            if inspect.isawaitable(result):
                await result
    raise RuntimeError(
        f"the coroutine still suspended after {limit} await points; raise limit= "
        "or check that it ends"
    )
