"""Admission to a pool: waiters in arrival order, and a refusal at once when waiting is futile.

Every pooled adapter puts one :class:`Gate` in front of its pool, with the pool's
size as its capacity. A lease passes the gate before it touches the pool, so the
pool itself never makes anyone wait.

The model (cheap, and deliberately simple):

* ``hold`` -- the typical time a lease is held: an exponentially weighted moving
  average of finished lease durations. When every slot is taken and even the
  youngest lease has been held longer than that average, the average is stale
  (the service behind the pool slowed down), so the youngest lease's age is used
  instead: every holder has taken at least that long already.
* a waiter with ``ahead`` waiters in front of it is expected to wait
  ``(ahead + 1) / capacity * hold``: that many leases must end first, *capacity*
  of them at a time.
* when that expected wait exceeds the time left before the waiter's deadline, it
  is refused at once (:class:`ResourceBusy` with a ``retry_after`` computed from
  the same estimate) instead of at its deadline. This is checked on arrival and
  again, for waiters already queued, at most every *recheck* seconds while they
  wait (the estimate grows while leases stay stuck).
* until *min_samples* leases have ended (a cold pool) the average is not used:
  while every slot is taken the youngest lease's age is the estimate, for the
  same reason, but only the leases of the waiters *ahead* are counted
  (``ahead / capacity * hold``): nothing says how soon the current holders
  finish, so the head of the queue is refused only by its deadline. With a slot
  free there is no estimate. So a burst that is the pool's first traffic, behind
  stuck holders, is refused progressively, the back of the queue first, and not
  all at once at the deadline (when the answers would queue behind each other).

Limits: the estimate knows nothing about *why* leases are slow; a burst of
long leases after a quiet period is predicted from the quiet period until it
ends or outlives the average, and a stall of the whole process ages every
holder at once, which looks like stuck holders. Refusing by prediction can refuse a waiter that
would, by luck, have been served in time; turn it off with ``shed=False`` where
every request must wait its full deadline.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import anyio

from .._guard import DeadlineExpired, bounded, native_task, on_wheel
from ..exceptions import ResourceBusy

T = TypeVar("T")

__all__ = ["Gate", "GateStats"]

#: How long past an enclosing cancel scope's deadline a waiter still waits for
#: that scope to cancel it, before the gate refuses it itself (seconds).
_SCOPE_GRACE = 0.05
#: Bounds of a ``Retry-After`` computed from the estimate (seconds).
MIN_RETRY_AFTER = 1.0
MAX_RETRY_AFTER = 60.0


@dataclass(frozen=True, slots=True)
class GateStats:
    """A snapshot of one gate: what a resource page or a metric shows."""

    name: str
    capacity: int
    in_use: int
    waiting: int
    #: The typical hold time (seconds) the gate predicts with; None before enough samples.
    hold_estimate: float | None
    #: Waiters refused at once because their wait could not end within their deadline.
    shed: int
    #: Waiters refused because their deadline passed while they waited.
    timed_out: int
    shedding: bool


class _Waiter:
    __slots__ = ("budget", "deadline", "event", "expires", "future", "granted", "refused")

    def __init__(self, now: float, budget: float, grace: float) -> None:
        self.budget = budget
        #: When the wait must end: what predictions are measured against.
        self.deadline = now + budget
        #: When the gate itself gives up. Later than the deadline by *grace* when an
        #: enclosing cancel scope set it: that scope's cancellation, not a
        #: ResourceBusy, is what its owner asked for; the gate only backs it up.
        self.expires = self.deadline + grace
        self.granted = False
        #: The expected wait, set when the gate refused this waiter while it waited.
        self.refused: float | None = None
        # What the waiting task sleeps on: an asyncio future woken by the gate's
        # one timer (on asyncio), or an anyio event under a cancel scope (elsewhere).
        self.future: asyncio.Future[None] | None = None
        self.event: anyio.Event | None = None

    def wake(self) -> None:
        """End the wait: the gate granted, refused or expired this waiter."""
        if self.future is not None:
            if not self.future.done():
                self.future.set_result(None)
        elif self.event is not None:
            self.event.set()


class Gate:
    """Up to *capacity* leases at once; waiters served first come, first served.

    ``ticket = await gate.acquire()`` takes a slot (waiting at most *timeout*
    seconds, or less when an enclosing cancel scope has an earlier deadline) and
    ``gate.release(ticket)`` gives it back and records how long it was held. A
    waiter that is cancelled leaves the queue; a slot handed to a waiter that was
    cancelled at that moment is passed on, never lost.
    """

    def __init__(
        self,
        name: str,
        capacity: int,
        *,
        timeout: float | None,
        shed: bool = True,
        weight: float = 0.2,
        min_samples: int = 5,
        recheck: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"resource {name!r}: a pool gate needs a capacity of at least 1")
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"resource {name!r}: the estimate's weight must be in (0, 1]")
        self.name = name
        self.capacity = capacity
        self.timeout = timeout
        self.shed = shed
        self._weight = weight
        self._min_samples = min_samples
        self._recheck = recheck
        self._clock = clock
        self._in_use = 0
        #: Start times of the leases held now, by ticket (insertion order = age).
        self._held: dict[int, float] = {}
        self._next_ticket = 0
        #: Queued waiters in arrival order (a dict: O(1) removal of a cancelled one).
        self._waiters: dict[_Waiter, None] = {}
        self._hold: float | None = None
        self._samples = 0
        self._shed_count = 0
        self._timed_out = 0
        self._last_recheck = 0.0
        #: The gate's one timer on asyncio, armed while someone waits: its handle,
        #: loop and time.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._timer_at = math.inf

    def __repr__(self) -> str:
        s = self.stats()
        return f"<Gate {self.name!r} {s.in_use}/{s.capacity} waiting={s.waiting}>"

    # -- the estimate ------------------------------------------------------------

    def hold_estimate(self, now: float | None = None) -> float | None:
        """The typical hold time used for predictions (seconds), or None without evidence.

        The average of finished leases, raised to the youngest holder's age while
        every slot is taken; that age alone before *min_samples* leases ended.
        """
        prediction = self._prediction(now)
        return None if prediction is None else prediction[0]

    def _prediction(self, now: float | None) -> tuple[float, int] | None:
        """``(hold, first)``: with *ahead* in front, expect ``(ahead + first) / capacity * hold``.

        Warm (``first`` 1): the current holders' leases count as whole ones. Cold
        (``first`` 0): nothing says how soon the current holders finish, so only the
        leases of the waiters ahead are counted, each as long as the holders took.
        """
        stuck: float | None = None
        if self._in_use >= self.capacity and self._held:
            youngest = next(reversed(self._held.values()))
            stuck = (self._clock() if now is None else now) - youngest
        if self._hold is None or self._samples < self._min_samples:
            return None if stuck is None else (stuck, 0)
        return (self._hold if stuck is None else max(self._hold, stuck)), 1

    def expected_wait(self, ahead: int, now: float | None = None) -> float | None:
        """How long a waiter with *ahead* waiters in front of it should expect to wait."""
        prediction = self._prediction(now)
        if prediction is None:
            return None
        hold, first = prediction
        if ahead + first == 0:
            return None  # the head of a cold queue: only its deadline refuses it
        return (ahead + first) / self.capacity * hold

    def _record(self, held_for: float) -> None:
        if self._hold is None:
            self._hold = held_for
        else:
            self._hold += self._weight * (held_for - self._hold)
        self._samples += 1

    def stats(self) -> GateStats:
        """A frozen snapshot of the gate now."""
        return GateStats(
            name=self.name,
            capacity=self.capacity,
            in_use=self._in_use,
            waiting=len(self._waiters),
            hold_estimate=self.hold_estimate(),
            shed=self._shed_count,
            timed_out=self._timed_out,
            shedding=self.shed,
        )

    # -- slots --------------------------------------------------------------------

    def _take(self, now: float) -> int:
        ticket = self._next_ticket
        self._next_ticket += 1
        self._held[ticket] = now
        return ticket

    def _hand_on(self) -> None:
        """A slot came free: give it to the first waiter, else mark it free."""
        while self._waiters:
            waiter = next(iter(self._waiters))
            del self._waiters[waiter]
            waiter.granted = True
            waiter.wake()
            return
        self._in_use -= 1

    def release(self, ticket: int, *, record: bool = True) -> None:
        """Give back the slot of *ticket* (idempotent); *record* its hold time in the estimate.

        Pass ``record=False`` when the slot was taken but the pool lent nothing
        (its acquire failed): that is no lease duration.
        """
        started = self._held.pop(ticket, None)
        if started is None:
            return
        if record:
            self._record(self._clock() - started)
        self._hand_on()

    async def acquire(self, timeout: float | None = None) -> int:
        """Take a slot, waiting in arrival order; ResourceBusy when it cannot be had in time.

        *timeout* defaults to the gate's; an enclosing cancel scope's earlier
        deadline shortens it.
        """
        now = self._clock()
        if self._in_use < self.capacity and not self._waiters:
            self._in_use += 1
            return self._take(now)
        return await self._wait_for_slot(now, timeout, native_task())

    async def _wait_for_slot(
        self, now: float, timeout: float | None, task: asyncio.Task[Any] | None
    ) -> int:
        """Queue for a slot; *task* is the asyncio task when no anyio scope can reach it."""
        budget = self.timeout if timeout is None else timeout
        if budget is None:
            budget = math.inf
        grace = 0.0
        # Only a task inside an anyio cancel scope can have an earlier deadline; a
        # task in none (a plain asyncio request) skips anyio's lookup.
        if task is None:
            scope_left = anyio.current_effective_deadline() - anyio.current_time()
            if scope_left < budget:
                budget, grace = scope_left, _SCOPE_GRACE
        if self.shed:
            expected = self.expected_wait(len(self._waiters), now)
            if expected is not None and expected > budget:
                self._shed_count += 1
                raise self._busy(expected, 0.0, len(self._waiters))
        waiter = _Waiter(now, budget, grace)
        self._waiters[waiter] = None
        try:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not asyncio (trio)
                await self._wait_in_cancel_scopes(waiter)
            else:
                waiter.future = loop.create_future()
                self._arm(loop, waiter.expires)
                await waiter.future
        except BaseException:
            if waiter.granted:
                self._hand_on()  # handed to us as we were cancelled: pass it on
            else:
                self._waiters.pop(waiter, None)
            raise
        finally:
            if not self._waiters:
                self._disarm()
        if not waiter.granted:
            self._refuse(waiter)
        return self._take(self._clock())

    async def enter(self, acquire: Callable[[], Awaitable[T]]) -> tuple[int, T]:
        """Pass the gate, then ``await acquire()`` within what is left of the deadline.

        The one deadline of a pooled lease: the gate's wait and the pool's own
        acquire (instant unless it must reconnect) share *timeout*, and no timer
        is armed unless one of them actually waits. Returns ``(ticket, value)``;
        ResourceBusy when the deadline passes in either.
        """
        timeout = self.timeout
        started = self._clock()
        task = native_task()
        if self._in_use < self.capacity and not self._waiters:
            self._in_use += 1
            ticket = self._take(started)
        else:
            ticket = await self._wait_for_slot(started, None, task)
        try:
            if timeout is None:
                value = await acquire()
            else:
                left = max(timeout - (self._clock() - started), 0.0)
                # The task found above: on the loop's wheel, else under a cancel scope.
                bound = on_wheel(acquire(), left, task) if task else bounded(acquire(), left)
                value = await bound
        except DeadlineExpired:
            self.release(ticket, record=False)
            raise ResourceBusy(self.name, timeout or 0.0) from None
        except BaseException:
            self.release(ticket, record=False)
            raise
        return ticket, value

    def _refuse(self, waiter: _Waiter) -> NoReturn:
        """Raise ResourceBusy for a waiter that was refused or expired while it waited."""
        if waiter.refused is not None:
            self._shed_count += 1
            waited = self._clock() - (waiter.deadline - waiter.budget)
            raise self._busy(waiter.refused, waited, None)
        self._waiters.pop(waiter, None)
        self._timed_out += 1
        raise ResourceBusy(
            self.name, waiter.budget, retry_after=self._retry_after(len(self._waiters))
        )

    # -- the one timer (asyncio) ------------------------------------------------------

    def _arm(self, loop: asyncio.AbstractEventLoop, expires: float) -> None:
        """Make the gate's timer fire no later than *expires* (and each re-check period).

        One timer per gate, not per waiter: it ends the waits that expired and,
        when shedding, re-checks the queue's predictions.
        """
        at = min(expires, self._clock() + self._recheck) if self.shed else expires
        handle = self._timer
        if handle is not None and self._timer_loop is loop and self._timer_at <= at:
            return
        if handle is not None:
            handle.cancel()
        self._timer_loop = loop
        self._timer_at = at
        self._timer = loop.call_later(max(at - self._clock(), 0.0), self._on_timer, loop)

    def _disarm(self) -> None:
        """Nobody waits: stop the timer, and keep no reference to its loop."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_loop = None

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = self._clock()
        expired = [w for w in self._waiters if w.future is not None and w.expires <= now]
        for waiter in expired:
            del self._waiters[waiter]
            waiter.wake()
        if self.shed:
            self._last_recheck = -math.inf  # this tick is the re-check
            self._recheck_queue()
        earliest = min((w.expires for w in self._waiters if w.future is not None), default=None)
        if earliest is not None:
            self._arm(loop, earliest)

    async def _wait_in_cancel_scopes(self, waiter: _Waiter) -> None:
        waiter.event = anyio.Event()
        while True:
            left = waiter.expires - self._clock()
            if left <= 0:
                return
            with anyio.move_on_after(min(left, self._recheck) if self.shed else left):
                await waiter.event.wait()
            if waiter.granted or waiter.refused is not None:
                return
            if self.shed:
                self._recheck_queue()

    def _recheck_queue(self) -> None:
        """Refuse queued waiters whose expected wait now exceeds what they have left."""
        now = self._clock()
        if now - self._last_recheck < self._recheck:
            return
        self._last_recheck = now
        prediction = self._prediction(now)
        if prediction is None:
            return
        hold, first = prediction
        refused: list[_Waiter] = []
        for ahead, waiter in enumerate(self._waiters):
            expected = (ahead + first) / self.capacity * hold
            if expected > 0 and expected > waiter.deadline - now:
                waiter.refused = expected
                refused.append(waiter)
        for waiter in refused:
            del self._waiters[waiter]
            waiter.wake()

    def _retry_after(self, ahead: int) -> float:
        expected = self.expected_wait(ahead)
        if expected is None:
            return MIN_RETRY_AFTER
        return min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, math.ceil(expected)))

    def _busy(self, expected: float, waited: float, ahead: int | None) -> ResourceBusy:
        queue = len(self._waiters) if ahead is None else ahead
        return ResourceBusy(
            self.name,
            round(waited, 3),
            retry_after=self._retry_after(queue),
            expected_wait=expected,
        )
