"""Bound an awaitable by a deadline, and tell when the deadline hit.

Two ways, chosen per call (releases use the same two, with a shield, in ``_release``):

* **anyio cancel scope** (any backend): a ``CancelScope`` with the deadline,
  entered before the awaitable takes its first step, so that cancel scopes
  the awaitable opens nest inside it. About 8 us on asyncio.
* **the loop's deadline wheel** (asyncio, when the task is inside no anyio cancel
  scope): the deadline is recorded in a table kept per event loop, and one loop
  timer, armed for the earliest deadline in the table, cancels the tasks whose
  deadline passed, natively. Recording and removing a deadline costs a dict
  insertion and deletion; no timer is armed per call, and the awaitable is
  awaited directly. No shield is needed there: anyio delivers cancellation only
  to tasks inside one of its cancel scopes, and a native ``task.cancel()`` is not
  stopped by any shield. Whether the task is inside an anyio scope is read from
  anyio's task states; if that private table ever moves, the anyio path is used.
  A scope looks that up once (:func:`native_hold`) and keeps what it found; each
  later step only checks that it runs in the same task, still outside anyio
  scopes (:func:`holds`).
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import anyio

_task_states: Any
try:  # anyio's record of which cancel scope each asyncio task is in
    from anyio._backends._asyncio import _task_states
except ImportError:  # pragma: no cover - a future anyio: always use cancel scopes
    _task_states = None

T = TypeVar("T")


class DeadlineExpired(Exception):
    """Raised when the guarded awaitable was cancelled by its own deadline."""


_get_running_loop = asyncio.get_running_loop


def _task_of_lookup() -> Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None]:
    """The current task of a given running loop, without a Python frame where possible."""
    import types

    if isinstance(asyncio.current_task, types.BuiltinFunctionType):
        return asyncio.current_task  # C since 3.12
    tasks = getattr(asyncio.tasks, "_current_tasks", None)
    if isinstance(tasks, dict):
        return tasks.get
    return asyncio.current_task  # pragma: no cover - another 3.11 layout


_task_of = _task_of_lookup()
_ref = weakref.ref
#: The dict under anyio's weakly keyed task states (None if that ever changes).
_task_state_data: dict[Any, Any] | None = (
    _task_states.data if isinstance(getattr(_task_states, "data", None), dict) else None
)


def native_task() -> asyncio.Task[Any] | None:
    """The current asyncio task when no anyio cancel scope can reach it, else None."""
    try:
        task = _task_of(_get_running_loop())
    except RuntimeError:  # no asyncio loop: trio
        return None
    if task is None or _task_states is None:
        return None
    if _task_state_data is not None:  # WeakKeyDictionary.get(task) without its frame
        state = _task_state_data.get(_ref(task))
    else:
        state = _task_states.get(task)
    if state is not None and getattr(state, "cancel_scope", True) is not None:
        return None
    return task


class Timed(Protocol):
    """What the wheel keeps: the task it cancels once *at* passes, and whether it did.

    A :class:`Deadline` is one; so is a lease (``_lease.Lease``), which is its own
    record while its acquire or release runs, so that a step allocates nothing.
    """

    at: float
    task: asyncio.Task[Any]
    fired: bool


class Deadline:
    """One recorded deadline: the task the wheel cancels when *at* passes."""

    __slots__ = ("at", "fired", "task", "wheel")

    def __init__(self, task: asyncio.Task[Any], at: float, wheel: Wheel) -> None:
        self.task = task
        self.at = at
        self.fired = False
        self.wheel = wheel

    def remove(self) -> None:
        """Withdraw it (it no longer cancels its task); idempotent."""
        self.wheel.entries.pop(self, None)


class Wheel:
    """The deadlines of one event loop, served by one timer armed for the earliest."""

    __slots__ = ("_armed_at", "_handle", "_loop", "entries")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: the table of wheels is keyed weakly by loop, and a value that
        # referred to its key would keep every closed loop alive.
        self._loop = weakref.ref(loop)
        self.entries: dict[Timed, None] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = math.inf

    def add(self, task: asyncio.Task[Any], timeout: float) -> Deadline:
        """Cancel *task* once *timeout* seconds have passed, unless removed before."""
        at = task.get_loop().time() + timeout
        deadline = Deadline(task, at, self)
        self.put(deadline, task, at)
        return deadline

    def put(self, record: Timed, task: asyncio.Task[Any], at: float) -> None:
        """Cancel *task* at loop time *at*, with *record* as the entry (no allocation).

        Take it off with ``entries.pop(record, None)``; ``expired(record)`` tells
        whether it fired.
        """
        record.task = task
        record.at = at
        record.fired = False
        self.entries[record] = None
        if at < self._armed_at:
            self._arm(at)

    def _arm(self, at: float) -> None:
        loop = self._loop()
        if loop is None:  # pragma: no cover - a loop is alive while its tasks run
            return
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = at
        self._handle = loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = math.inf
        loop = self._loop()
        if loop is None:  # pragma: no cover - the timer runs on its live loop
            return
        now = loop.time()
        earliest = math.inf
        expired: list[Timed] = []
        for deadline in self.entries:
            if deadline.at <= now:
                expired.append(deadline)
            elif deadline.at < earliest:
                earliest = deadline.at
        for deadline in expired:
            del self.entries[deadline]
            deadline.fired = True
            deadline.task.cancel()
        if earliest < math.inf:
            self._arm(earliest)


_wheels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Wheel] = weakref.WeakKeyDictionary()
#: A one-entry cache in front of the table: the last loop (weakly) and its wheel.
_last: tuple[weakref.ref[asyncio.AbstractEventLoop] | None, Wheel | None] = (None, None)


def wheel_of(task: asyncio.Task[Any]) -> Wheel:
    """The deadline wheel of *task*'s loop (made on first use)."""
    global _last  # noqa: PLW0603 - the one-entry cache
    loop = task.get_loop()
    cached_ref, cached = _last
    if cached_ref is not None and cached_ref() is loop and cached is not None:
        return cached
    wheel = _wheels.get(loop)
    if wheel is None:
        wheel = _wheels[loop] = Wheel(loop)
    _last = (weakref.ref(loop), wheel)
    return wheel


