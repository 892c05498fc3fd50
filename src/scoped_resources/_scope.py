"""Scope: the owner of live instances (leases), as a state machine.

A scope goes ``open -> closing -> closed``. It acquires instances in dependency
order, caches one per resource, and on closing hands its leases to the release
run (reverse order, shielded, bounded, each told the outcome).
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Coroutine
from types import CoroutineType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from ._acquire import _enter, _enter_bounded, _enter_observed, _no_yield, _refuse_coroutine
from ._guard import Hold, _task_of, _task_state_data, expired, native_hold
from ._lease import ACQUIRING, FAILED, HELD, Lease
from ._plan import Recipe
from ._release import _note, _release_all, _report
from ._resource import ASYNC_GEN, REQUEST, Level, Resource
from .exceptions import (
    ResourceBusy,
    ResourceMisuse,
    ScopeClosed,
)

if TYPE_CHECKING:
    from ._app_scope import AppScope

T = TypeVar("T")

# Scope states.
OPEN, CLOSING, CLOSED = range(3)
_SCOPE_STATES = ("open", "closing", "closed")


async def _held(value: T) -> T:
    """The instance a scope already holds, as an awaitable (what ``Scope.get`` hands back)."""
    return value


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
        "_native",
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
        #: The task running this scope's steps and its loop's wheel, as the last step
        #: found them (see ``_guard.native_hold``); None until a step looks.
        self._native: Hold | None = None
        if parent is None:  # the app scope, its own root
            self._root: AppScope = self  # type: ignore[assignment]
            return
        # A child: its app scope keeps it until it closes (for draining and leak reports).
        root = self._root = parent._root
        if root._state != OPEN:
            raise ScopeClosed(root.name, root.state)
        root._children.add(self)

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

    # -- getting ------------------------------------------------------------------

    def get(self, resource: Resource[T]) -> Coroutine[Any, Any, T]:
        """This scope's instance of *resource*, acquiring it on first use: ``await`` it.

        Not a coroutine function of its own: it hands back the coroutine that does
        the work (acquiring, or giving the instance held), one frame less per get.
        """
        if resource._override is not None:
            resource = resource._override
        lease = self._cache.get(resource)
        if lease is not None:
            if lease.state == HELD:
                return _held(lease.value)
        elif resource.level is self.level:
            # This scope's own kind of resource, not held yet: acquire it here (the
            # acquire checks the scope is open when it starts, as it may start later).
            return self._acquire(resource)
        return self._get_slow(resource, lease)

    def child(self, name: str = "scope", context: dict[type, Any] | None = None) -> Scope:
        """A nested scope whose request resources are its own and released with it."""
        if self._state != OPEN:
            raise ScopeClosed(self.name, self.state)
        return Scope(name, REQUEST, self, context)

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
            return await self._acquire(resource)
        if lease.state == HELD:
            return lease.value  # type: ignore[no-any-return]
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

    async def _acquire(self, resource: Resource[T]) -> T:
        cached = self._cache.get(resource)
        if cached is not None or self._state != OPEN:
            # get() handed this coroutine out before it ran: another get of the same
            # resource ran first (gather, tasks), or the scope closed in between.
            return await self._get_slow(resource, cached)
        lease = Lease(resource)
        self._cache[resource] = lease
        root = self._root
        try:
            recipe: Recipe | None = resource._compiled
            if recipe is None:
                raise ResourceMisuse(
                    resource.name,
                    "it was declared after the plan was compiled",
                    "declare every resource before the app starts",
                )
            kwargs = dict(recipe.values) if recipe.values else {}
            for pname, dep in recipe.deps:
                held = root._cache.get(dep) if dep._override is None else None
                kwargs[pname] = held.value if held is not None else await self.get(dep)
            for pname, typ in recipe.context:
                kwargs[pname] = self._context_value(resource, pname, typ)
            if root._watched:
                await self._acquire_watched(lease, kwargs)
                return self._held(lease, time.monotonic())  # type: ignore[no-any-return]
            # The common case, flat in this one frame (each frame saved here is saved
            # per resource per request): the deadline, if any, on the loop's wheel
            # with the lease as its record, held by the task the scope's last step
            # found (``_guard.holds``, inlined), and _enter inlined for a generator.
            timeout = recipe.timeout
            hold = None
            if timeout is not None:
                hold = self._native
                if hold is not None:
                    task, wheel, loop, tref = hold
                    if _task_of(loop) is not task or (
                        (state := _task_state_data.get(tref)) is not None  # type: ignore[union-attr]
                        and getattr(state, "cancel_scope", True) is not None
                    ):
                        hold = None
                if hold is None:
                    hold = self._native = native_hold()
                    if hold is None:  # under an anyio cancel scope
                        await _enter_bounded(lease, kwargs)
                        return self._held(lease, time.monotonic())  # type: ignore[no-any-return]
                    task, wheel, loop, _ = hold
                lease.task = task
                lease.acquired_at = now = loop.time()
                lease.at = at = now + timeout
                lease.fired = False
                wheel.entries[lease] = None
                if at < wheel._armed_at:
                    wheel._arm(at)
            try:
                if resource.kind is ASYNC_GEN:
                    gen = resource.call(**kwargs)
                    try:
                        value = await anext(gen)
                    except StopAsyncIteration:
                        raise _no_yield(resource) from None
                    lease.exit = gen
                    if isinstance(value, CoroutineType):
                        await _refuse_coroutine(lease, value)
                    lease.value = value
                else:
                    await _enter(lease, kwargs)
            except asyncio.CancelledError:
                if hold is not None and expired(lease):
                    raise ResourceBusy(resource.name, recipe.timeout or 0.0) from None
                raise
            finally:
                if hold is not None:
                    wheel.entries.pop(lease, None)
                    del lease.task  # a lease kept after its scope closed keeps no task
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
        # _held, inlined (a call per lease); on the wheel, acquired_at is already the
        # loop time read for the deadline, when the acquire began.
        lease.state = HELD
        if hold is None:
            lease.acquired_at = time.monotonic()
        self._leases.append(lease)
        if lease.waiters is not None:
            lease.waiters.set()
        return lease.value  # type: ignore[no-any-return]

    async def _acquire_watched(self, lease: Lease, kwargs: dict[str, Any]) -> None:
        """Acquire with an observer told (metrics) or the call site kept (debug mode)."""
        root = self._root
        if root._observer is not None:
            await _enter_observed(lease, kwargs, root._observer)
        else:
            await _enter_bounded(lease, kwargs)
        if root._debug:
            lease.site = traceback.extract_stack(limit=12)[:-2]

    def _held(self, lease: Lease, acquired_at: float) -> Any:
        """Record *lease* as held; its value."""
        lease.state = HELD
        lease.acquired_at = acquired_at
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

    # -- closing ------------------------------------------------------------------

    async def __aenter__(self) -> Scope:
        return self

    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Coroutine[Any, Any, bool]:
        # Not a coroutine of its own: ``async with`` awaits aclose's directly.
        return self.aclose(exc)

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
            if not self._leases:
                return False
            observer = self._root._observer
            suppressed, errors, interrupt = await _release_all(
                self._leases, exc, observer, self._native
            )
        finally:
            self._state = CLOSED
            self._native = None  # a closed scope a caller keeps keeps no task
            self._cache.clear()
            # The context (a request) usually refers back to this scope: dropping it
            # breaks that cycle, so a closed request leaves nothing to the cyclic GC.
            self._context = None
            # Its app scope keeps it no more; the last one out ends a shutdown's drain.
            root = self._root
            children = root._children
            children.discard(self)
            if not children and root._drained is not None:
                root._drained.set()
        if not errors and interrupt is None:
            return suppressed
        return _report(self.name, exc, suppressed, errors, interrupt)
