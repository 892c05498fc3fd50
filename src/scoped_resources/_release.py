"""The release run: every lease of a scope released in reverse order.

Each release is shielded from cancellation, bounded by its resource's deadline
(then the instance is terminated), told the outcome, and attempted even when
another failed; the failures are gathered into one report.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from ._failures import log_failure
from ._guard import Hold, expired, holds, native_hold
from ._lease import FAILED, RELEASED, RELEASING, TERMINATED, Lease
from ._observe import Observer
from ._resource import ASYNC_GEN, Resource
from .exceptions import (
    ReleaseFailed,
    ReleaseTimeout,
)

logger = logging.getLogger("scoped_resources")

_YIELDED_TWICE = "the generator yielded more than once; yield exactly once"


async def _release_gen(gen: Any, exc: BaseException | None) -> bool:
    if exc is None:
        try:
            await anext(gen)
        except StopAsyncIteration:
            return False
        await gen.aclose()
        raise RuntimeError(_YIELDED_TWICE)
    try:
        await gen.athrow(exc)
    except StopAsyncIteration:
        return True
    except BaseException as err:
        if err is exc:
            return False
        raise
    await gen.aclose()
    raise RuntimeError("the generator yielded again after an error; yield exactly once")


def _release_awaitable(lease: Lease, exc: BaseException | None) -> Awaitable[Any]:
    if lease.resource.kind is ASYNC_GEN:
        return _release_gen(lease.exit, exc)
    if exc is None:
        return lease.exit.__aexit__(None, None, None)  # type: ignore[no-any-return]
    return lease.exit.__aexit__(type(exc), exc, exc.__traceback__)  # type: ignore[no-any-return]


async def _terminate(lease: Lease) -> bool:
    """Run the resource's terminate hook (hard close); report, never raise."""
    hook: Callable[[Any], Any] | None = lease.resource.terminate
    if hook is None:
        return False
    try:
        result = hook(lease.value)
        if inspect.isawaitable(result):
            with anyio.move_on_after(lease.resource.release_timeout or math.inf):
                await result
    except Exception as err:
        logger.error(  # noqa: TRY400 - the traceback is err's, not the current one
            "terminating resource %r failed", lease.resource.name, exc_info=err
        )
    lease.state = TERMINATED
    return True


async def _release_all(
    leases: list[Lease],
    exc: BaseException | None,
    observer: Observer | None,
    hold: Hold | None = None,
) -> tuple[bool, Sequence[Exception], BaseException | None]:
    """Release *leases* (at least one) in reverse order; never raises.

    On asyncio outside anyio cancel scopes, each release's deadline is on the loop's
    deadline wheel (see ``_guard``), and the releases run in this one frame. Otherwise
    all run under one shielded cancel scope whose deadline is moved to each release's
    own. Either way a release that overruns its deadline, fails, or is interrupted by
    a native cancel is terminated, and the rest are still released.
    """
    if hold is None or not holds(hold):
        hold = native_hold()
        if hold is None:
            return await _release_in_cancel_scopes(leases, exc, observer)
    task, wheel, loop, _ = hold
    # No anyio scope can cancel this task: each release on the loop's wheel, and a
    # lease whose release did not end well is terminated before the next is released.
    # The run's bookkeeping is made only when something needs it (an observer, an
    # error, a suppression): a clean release of every lease allocates nothing.
    run = _ReleaseRun(exc, observer) if observer is not None else None
    now = loop.time
    # One wheel record for the whole run, its deadline moved to each release's own
    # (no insertion and removal per lease): the lease released first, which is free
    # to serve, as a lease is a record only while a step of its own runs. ``fired``
    # is True while the record is off the wheel, as the wheel leaves it when it fires.
    record = leases[-1]
    record.task = task
    record.fired = True
    entries = wheel.entries
    try:
        for lease in reversed(leases):
            gen = lease.exit
            if gen is None:
                lease.state = RELEASED
                continue
            lease.state = RELEASING
            if run is not None:
                run.started = time.perf_counter()
            res = lease.resource
            timeout = res.release_timeout
            if timeout is not None:
                record.at = at = now() + timeout
                if record.fired:
                    record.fired = False
                    entries[record] = None
                if at < wheel._armed_at:
                    wheel._arm(at)
            else:
                record.at = math.inf
            try:
                if exc is None and res.kind is ASYNC_GEN:
                    # _release_gen inlined for the common case: one frame less per lease.
                    try:
                        await anext(gen)
                    except StopAsyncIteration:
                        result = False
                    else:
                        await gen.aclose()
                        raise RuntimeError(_YIELDED_TWICE)
                else:
                    result = await _release_awaitable(lease, exc)
            except Exception as failure:  # noqa: BLE001 - gathered and raised together
                run = run or _ReleaseRun(exc, observer)
                run._failed(lease, failure)
            except BaseException as stop:  # noqa: BLE001 - our deadline, a native cancel, or ^C
                run = run or _ReleaseRun(exc, observer)
                ours = timeout is not None and isinstance(stop, asyncio.CancelledError)
                if ours and expired(record):
                    run._timed_out(lease)
                else:
                    run._interrupted(lease, stop)
            else:
                if run is None and not result:
                    lease.state = RELEASED
                else:
                    run = run or _ReleaseRun(exc, observer)
                    run._released(lease, result)
            if run is not None and run.stopped is not None:
                record.at = math.inf
                await run.terminate_stopped()
    finally:
        if not record.fired:
            entries.pop(record, None)
        del record.task
    if run is None:
        return _CLEAN
    return run.suppressed, run.errors, run.interrupt


#: What a release run that needed no bookkeeping returns.
_CLEAN: tuple[bool, Sequence[Exception], None] = (False, (), None)