#: A task's hold on its loop's wheel: the task, the wheel, the loop, and a weak
#: reference to the task (anyio's key for it). See :func:`native_hold`.
Hold = tuple[asyncio.Task[Any], Wheel, asyncio.AbstractEventLoop, "weakref.ref[Any]"]


def native_hold() -> Hold | None:
    """The current task's hold on its loop's wheel, or None where it cannot be used.

    None when not on asyncio, or when the task is inside an anyio cancel scope (bound
    the step with a cancel scope then). A scope keeps the hold its first step found
    and checks it again per step with :func:`holds`, which looks up no loop, makes
    no weak reference and consults no cache of wheels.
    """
    try:
        loop = _get_running_loop()
    except RuntimeError:  # no asyncio loop: trio
        return None
    task = _task_of(loop)
    if task is None or _task_state_data is None:
        return None
    tref = _ref(task)
    state = _task_state_data.get(tref)
    if state is not None and getattr(state, "cancel_scope", True) is not None:
        return None
    # wheel_of's one-entry cache, inlined: this runs once per scope.
    cached_ref, wheel = _last
    if wheel is None or cached_ref is None or cached_ref() is not loop:
        wheel = wheel_of(task)
    return task, wheel, loop, tref


def holds(hold: Hold) -> bool:
    """Whether *hold* is still good: its task is the current one, in no anyio cancel scope.

    The step that asks may run in another task than the one that found the hold
    (a scope shared by a task group), or inside a cancel scope entered since.
    """
    task, _, loop, tref = hold
    if _task_of(loop) is not task:
        return False
    state = _task_state_data.get(tref)  # type: ignore[union-attr]  # a hold implies the table
    return state is None or getattr(state, "cancel_scope", True) is None


def expired(record: Timed) -> bool:
    """After a CancelledError: True when *record*'s deadline caused it (now withdrawn)."""
    return record.fired and record.task.uncancel() == 0


async def on_wheel(awaitable: Awaitable[T], timeout: float, task: asyncio.Task[Any]) -> T:
    """Await *awaitable*; cancel *task* natively once *timeout* seconds have passed."""
    wheel = wheel_of(task)
    deadline = wheel.add(task, timeout)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if expired(deadline):
            raise DeadlineExpired from None
        raise
    finally:
        deadline.remove()


def bounded(awaitable: Awaitable[T], timeout: float) -> Awaitable[T]:
    """*awaitable* bounded by *timeout* seconds; :class:`DeadlineExpired` past it.

    On the loop's deadline wheel when no anyio cancel scope can reach the task, else under an
    anyio cancel scope entered before the awaitable's first step.
    """
    task = native_task()
    if task is not None:
        return on_wheel(awaitable, timeout, task)
    return _in_cancel_scope(awaitable, timeout)


async def _in_cancel_scope(awaitable: Awaitable[T], timeout: float) -> T:
    with anyio.CancelScope(deadline=anyio.current_time() + timeout) as scope:
        return await awaitable
    # Only reached when our own deadline cancelled the awaitable.
    assert scope.cancelled_caught
    raise DeadlineExpired
