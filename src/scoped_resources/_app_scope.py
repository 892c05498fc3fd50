"""The app scope: opens app resources at start-up and closes them at shutdown.

It opens its resources concurrently, each in a task of its own, so that each is
entered and exited by the same task, and drains request scopes before closing.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
import warnings
import weakref
from typing import Any

import anyio

from ._acquire import _enter, _enter_observed
from ._guard import DeadlineExpired
from ._lease import ACQUIRING, HELD, RELEASED, Lease
from ._observe import Observer
from ._plan import Plan, Recipe
from ._release import _deadline, _release_all, _ReleaseRun, _report
from ._resource import Level, Resource
from ._scope import CLOSED, CLOSING, OPEN, Scope
from .exceptions import (
    StartupFailed,
)

logger = logging.getLogger("scoped_resources")

#: Every app scope open now, in this process (for leak checks).
_OPEN_APP_SCOPES: weakref.WeakSet[AppScope] = weakref.WeakSet()


def open_app_scopes() -> tuple[AppScope, ...]:
    """The app scopes open now in this process."""
    return tuple(_OPEN_APP_SCOPES)


class AppScope(Scope):
    """The app's scope: opens app resources at start-up and closes them at shutdown.

    An app resource may take the app scope itself as a parameter (annotated
    ``AppScope``), to open child scopes later, from a background task of its own.
    """

    #: Resources of the app scope may ask for it (it exists when they open).
    __scoped_app_context__ = True

    __slots__ = (
        "_children",
        "_debug",
        "_drain_timeout",
        "_drained",
        "_failed",
        "_leak_after",
        "_observer",
        "_plan",
        "_reported",
        "_slots",
        "_sweeper",
        "_tg",
        "_watched",
        "_watcher",
    )

    def __init__(
        self,
        name: str,
        plan: Plan,
        drain_timeout: float | None,
        *,
        observer: Observer | None = None,
        debug: bool = False,
        leak_after: float | None = None,
    ) -> None:
        # Before Scope.__init__: a child scope registers with its app scope's children.
        self._children: set[Scope] = set()
        super().__init__(name, Level.APP, None, {AppScope: self})
        self._observer = observer
        self._debug = debug
        #: Whether an acquire has more to do than acquire: tell an observer, keep its site.
        self._watched = observer is not None or debug
        self._leak_after = leak_after
        self._reported: dict[int, Lease] = {}
        self._watcher: anyio.CancelScope | None = None
        #: The FastAPI integration's request sweeper, while the app serves.
        self._sweeper: Any = None
        self._plan = plan
        self._drained: anyio.Event | None = None
        self._drain_timeout = drain_timeout
        self._tg: Any = None
        self._slots: dict[Resource[Any], _Slot] = {}
        self._failed: _Slot | None = None

    def __del__(self) -> None:
        # An open child scope is kept by its app scope (in _children) until it closes,
        # so it can only be garbage-collected together with it: the app scope warns
        # for itself and for each of them, and a request scope needs no finalizer.
        for scope in (self, *self._children):
            if scope._state != CLOSED and scope._leases:
                names = ", ".join(repr(lease.resource.name) for lease in scope._leases)
                warnings.warn(
                    f"scope {scope.name!r} was garbage-collected with resources still open "
                    f"({names}); close it with 'async with' or 'await scope.aclose()'",
                    ResourceWarning,
                    stacklevel=1,
                )

    @property
    def inflight(self) -> int:
        """How many child scopes (requests, jobs) are open now."""
        return len(self._children)

    @property
    def open_scopes(self) -> tuple[Scope, ...]:
        """The child scopes (requests, jobs) open now, for leak reports."""
        return tuple(self._children)

    async def __aenter__(self) -> AppScope:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            await self._open_all()
            _OPEN_APP_SCOPES.add(self)
            if self._leak_after is not None:
                self._watcher = anyio.CancelScope()
                self._tg.start_soon(self._watch_leaks, self._watcher, self._leak_after)
        except BaseException as exc:
            self._tg.cancel_scope.cancel()
            if self._state != CLOSING:
                # Cancelled from outside (the start-up's deadline, a signal), not failed:
                # those already open hold their resource in a shielded wait, so they
                # are told to release it, in reverse order.
                self._state = CLOSING
                with anyio.CancelScope(shield=True):
                    _, errors, _ = await self._close_slots(None)
                _report(self.name, exc, False, errors, None)
            for slot in self._slots.values():
                slot.stop.set()  # any that opens from now on releases at once
            self._state = CLOSED
            await self._tg.__aexit__(None, None, None)
            raise
        return self

    async def _open_all(self) -> None:
        slots = self._slots
        for declared in self._plan.app_order:
            # An override in force at start-up is opened instead of the original.
            res = declared._override or declared
            deps = [
                slots[dep._override or dep]
                for _, dep in res._compiled.deps
                if dep in slots or dep._override in slots
            ]
            slot = _Slot(res, deps)
            slots[res] = slot
            self._tg.start_soon(self._hold, slot, name=f"scoped_resources: {res.name}")
        for slot in slots.values():
            await slot.opened.wait()
        failed = self._failed
        if failed is None:
            return
        self._state = CLOSING
        _, errors, _ = await self._close_slots(None)
        error = failed.error
        assert error is not None
        if isinstance(error, DeadlineExpired):
            raised = StartupFailed(
                failed.resource.name,
                f"it did not open within {failed.resource.acquire_timeout:g} s",
            )
            raised.__suppress_context__ = True
        elif isinstance(error, StartupFailed):
            raised = error
        else:
            raised = StartupFailed(failed.resource.name, f"{type(error).__name__}: {error}")
            raised.__cause__ = error
        # What failed to release on the way out: logged, and noted on the error.
        _report(self.name, raised, False, errors, None)
        raise raised

    async def _hold(self, slot: _Slot) -> None:
        """Open one app resource, hold it until shutdown, and release it: all in this task.

        One cancel scope spans the resource's whole life, its deadline and shield
        changed between phases, so that a resource keeping a task group (or any
        cancel scope) open across its ``yield`` nests properly inside it.
        """
        res = slot.resource
        lease = Lease(res)
        scope = slot.cancel
        run = _ReleaseRun(None, self._observer)
        try:
            with scope:
                for dep in slot.deps:
                    await dep.opened.wait()
                    if dep.error is not None:
                        raise StartupFailed(dep.resource.name, "a dependency failed")
                recipe: Recipe = res._compiled
                kwargs = dict(recipe.values)
                for pname, dep_res in recipe.deps:
                    kwargs[pname] = await self.get(dep_res)
                for pname, typ in recipe.context:
                    kwargs[pname] = self._context_value(res, pname, typ)
                if res.acquire_timeout is not None:
                    scope.deadline = anyio.current_time() + res.acquire_timeout
                if self._observer is None:
                    await _enter(lease, kwargs)
                else:
                    await _enter_observed(lease, kwargs, self._observer, bounded=False)
                scope.deadline = math.inf
                # Held: only shutdown (the stop event) ends it, never a cancellation
                # from outside, which would leave the instance unreleased.
                scope.shield = True
                self._opened(slot, lease)
                await slot.stop.wait()
                if lease.exit is None:
                    lease.state = RELEASED
                else:
                    # Release under the same (shielded) scope, bounded by its own deadline.
                    scope.deadline = _deadline(lease)
                    run.exc = slot.outcome
                    await run.release_from([lease], scope)
        except Exception as exc:
            if lease.state != ACQUIRING:
                raise
            self._fail(slot, exc)
            return
        if lease.state == ACQUIRING:  # cancelled: past its deadline, or another one failed
            failed_elsewhere = self._failed is not None and self._failed is not slot
            self._fail(
                slot,
                StartupFailed(res.name, "cancelled: another resource failed")
                if failed_elsewhere
                else DeadlineExpired(),
            )
            return
        with anyio.CancelScope(shield=True):
            await run.terminate_stopped()
        slot.result = (run.suppressed, run.errors, run.interrupt)
        slot.done.set()

    def _opened(self, slot: _Slot, lease: Lease) -> None:
        lease.state = HELD
        lease.acquired_at = time.monotonic()
        self._cache[slot.resource] = lease
        self._leases.append(lease)
        slot.lease = lease
        slot.opened.set()

    def _fail(self, slot: _Slot, exc: Exception) -> None:
        slot.error = exc
        if self._failed is None:
            self._failed = slot
            for other in self._slots.values():
                if other is not slot and not other.opened.is_set():
                    other.cancel.cancel()
        slot.opened.set()

    async def _close_slots(
        self, exc: BaseException | None
    ) -> tuple[bool, list[Exception], BaseException | None]:
        errors: list[Exception] = []
        interrupt: BaseException | None = None
        suppressed = False
        for lease in reversed(self._leases):
            slot = self._slots.get(lease.resource)
            if slot is None:  # an override acquired after start-up, held by this task
                s, errs, intr = await _release_all([lease], exc, self._observer)
                suppressed = suppressed or s
                errors.extend(errs)
                interrupt = interrupt or intr
                continue
            slot.outcome = exc
            slot.stop.set()
            with anyio.CancelScope(shield=True):
                await slot.done.wait()
            s, errs, intr = slot.result
            suppressed = suppressed or s
            errors.extend(errs)
            interrupt = interrupt or intr
        self._cache.clear()
        return suppressed, errors, interrupt

    @property
    def draining(self) -> bool:
        """True once shutdown began: it waits for open scopes, then closes."""
        return self._drained is not None or self._state != OPEN

    async def _watch_leaks(self, scope: anyio.CancelScope, after: float) -> None:
        with scope:
            while True:
                await anyio.sleep(max(after / 4, 0.01))
                self.report_leaks(after)

    def report_leaks(self, after: float) -> list[str]:
        """Log (once each) the leases held longer than *after* seconds; return the reports."""
        now = time.monotonic()
        reports: list[str] = []
        still_out: dict[int, Lease] = {}
        for child in tuple(self._children):
            for lease in child._leases:
                if lease.state != HELD or now - lease.acquired_at < after:
                    continue
                still_out[id(lease)] = lease
                if id(lease) in self._reported:
                    continue
                report = (
                    f"resource {lease.resource.name!r} has been held for "
                    f"{now - lease.acquired_at:.1f} s by {child.describe()}"
                )
                if lease.site is not None:
                    report += "; acquired at:\n" + "".join(traceback.format_list(lease.site))
                logger.warning("%s", report)
                reports.append(report)
        self._reported = still_out
        return reports

    async def _drain(self) -> None:
        if not self._children:
            return
        self._drained = anyio.Event()
        with anyio.move_on_after(self._drain_timeout, shield=True) as cs:
            await self._drained.wait()
        if cs.cancelled_caught:
            logger.warning(
                "app scope %r: %d scope(s) still open after the %g s drain timeout; "
                "closing app resources anyway",
                self.name,
                len(self._children),
                self._drain_timeout,
            )

    async def aclose(self, exc: BaseException | None = None) -> bool:
        if self._state != OPEN:
            return False
        if self._watcher is not None:
            self._watcher.cancel()
        await self._drain()
        self._state = CLOSING
        try:
            suppressed, errors, interrupt = await self._close_slots(exc)
        finally:
            self._state = CLOSED
            _OPEN_APP_SCOPES.discard(self)
        tg, self._tg = self._tg, None
        if tg is not None:
            await tg.__aexit__(None, None, None)
        return _report(self.name, exc, suppressed, errors, interrupt)

    async def ping(self, timeout: float) -> dict[str, BaseException | None]:
        """Ping every app resource that has a ping hook, concurrently."""
        results: dict[str, BaseException | None] = {}

        async def one(lease: Lease) -> None:
            hook = lease.resource.ping
            assert hook is not None
            try:
                with anyio.fail_after(timeout):
                    await hook(lease.value)
            except Exception as exc:  # noqa: BLE001 - the answer is the error
                results[lease.resource.name] = exc
            else:
                results[lease.resource.name] = None

        async with anyio.create_task_group() as tg:
            for lease in self._leases:
                if lease.resource.ping is not None:
                    tg.start_soon(one, lease)
        return results


class _Slot:
    """One app resource's task: opened, told to stop, done."""

    __slots__ = (
        "cancel",
        "deps",
        "done",
        "error",
        "lease",
        "opened",
        "outcome",
        "resource",
        "result",
        "stop",
    )

    def __init__(self, resource: Resource[Any], deps: list[_Slot]) -> None:
        self.resource = resource
        self.deps = deps
        self.opened = anyio.Event()
        self.stop = anyio.Event()
        self.done = anyio.Event()
        self.cancel = anyio.CancelScope()
        self.error: BaseException | None = None
        self.lease: Lease | None = None
        self.outcome: BaseException | None = None
        self.result: tuple[bool, list[Exception], BaseException | None] = (False, [], None)