async def _release_in_cancel_scopes(
    leases: list[Lease], exc: BaseException | None, observer: Observer | None
) -> tuple[bool, Sequence[Exception], BaseException | None]:
    """_release_all's way under anyio: one shielded cancel scope per stretch of releases."""
    todo: list[Lease] = []
    for lease in reversed(leases):
        if lease.exit is None:
            lease.state = RELEASED
        else:
            todo.append(lease)
    run = _ReleaseRun(exc, observer)
    while run.index < len(todo):
        with anyio.CancelScope(deadline=_deadline(todo[run.index]), shield=True) as scope:
            await run.release_from(todo, scope)
        with anyio.CancelScope(shield=True):
            await run.terminate_stopped()
    return run.suppressed, run.errors, run.interrupt


def _deadline(lease: Lease) -> float:
    timeout = lease.resource.release_timeout
    return anyio.current_time() + timeout if timeout is not None else math.inf


class _ReleaseRun:
    """The running state of one _release_all call."""

    __slots__ = (
        "errors",
        "exc",
        "index",
        "interrupt",
        "observer",
        "started",
        "stopped",
        "suppressed",
    )

    def __init__(self, exc: BaseException | None, observer: Observer | None) -> None:
        self.exc = exc
        self.observer = observer
        self.started = 0.0
        self.index = 0
        self.suppressed = False
        self.errors: list[Exception] = []
        self.interrupt: BaseException | None = None
        self.stopped: Lease | None = None

    async def release_from(self, todo: list[Lease], scope: anyio.CancelScope) -> None:
        """Release todo[self.index:] until one overruns or is interrupted."""
        exc = self.exc
        first = True
        while self.index < len(todo):
            lease = todo[self.index]
            self.index += 1
            if not first:
                scope.deadline = _deadline(lease)
            first = False
            lease.state = RELEASING
            if self.observer is not None:
                self.started = time.perf_counter()
            try:
                result = await _release_awaitable(lease, exc)
            except Exception as failure:  # noqa: BLE001 - gathered and raised together
                if scope.cancel_called:
                    self._timed_out(lease)
                else:
                    self._failed(lease, failure)
                return
            except BaseException as stop:
                if scope.cancel_called:  # our own deadline: let the scope swallow it
                    self._timed_out(lease)
                    raise
                # A native cancel (not ours, so not shielded) or KeyboardInterrupt.
                self._interrupted(lease, stop)
                return
            if scope.cancel_called:  # it swallowed our cancellation, but ran late
                self._timed_out(lease)
                return
            self._released(lease, result)

    async def terminate_stopped(self) -> None:
        """Terminate the lease whose release did not end well, if there is one."""
        stopped, self.stopped = self.stopped, None
        if stopped is not None and await _terminate(stopped) and self.observer is not None:
            self.observer.terminated(stopped.resource)

    def _released(self, lease: Lease, result: Any) -> None:
        lease.state = RELEASED
        if self.observer is not None:
            self._observe(lease, "ok")
        if result and self.exc is not None:
            self._suppress(lease.resource)

    def _failed(self, lease: Lease, failure: Exception) -> None:
        name = lease.resource.name
        failure.__scoped_resource__ = name  # type: ignore[attr-defined]
        _note(failure, f"while releasing resource {name!r}")
        self.errors.append(failure)
        # Not terminated: the release ran to its end and reported its own error (a
        # COMMIT refused by a constraint leaves a healthy connection). Terminate
        # is for releases that did not end: past their deadline, or interrupted.
        lease.state = FAILED
        self._observe(lease, "failed")

    def _observe(self, lease: Lease, outcome: str) -> None:
        if self.observer is not None:
            self.observer.released(lease.resource, time.perf_counter() - self.started, outcome)

    def _timed_out(self, lease: Lease) -> None:
        res = lease.resource
        err = ReleaseTimeout(res.name, res.release_timeout or 0.0, res.terminate is not None)
        err.__scoped_resource__ = res.name  # type: ignore[attr-defined]
        self.errors.append(err)
        self.stopped = lease
        lease.state = FAILED
        self._observe(lease, "timeout")

    def _interrupted(self, lease: Lease, stop: BaseException) -> None:
        self.interrupt = self.interrupt or stop
        self.stopped = lease
        lease.state = FAILED
        self._observe(lease, "interrupted")
        logger.error(
            "release of resource %r was interrupted by %s; terminating it",
            lease.resource.name,
            type(stop).__name__,
        )

    def _suppress(self, res: Resource[Any]) -> None:
        if res.suppress_errors:
            self.suppressed = True
            return
        logger.warning(
            "resource %r tried to suppress %s while releasing; it was not suppressed "
            "(declare it with suppress_errors=True to allow that)",
            res.name,
            type(self.exc).__name__,
        )


def _report(
    scope: str,
    exc: BaseException | None,
    suppressed: bool,
    errors: Sequence[Exception],
    interrupt: BaseException | None,
) -> bool:
    for err in errors:
        # One record per failure; its traceback once a minute per cause (or at DEBUG).
        log_failure(logger, "releasing", getattr(err, "__scoped_resource__", "?"), err)
    if interrupt is not None:
        raise interrupt
    if errors:
        if exc is not None:
            names = ", ".join(repr(getattr(e, "__scoped_resource__", "?")) for e in errors)
            _note(exc, f"releasing {names} also failed (logged by 'scoped_resources')")
            return False
        raise ReleaseFailed(scope, list(errors))
    return suppressed


def _note(exc: BaseException, text: str) -> None:
    notes = getattr(exc, "__notes__", None)
    if notes is None or text not in notes:
        exc.add_note(text)
