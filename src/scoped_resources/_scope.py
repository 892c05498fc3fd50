"""Scope: the owner of live instances (leases), and their release.

A scope goes ``open -> closing -> closed``. It acquires instances in dependency
order, caches one per resource, and releases them in reverse order: each release
shielded from cancellation, bounded by its resource's deadline (then terminated),
told the outcome, and attempted even when another failed. The app scope opens its
resources concurrently, each in a task of its own, so that each is entered and
exited by the same task.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
import traceback
import warnings
import weakref
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio

from ._guard import DeadlineExpired, bounded, native_task, on_timer
from ._observe import Observer
from ._plan import Plan, Recipe
from ._resource import Kind, Level, Resource
from .exceptions import (
    ReleaseFailed,
    ReleaseTimeout,
    ResourceBusy,
    ResourceMisuse,
    ScopeClosed,
    StartupFailed,
)

T = TypeVar("T")

logger = logging.getLogger("scoped_resources")

# Lease states.
ACQUIRING, HELD, RELEASING, RELEASED, TERMINATED, FAILED = range(6)
_LEASE_STATES = ("acquiring", "held", "releasing", "released", "terminated", "failed")
# Scope states.
OPEN, CLOSING, CLOSED = range(3)
_SCOPE_STATES = ("open", "closing", "closed")


#: Every app scope open now, in this process (for leak checks).
_OPEN_APP_SCOPES: weakref.WeakSet[AppScope] = weakref.WeakSet()


def open_app_scopes() -> tuple[AppScope, ...]:
    """The app scopes open now in this process."""
    return tuple(_OPEN_APP_SCOPES)


class Lease:
    """One live instance of a resource in a scope."""

    __slots__ = ("acquired_at", "error", "exit", "resource", "site", "state", "value", "waiters")

    def __init__(self, resource: Resource[Any]) -> None:
        self.resource = resource
        self.state = ACQUIRING
        self.value: Any = None
        self.exit: Any = None
        self.error: BaseException | None = None
        self.waiters: anyio.Event | None = None
        self.acquired_at = 0.0
        #: Where it was acquired (debug mode only): the innermost frames of the stack.
        self.site: list[traceback.FrameSummary] | None = None

    @property
    def state_name(self) -> str:
        return _LEASE_STATES[self.state]

    def __repr__(self) -> str:
        return f"<Lease {self.resource.name!r} {self.state_name}>"


class Scope:
    """Live instances of resources, released together when the scope closes.

    Get one with ``await scope.get(resource)``. Open a scope for work outside HTTP
    with ``async with resources.scope() as scope``.
    """

    __slots__ = (
        "__weakref__",
        "_cache",
        "_context",
        "_leases",
        "_root",
        "_state",
        "level",
        "name",
        "parent",
    )

    def __init__(
        self,
        name: str,
        level: Level,
        parent: Scope | None,
        context: dict[type, Any] | None = None,
    ) -> None:
        self.name = name
        self.level = level
        self.parent = parent
        self._cache: dict[Resource[Any], Lease] = {}
        self._leases: list[Lease] = []
        self._state = OPEN
        self._context = context
        self._root: AppScope | None = parent._root if parent is not None else None

    # -- state --------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``"open"``, ``"closing"`` or ``"closed"``."""
        return _SCOPE_STATES[self._state]

    @property
    def leases(self) -> tuple[Lease, ...]:
        """The instances this scope holds, in the order they were acquired."""
        return tuple(self._leases)

    def __repr__(self) -> str:
        return f"<Scope {self.name!r} {self.state} leases={len(self._leases)}>"

    def describe(self) -> str:
        """The scope's name, with the route it serves when it serves one."""
        scope: Scope | None = self
        while scope is not None:
            context = scope._context
            if context:
                for value in context.values():
                    route = getattr(value, "scope", {}).get("route")
                    method = getattr(value, "method", None)
                    if route is not None and method is not None:
                        return f"scope {self.name!r} ({method} {route.path})"
            scope = scope.parent
        return f"scope {self.name!r}"

    def __del__(self) -> None:
        if self._state != CLOSED and self._leases:
            names = ", ".join(repr(lease.resource.name) for lease in self._leases)
            warnings.warn(
                f"scope {self.name!r} was garbage-collected with resources still open "
                f"({names}); close it with 'async with' or 'await scope.aclose()'",
                ResourceWarning,
                stacklevel=1,
            )

    # -- getting ------------------------------------------------------------------

    async def get(self, resource: Resource[T]) -> T:
        """Return this scope's instance of *resource*, acquiring it on first use."""
        if resource._override is not None:
            resource = resource._override
        lease = self._cache.get(resource)
        if lease is not None and lease.state == HELD:
            return lease.value  # type: ignore[no-any-return]
        return await self._get_slow(resource, lease)

    def child(self, name: str = "scope", context: dict[type, Any] | None = None) -> Scope:
        """A nested scope whose request resources are its own and released with it."""
        self._check_open(None)
        assert self._root is not None
        return self._root._child(name, Level.REQUEST, self, context)

    async def _get_slow(self, resource: Resource[T], lease: Lease | None) -> T:
        owner = self
        while (
            owner.level > resource.level
            and owner.parent is not None
            and owner.parent.level >= resource.level
        ):
            owner = owner.parent
        if owner is not self:
            return await owner.get(resource)
        if self._state != OPEN:
            raise ScopeClosed(self.name, self.state, resource.name)
        if lease is None:
            if resource.level > self.level:
                raise ResourceMisuse(
                    resource.name,
                    f"it is request-scoped but was asked for from scope {self.name!r}, "
                    "which outlives requests",
                    "ask a request scope for it (resources.scope() or app_scope.child())",
                )
            return await self._acquire(resource)  # type: ignore[no-any-return]
        if lease.state == ACQUIRING:
            # Another task is acquiring it: share its result.
            if lease.waiters is None:
                lease.waiters = anyio.Event()
            await lease.waiters.wait()
            if lease.state == HELD:
                return lease.value  # type: ignore[no-any-return]
            if lease.error is not None:
                raise lease.error
        raise ScopeClosed(self.name, f"holding {resource.name!r} {lease.state_name}")

    async def _acquire(self, resource: Resource[Any]) -> Any:
        lease = Lease(resource)
        self._cache[resource] = lease
        try:
            recipe: Recipe | None = resource._compiled
            if recipe is None:
                raise ResourceMisuse(
                    resource.name,
                    "it was declared after the plan was compiled",
                    "declare every resource before the app starts",
                )
            kwargs = dict(recipe.values) if recipe.values else {}
            root = self._root
            for pname, dep in recipe.deps:
                held = root._cache.get(dep) if root is not None and dep._override is None else None
                kwargs[pname] = held.value if held is not None else await self.get(dep)
            for pname, typ in recipe.context:
                kwargs[pname] = self._context_value(resource, pname, typ)
            observer = root._observer if root is not None else None
            if observer is None:
                await _enter_bounded(lease, kwargs)
            else:
                await _enter_observed(lease, kwargs, observer)
            if root is not None and root._debug:
                lease.site = traceback.extract_stack(limit=12)[:-1]
        except BaseException as exc:
            lease.state = FAILED
            lease.error = exc
            if self._cache.get(resource) is lease:
                del self._cache[resource]
            if isinstance(exc, Exception) and not isinstance(exc, ResourceBusy):
                _note(exc, f"while acquiring resource {resource.name!r}")
            if lease.waiters is not None:
                lease.waiters.set()
            raise
        lease.state = HELD
        lease.acquired_at = time.monotonic()
        self._leases.append(lease)
        if lease.waiters is not None:
            lease.waiters.set()
        return lease.value

    def _context_value(self, resource: Resource[Any], pname: str, typ: type) -> Any:
        scope: Scope | None = self
        while scope is not None:
            if scope._context is not None and typ in scope._context:
                return scope._context[typ]
            scope = scope.parent
        raise ScopeClosed(self.name, f"without a {typ.__qualname__} for {resource.name!r}.{pname}")

    def _check_open(self, resource: Resource[Any] | None) -> None:
        if self._state != OPEN:
            raise ScopeClosed(self.name, self.state, resource.name if resource else None)

    # -- closing ------------------------------------------------------------------

    async def __aenter__(self) -> Scope:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return await self.aclose(exc)

    async def aclose(self, exc: BaseException | None = None) -> bool:
        """Release every instance in reverse order; idempotent.

        *exc* is the outcome: the exception that ended the scope, or None. Returns
        True only when a resource declared ``suppress_errors=True`` suppressed it.
        Raises :class:`ReleaseFailed` when releases failed and *exc* is None; when
        *exc* is set it wins, and the failures are logged and noted on it.
        """
        if self._state != OPEN:
            return False
        self._state = CLOSING
        try:
            observer = self._root._observer if self._root is not None else None
            suppressed, errors, interrupt = await _release_all(self._leases, exc, observer)
        finally:
            self._state = CLOSED
            self._cache.clear()
            if self._root is not None:
                self._root._child_closed(self)
        return _report(self.name, exc, suppressed, errors, interrupt)


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
        super().__init__(name, Level.APP, None, {AppScope: self})
        self._observer = observer
        self._debug = debug
        self._leak_after = leak_after
        self._reported: dict[int, Lease] = {}
        self._watcher: anyio.CancelScope | None = None
        #: The FastAPI integration's request sweeper, while the app serves.
        self._sweeper: Any = None
        self._root = self
        self._plan = plan
        self._children: set[Scope] = set()
        self._drained: anyio.Event | None = None
        self._drain_timeout = drain_timeout
        self._tg: Any = None
        self._slots: dict[Resource[Any], _Slot] = {}
        self._failed: _Slot | None = None

    @property
    def inflight(self) -> int:
        """How many child scopes (requests, jobs) are open now."""
        return len(self._children)

    @property
    def open_scopes(self) -> tuple[Scope, ...]:
        """The child scopes (requests, jobs) open now, for leak reports."""
        return tuple(self._children)

    def _child(
        self, name: str, level: Level, parent: Scope, context: dict[type, Any] | None
    ) -> Scope:
        if self._state != OPEN:
            raise ScopeClosed(self.name, self.state)
        scope = Scope(name, level, parent, context)
        self._children.add(scope)
        return scope

    def _child_closed(self, scope: Scope) -> None:
        self._children.discard(scope)
        if not self._children and self._drained is not None:
            self._drained.set()

    async def __aenter__(self) -> AppScope:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            await self._open_all()
            _OPEN_APP_SCOPES.add(self)
            if self._leak_after is not None:
                self._watcher = anyio.CancelScope()
                self._tg.start_soon(self._watch_leaks, self._watcher, self._leak_after)
        except BaseException:
            self._tg.cancel_scope.cancel()
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
        await self._close_slots(None)
        error = failed.error
        assert error is not None
        if isinstance(error, DeadlineExpired):
            raise StartupFailed(
                failed.resource.name,
                f"it did not open within {failed.resource.acquire_timeout:g} s",
            ) from None
        if isinstance(error, StartupFailed):
            raise error
        raise StartupFailed(failed.resource.name, f"{type(error).__name__}: {error}") from error

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


