"""Bound an awaitable by a deadline, and tell when the deadline hit.

Two ways, chosen per call (releases use the same two, with a shield, in ``_scope``):

* **anyio cancel scope** (any backend): a ``CancelScope`` with the deadline,
  entered before the awaitable takes its first step, so that cancel scopes
  the awaitable opens nest inside it. About 8 us on asyncio.
* **native timer** (asyncio, when the task is inside no anyio cancel scope): a
  ``loop.call_at`` that cancels the task, like ``asyncio.timeout`` but lighter,
  armed only if the awaitable suspends at all. No shield is needed there: anyio
  delivers cancellation only to tasks inside one of its cancel scopes, and a
  native ``task.cancel()`` is not stopped by any shield. Whether the task is
  inside an anyio scope is read from anyio's task states; if that private table
  ever moves, the anyio path is used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Generator
from typing import Any, TypeVar

import anyio

_task_states: Any
try:  # anyio's record of which cancel scope each asyncio task is in
    from anyio._backends._asyncio import _task_states
except ImportError:  # pragma: no cover - a future anyio: always use cancel scopes
    _task_states = None

T = TypeVar("T")


class DeadlineExpired(Exception):
    """Raised when the guarded awaitable was cancelled by its own deadline."""


def native_task() -> asyncio.Task[Any] | None:
    """The current asyncio task when no anyio cancel scope can reach it, else None."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio loop: trio
        return None
    if task is None or _task_states is None:
        return None
    state = _task_states.get(task)
    if state is not None and getattr(state, "cancel_scope", True) is not None:
        return None
    return task


class _Expiry:
    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.fired = False

    def __call__(self) -> None:
        self.fired = True
        self.task.cancel()


class on_timer(Awaitable[T]):  # noqa: N801 - used like a function
    """Await *awaitable*; cancel *task* natively once *timeout* seconds have passed.

    The timer is armed only if the awaitable suspends: most acquires and
    releases without I/O finish on their first step and pay nothing. (This lazy
    start is safe with a native timer; it would not be with a cancel scope, which
    must be entered before the awaitable opens scopes of its own.)
    """

    __slots__ = ("_awaitable", "_task", "_timeout")

    def __init__(self, awaitable: Awaitable[T], timeout: float, task: asyncio.Task[Any]) -> None:
        self._awaitable = awaitable
        self._timeout = timeout
        self._task = task

    def __await__(self) -> Generator[Any, Any, T]:
        it = self._awaitable.__await__()
        try:
            signal = it.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        task = self._task
        loop = task.get_loop()
        expiry = _Expiry(task)
        handle = loop.call_at(loop.time() + self._timeout, expiry)
        try:
            while True:
                try:
                    sent = yield signal
                except GeneratorExit:
                    it.close()
                    raise
                except BaseException as exc:  # noqa: BLE001 - forwarded into the awaitable
                    signal = it.throw(exc)
                else:
                    signal = it.send(sent)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            if expiry.fired and task.uncancel() == 0:
                raise DeadlineExpired from None
            raise
        finally:
            handle.cancel()


def bounded(awaitable: Awaitable[T], timeout: float) -> Awaitable[T]:
    """*awaitable* bounded by *timeout* seconds; :class:`DeadlineExpired` past it.

    On a native timer when no anyio cancel scope can reach the task, else under an
    anyio cancel scope entered before the awaitable's first step.
    """
    task = native_task()
    if task is not None:
        return on_timer(awaitable, timeout, task)
    return _in_cancel_scope(awaitable, timeout)


async def _in_cancel_scope(awaitable: Awaitable[T], timeout: float) -> T:
    with anyio.CancelScope(deadline=anyio.current_time() + timeout) as scope:
        return await awaitable
    # Only reached when our own deadline cancelled the awaitable.
    assert scope.cancelled_caught
    raise DeadlineExpired