# -- entering and releasing -----------------------------------------------------------


async def _enter(lease: Lease, kwargs: dict[str, Any]) -> None:
    """Make the instance; store its value and how to release it on *lease*."""
    res = lease.resource
    kind = res.kind
    factory = res.call
    if kind is Kind.ASYNC_GEN:
        gen = factory(**kwargs)
        try:
            value = await gen.__anext__()
        except StopAsyncIteration:
            raise ResourceMisuse(
                res.name, "its generator ended without yielding", "yield the instance once"
            ) from None
        lease.exit = gen
    elif kind is Kind.CONTEXT or kind is Kind.INSTANCE:
        cm = factory(**kwargs) if kind is Kind.CONTEXT else factory
        value = await cm.__aenter__()
        lease.exit = cm
    else:
        value = await factory(**kwargs) if kind is Kind.ASYNC_FN else factory(**kwargs)
        if hasattr(value, "__aenter__") and hasattr(value, "__aexit__"):
            cm = value
            value = await cm.__aenter__()
            lease.exit = cm
    if inspect.iscoroutine(value):
        value.close()
        lease.value = None
        lease.state = HELD
        misuse = ResourceMisuse(
            res.name,
            "it produced an un-awaited coroutine",
            "add the missing 'await' where the factory makes its instance",
        )
        if lease.exit is not None:
            await _release_all([lease], misuse, None)
        raise misuse
    lease.value = value


async def _enter_bounded(lease: Lease, kwargs: dict[str, Any]) -> None:
    """Enter *lease* within its resource's acquire deadline, else ResourceBusy."""
    timeout = lease.resource.acquire_timeout
    if timeout is None:
        await _enter(lease, kwargs)
        return
    try:
        await bounded(_enter(lease, kwargs), timeout)
    except DeadlineExpired:
        raise ResourceBusy(lease.resource.name, timeout) from None


async def _enter_observed(
    lease: Lease, kwargs: dict[str, Any], observer: Observer, *, bounded: bool = True
) -> None:
    res = lease.resource
    observer.acquire_started(res)
    started = time.perf_counter()
    try:
        await (_enter_bounded(lease, kwargs) if bounded else _enter(lease, kwargs))
    except BaseException as exc:
        observer.acquire_failed(res, time.perf_counter() - started, isinstance(exc, ResourceBusy))
        raise
    observer.acquired(res, time.perf_counter() - started)


async def _release_gen(gen: Any, exc: BaseException | None) -> bool:
    if exc is None:
        try:
            await gen.__anext__()
        except StopAsyncIteration:
            return False
        await gen.aclose()
        raise RuntimeError("the generator yielded more than once; yield exactly once")
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
    if lease.resource.kind is Kind.ASYNC_GEN:
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
    leases: list[Lease], exc: BaseException | None, observer: Observer | None
) -> tuple[bool, list[Exception], BaseException | None]:
    """Release *leases* in reverse order; never raises.

    On asyncio outside anyio cancel scopes, each release runs under a native timer
    (see ``_guard``). Otherwise all run under one shielded cancel scope whose
    deadline is moved to each release's own. Either way a release that overruns
    its deadline, fails, or is interrupted by a native cancel is terminated, and
    the rest are still released.
    """
    run = _ReleaseRun(exc, observer)
    todo = [lease for lease in reversed(leases) if lease.exit is not None]
    for lease in leases:
        if lease.exit is None:
            lease.state = RELEASED
    if not todo:
        return run.suppressed, run.errors, run.interrupt
    task = native_task()
    if task is not None:
        for lease in todo:
            await run.release_on_timer(lease, task)
            await run.terminate_stopped()
        return run.suppressed, run.errors, run.interrupt
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

    async def release_on_timer(self, lease: Lease, task: asyncio.Task[Any]) -> None:
        """Release one lease under a native timer (no anyio scope can cancel this task)."""
        lease.state = RELEASING
        if self.observer is not None:
            self.started = time.perf_counter()
        timeout = lease.resource.release_timeout
        release = _release_awaitable(lease, self.exc)
        try:
            result = await (release if timeout is None else on_timer(release, timeout, task))
        except DeadlineExpired:
            self._timed_out(lease)
        except Exception as failure:  # noqa: BLE001 - gathered and raised together
            self._failed(lease, failure)
        except BaseException as stop:  # noqa: BLE001 - a native cancel (not ours) or ^C
            self._interrupted(lease, stop)
        else:
            self._released(lease, result)

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
    errors: list[Exception],
    interrupt: BaseException | None,
) -> bool:
    for err in errors:
        logger.error(
            "scope %r: releasing resource %r failed",
            scope,
            getattr(err, "__scoped_resource__", "?"),
            exc_info=err,
        )
    if interrupt is not None:
        raise interrupt
    if errors:
        if exc is not None:
            names = ", ".join(repr(getattr(e, "__scoped_resource__", "?")) for e in errors)
            _note(exc, f"releasing {names} also failed (logged by 'scoped_resources')")
            return False
        raise ReleaseFailed(scope, errors)
    return suppressed


def _note(exc: BaseException, text: str) -> None:
    notes = getattr(exc, "__notes__", None)
    if notes is None or text not in notes:
        exc.add_note(text)
