"""The FastAPI integration: ``Use(resource)`` in routes, and the lifespan.

How a request is served (chosen for cost and for commit-before-respond):

* One plain dependency per request, shared by every ``Use`` of the route, opens
  two scopes and pushes their closing onto FastAPI's own exit stacks: the
  request scope onto the *function* stack (closed right after the endpoint
  returns, before the response is sent) and the response scope onto the
  *request* stack (closed after the body is sent and background tasks ran).
  Pushing an exit costs far less than a ``yield`` dependency, and the exit still
  sees the endpoint's exception (the outcome).
* A release that fails while the endpoint succeeded becomes HTTP 500; an
  acquire past its deadline becomes HTTP 503 with ``Retry-After``.
* Plans are compiled and routes are checked once, in the lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from http import HTTPStatus
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from fastapi import APIRouter, BackgroundTasks, HTTPException, Request, params
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.applications import Starlette
from starlette.routing import Mount

from ._app_scope import AppScope
from ._failures import cause_of, current_route, log_failure, outage_of
from ._registry import register_lifespan
from ._resource import REQUEST, RESPONSE, Level, Resource
from ._scope import Scope
from .exceptions import ReleaseFailed, ResourceBusy, ResourceMisuse, ScopeClosed

if TYPE_CHECKING:
    from fastapi.dependencies.models import Dependant

    from ._registry import Resources

__all__ = [
    "Use",
    "health_routes",
    "lifespan",
    "outage_of",
    "problem_response",
    "run_to_completion",
]

_F = TypeVar("_F", bound=Callable[..., Any])

logger = logging.getLogger("scoped_resources")

_FUNCTION_STACK = "fastapi_function_astack"
_REQUEST_STACK = "fastapi_inner_astack"


class _Use(params.Depends):
    """A FastAPI dependency that also names the resource it stands for."""

    resource: Resource[Any]


def Use(resource: Resource[Any]) -> Any:  # noqa: N802 - reads like Depends
    """Ask for *resource* in a route or another resource.

    ``conn: Annotated[asyncpg.Connection, Use(db)]``. In a route it is a FastAPI
    dependency; in a resource's parameters it declares the dependency edge.
    """
    if not isinstance(resource, Resource):
        raise TypeError(
            f"Use() takes a declared resource, not {resource!r}; declare it with "
            "@resources.app or @resources.request first"
        )
    getter = resource._getter
    if getter is None:
        getter = resource._getter = _make_getter(resource)
    marker = _Use(dependency=getter, use_cache=True)
    object.__setattr__(marker, "resource", resource)
    return marker


def _make_getter(resource: Resource[Any]) -> Callable[..., Any]:
    registry: Resources = resource.registry  # type: ignore[assignment]
    key = registry.state_key
    name = resource.name

    if resource.level is Level.APP:
        held_key = _held_key(registry)
        busy_key = f"{registry.state_key}:busy"

        async def get_app_resource(request: Request) -> Any:
            # App resources lend per command (a Redis or HTTP pool): their
            # ResourceBusy surfaces in the endpoint, and becomes 503 here. Once per
            # request, and not at all when the request scope's exit (which does
            # the same) is already there.
            scope = request.scope
            if held_key not in scope and busy_key not in scope:
                scope[busy_key] = True
                scope[_FUNCTION_STACK].push_async_exit(_busy_to_503)
            if resource._override is not None:
                return await _app_scope(request, key, registry).get(resource._override)
            lease = _app_scope(request, key, registry)._cache.get(resource)
            if lease is None:
                raise ScopeClosed(f"{registry.name} (app)", "not holding it", name)
            return lease.value

        getter: Callable[..., Any] = get_app_resource
    else:
        held_key = _held_key(registry)

        # One FastAPI dependency per resource, as a hand-written ``yield`` dependency
        # is: the first one a request solves opens its scope (FastAPI solves a
        # route's dependencies one after another), the others find it.
        async def get_request_resource(request: Request, background_tasks: BackgroundTasks) -> Any:
            scope = request.scope.get(held_key)
            if scope is None:
                scope = _open_request_scope(request, background_tasks, registry, held_key)
            try:
                return await scope.get(resource)
            except ResourceBusy as busy:
                raise _busy_http(busy) from busy
            except Exception as err:
                if outage_of(err) is None:
                    raise
                log_failure(logger, "acquiring", name, err)
                raise _outage_http(name) from err

        getter = get_request_resource
    getter.__qualname__ = getter.__name__ = f"use_{name}"
    getter.__scoped_resource__ = resource  # type: ignore[attr-defined]
    return getter


def _app_scope(request: Request, key: str, registry: Resources) -> AppScope:
    state = request.scope.get("state")
    app_scope = state.get(key) if state else None
    if app_scope is None:
        raise ScopeClosed(
            f"{registry.name} (app)",
            "not open: pass lifespan=resources.lifespan (or resources.wrap_lifespan(...)) "
            "to FastAPI",
        )
    return app_scope  # type: ignore[no-any-return]


def _held_key(registry: Resources) -> str:
    """Where a request's scope for *registry* is kept in the ASGI scope."""
    return f"{registry.state_key}:request"


def _open_request_scope(
    request: Request, background_tasks: BackgroundTasks, registry: Resources, held_key: str
) -> Scope:
    """Open the request's scopes and push their closing onto FastAPI's exit stacks."""
    app_scope = _app_scope(request, registry.state_key, registry)
    scope = request.scope
    route = scope.get("route")
    # The route template when routing found one (the raw path otherwise); never
    # ``request.url``, which would build a URL object per request.
    path = getattr(route, "path", None) or scope["path"]
    current_route.set(f"{scope['method']} {path}")
    try:
        function_stack: AsyncExitStack = request.scope[_FUNCTION_STACK]
        request_stack: AsyncExitStack = request.scope[_REQUEST_STACK]
    except KeyError:
        raise RuntimeError(
            "scoped_resources: this FastAPI version exposes no dependency exit "
            "stacks in the request scope; FastAPI >= 0.121 is required"
        ) from None
    if app_scope._plan.has_response_level:
        # Resources held until the response is sent live in an outer scope,
        # closed by FastAPI's request stack after the body and background tasks.
        outer = Scope("request", RESPONSE, app_scope, {Request: request})
        request_stack.push_async_exit(outer.__aexit__)
        inner = Scope("request", REQUEST, outer, None)
    else:
        inner = Scope("request", REQUEST, app_scope, {Request: request})
    function_stack.push_async_exit(
        _RequestExit(inner, background_tasks, _Watch.start(request, registry, app_scope))
    )
    request.scope[held_key] = inner
    return inner


def run_to_completion(endpoint: _F) -> _F:
    """Mark a route whose work must finish even when its client disconnects.

    By default a route that uses request resources is cancelled when its client
    goes away (its resources are released at once, rolling back); a route marked
    with this decorator runs to its end instead.
    """
    endpoint.__scoped_resources_run_to_completion__ = True  # type: ignore[attr-defined]
    return endpoint


_NO_BODY = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class _Watch:
    """Cancels the request's task when its client disconnects or its deadline passes.

    No timer or task per request: the request registers with its app's
    :class:`_Sweeper`, which ticks a few times per watch period. A request still
    running after ``watch_disconnect_after`` seconds is watched: under uvicorn by
    reading uvicorn's disconnect flag on each tick, elsewhere by a watcher task
    reading its ``receive`` (only once the body has been read, or there is none,
    so it never takes body messages from the endpoint). One past
    ``request_timeout`` is cancelled. asyncio only.
    """

    __slots__ = (
        "active",
        "cycle",
        "deadline_at",
        "fired",
        "request",
        "task",
        "timeout",
        "watch_at",
        "watcher",
    )

    def __init__(
        self,
        task: asyncio.Task[Any],
        request: Request,
        watch_at: float | None,
        timeout: float | None,
        now: float,
    ) -> None:
        self.task = task
        self.request = request
        self.timeout = timeout
        self.watch_at = watch_at
        self.deadline_at = now + timeout if timeout is not None else None
        self.active = True
        #: Why the task was cancelled: "disconnect", "deadline", or None.
        self.fired: str | None = None
        self.watcher: asyncio.Task[None] | None = None
        #: The server's own record of the exchange, when it tells of a disconnect.
        self.cycle: Any = None

    @classmethod
    def start(cls, request: Request, registry: Resources, app_scope: AppScope) -> _Watch | None:
        sweeper: _Sweeper | None = getattr(app_scope, "_sweeper", None)
        if sweeper is None:
            return None
        watch_disconnect = registry.cancel_on_disconnect and not getattr(
            request.scope.get("endpoint"), "__scoped_resources_run_to_completion__", False
        )
        timeout = registry.request_timeout
        if not watch_disconnect and timeout is None:
            return None
        task = asyncio.current_task()
        if task is None:
            return None
        now = sweeper.loop.time()
        watch_at = now + registry.watch_disconnect_after if watch_disconnect else None
        watch = cls(task, request, watch_at, timeout, now)
        sweeper.watches.add(watch)
        return watch

    def tick(self, now: float) -> None:
        if self.deadline_at is not None and now >= self.deadline_at:
            self._fire("deadline")
        elif self.cycle is not None:
            self._poll()
        elif self.watch_at is not None and now >= self.watch_at:
            self.watch_at = None
            # uvicorn marks its exchange when the client goes: read that mark on
            # each tick (no task). Any other server: a task waits on receive().
            self.cycle = _disconnect_flag(self.request)
            if self.cycle is not None:
                self._poll()
            elif _body_done(self.request):
                self._start_watcher()

    def _poll(self) -> None:
        cycle = self.cycle
        if cycle.disconnected:
            self._fire("disconnect")
        elif cycle.flow.read_paused and _body_done(self.request):
            # uvicorn stopped reading (a pipelined request waits behind this one), so
            # it would not see the client go: only receive() resumes reading.
            self.cycle = None
            self._start_watcher()

    def _start_watcher(self) -> None:
        self.watcher = self.task.get_loop().create_task(self._wait_for_disconnect())

    async def _wait_for_disconnect(self) -> None:
        receive = self.request.receive
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._fire("disconnect")
                return

    def _fire(self, why: str) -> None:
        if self.active and self.fired is None:
            self.fired = why
            self.task.cancel()

    def stop(self, sweeper: _Sweeper | None) -> None:
        self.active = False
        if sweeper is not None:
            sweeper.watches.discard(self)
        if self.watcher is not None:
            self.watcher.cancel()


class _Sweeper:
    """Ticks for every in-flight request of one app: starts watchers, fires deadlines."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        self.loop = loop
        self.tick = tick
        self.watches: set[_Watch] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            if self.watches:
                now = self.loop.time()
                for watch in tuple(self.watches):
                    try:
                        watch.tick(now)
                    except Exception:  # one request's trouble must not stop the sweeper
                        logger.exception("scoped_resources: watching a request failed")
                        self.watches.discard(watch)


def _disconnect_flag(request: Request) -> Any:
    """uvicorn's exchange behind *request*'s ``receive``, when it has a ``disconnected`` flag.

    uvicorn (httptools and h11 alike) sets ``disconnected`` on the exchange
    (``RequestResponseCycle``) as soon as the connection is lost, so polling it is
    as good as waiting on ``receive()``, without a task per request, while uvicorn
    reads the connection (``flow.read_paused`` false). A ``receive`` wrapped by
    middleware, or another server, gives None: then a task waits.
    """
    cycle = getattr(request.receive, "__self__", None)
    if cycle is None or not type(cycle).__module__.startswith("uvicorn."):
        return None
    flow = getattr(cycle, "flow", None)
    if isinstance(getattr(cycle, "disconnected", None), bool) and isinstance(
        getattr(flow, "read_paused", None), bool
    ):
        return cycle
    return None


def _body_done(request: Request) -> bool:
    """True when the request body was read (by FastAPI) or there is none."""
    if getattr(request, "_stream_consumed", False) or hasattr(request, "_body"):
        return True
    headers = request.headers
    if (
        request.method in _NO_BODY
        and "content-length" not in headers
        and "transfer-encoding" not in headers
    ):
        # Record the empty body as Starlette would, so a later request.body() works.
        request._body = b""
        request._stream_consumed = True
        return True
    return False


class _RequestExit:
    """Closes a request scope before the response, turning failures into HTTP errors."""

    __slots__ = ("background", "scope", "watch")

    def __init__(self, scope: Scope, background: BackgroundTasks, watch: _Watch | None) -> None:
        self.scope = scope
        self.background = background
        self.watch = watch

    async def __call__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        watch = self.watch
        fired = None
        if watch is not None:
            # From here on nothing cancels the task: releases run in peace.
            watch.stop(self.scope._root._sweeper)
            fired = watch.fired
            if fired is not None and isinstance(exc, asyncio.CancelledError):
                watch.task.uncancel()
        outcome = exc
        if isinstance(exc, HTTPException) and exc.status_code < 400:
            outcome = None
        if outcome is None and self.background.tasks and self.scope._leases:
            outcome = _background_misuse(self.scope, self.background)
        try:
            await self.scope.aclose(outcome)
        except ReleaseFailed as failed:
            raise _release_failed_http(failed) from failed
        if fired is not None and isinstance(exc, asyncio.CancelledError):
            raise _cancelled_http(fired, watch.timeout if watch else None) from None
        if outcome is not None and outcome is not exc:
            raise outcome
        if isinstance(exc, ResourceBusy):
            raise _busy_http(exc) from exc
        _raise_if_outage(exc)
        return False


def _raise_if_outage(exc: BaseException | None) -> None:
    """An outage that reached the endpoint (a query on a lost connection) becomes 503."""
    if exc is None or isinstance(exc, HTTPException):
        return
    kind = outage_of(exc)
    if kind is not None:
        log_failure(logger, "using", kind, exc)
        raise _outage_http(kind) from exc


def _outage_http(what: str) -> HTTPException:
    return HTTPException(
        status_code=503,
        detail=f"{what!r} is unavailable; retry later",
        headers={"Retry-After": "1"},
    )


def _cancelled_http(why: str, timeout: float | None) -> HTTPException:
    if why == "disconnect":
        # Nobody is listening any more; 499 (client closed request) is for the logs.
        return HTTPException(status_code=499, detail="the client disconnected")
    return HTTPException(
        status_code=503,
        detail=f"the request did not finish within its {timeout or 0:g} s deadline",
        headers={"Retry-After": "1"},
    )


def _release_failed_http(failed: ReleaseFailed) -> HTTPException:
    """500, or 503 with Retry-After when every failure is a lost connection or a timeout.

    Either way the client gets no 2xx. A COMMIT refused by a constraint is a 500;
    a connection that dropped (or a release that overran its deadline) while the
    work was being completed is the service being unavailable: retry later.
    """
    if all(_transient(err) for err in failed.exceptions):
        return HTTPException(
            status_code=503,
            detail=f"a resource became unavailable while the request's work was "
            f"being completed; retry later ({failed})",
            headers={"Retry-After": "1"},
        )
    causes = "; ".join(cause_of(err) for err in failed.exceptions)
    return HTTPException(
        status_code=500,
        detail=f"the request's work could not be completed: {failed} ({causes})",
    )


def _transient(err: BaseException) -> bool:
    """A lost connection or a timeout, itself or as the cause of a driver's error."""
    return outage_of(err) is not None


def _busy_http(busy: ResourceBusy) -> HTTPException:
    return HTTPException(
        status_code=503,
        detail=str(busy),
        headers={"Retry-After": f"{max(1, round(busy.retry_after))}"},
    )


async def _busy_to_503(
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> bool:
    if isinstance(exc, ResourceBusy):
        raise _busy_http(exc) from exc
    _raise_if_outage(exc)
    return False


def _background_misuse(scope: Scope, background: BackgroundTasks) -> BaseException | None:
    released = {id(lease.value): lease.resource.name for lease in scope._leases}
    for task in background.tasks:
        for arg in (*task.args, *task.kwargs.values()):
            name = released.get(id(arg))
            if name is not None:
                return ResourceMisuse(
                    name,
                    "it is passed to a background task but released before the "
                    "response, so the task would use a released resource",
                    "declare it with @resources.request(release='after_response')",
                )
    return None


# -- lifespan --------------------------------------------------------------------------


def lifespan(
    registry: Resources,
    app: Any,
    user_lifespan: Callable[[Any], AbstractAsyncContextManager[Any]] | None = None,
) -> AbstractAsyncContextManager[dict[str, Any]]:
    """Open *registry*'s app resources for *app*, optionally around *user_lifespan*."""

    @asynccontextmanager
    async def run() -> AsyncIterator[dict[str, Any]]:
        registry.plan(context_types=(Request,))
        check_routes(app, registry)
        async with (
            registry.open(context_types=(Request,)) as app_scope,
            _sweeping(app_scope, registry),
        ):
            state: dict[str, Any] = {registry.state_key: app_scope}
            if user_lifespan is None:
                yield state
                return
            async with user_lifespan(app) as user_state:
                if user_state:
                    state.update(user_state)
                yield state

    return run()


@asynccontextmanager
async def _sweeping(app_scope: AppScope, registry: Resources) -> AsyncIterator[None]:
    """Run the app's request sweeper (asyncio only) while the app is up."""
    needed = registry.cancel_on_disconnect or registry.request_timeout is not None
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio: requests are not cancelled natively there
        needed = False
    if not needed:
        yield
        return
    periods = [registry.watch_disconnect_after]
    if registry.request_timeout is not None:
        periods.append(registry.request_timeout)
    sweeper = _Sweeper(loop, max(min(periods) / 2, 0.005))
    app_scope._sweeper = sweeper
    task = loop.create_task(sweeper.run(), name=f"scoped_resources: {registry.name} sweeper")
    try:
        yield
    finally:
        task.cancel()
        app_scope._sweeper = None
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _serves(app: Any) -> bool:
    """Whether *app* is a Starlette app (FastAPI is one)."""
    return isinstance(app, Starlette)


register_lifespan(_serves, lifespan)


def check_routes(app: Any, registry: Resources) -> None:
    """Raise a PlanError for a route that cannot use what it asks for."""
    for route in _routes(getattr(app, "router", app)):
        _check_dependant(route.dependant, route, registry)


def _routes(router: Any) -> list[Any]:
    found: list[Any] = []
    for route in getattr(router, "routes", ()):
        if isinstance(route, APIRoute | APIWebSocketRoute):
            found.append(route)
        elif isinstance(route, Mount):
            found.extend(_routes(route.app))
        elif hasattr(route, "original_router"):  # FastAPI >= 0.165 keeps included routers whole
            found.extend(_routes(route.original_router))
    return found


def _check_dependant(dependant: Dependant, route: Any, registry: Resources) -> None:
    call = dependant.call
    is_sync = call is not None and not (
        inspect.iscoroutinefunction(call)
        or inspect.isasyncgenfunction(call)
        or inspect.iscoroutinefunction(getattr(call, "__call__", None))  # noqa: B004
    )
    for sub in dependant.dependencies:
        resource = getattr(sub.call, "__scoped_resource__", None)
        if isinstance(resource, Resource):
            where = f"route {getattr(route, 'path', '?')!r}"
            if resource.registry is not registry:
                continue  # another registry's lifespan checks it
            if is_sync and resource.async_only:
                name = getattr(call, "__name__", repr(call))
                raise ResourceMisuse(
                    resource.name,
                    f"the sync function {name!r} ({where}) asks for it, but it can only "
                    "be used with await, and sync functions run in a thread pool",
                    f"make {name!r} 'async def'",
                )
        _check_dependant(sub, route, registry)


def problem_response(
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """An ``application/problem+json`` response (RFC 9457) with *detail* and *extra* members."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return JSONResponse(
        {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra},
        status_code=status,
        headers=headers,
        media_type="application/problem+json",
    )


class _Readiness:
    """Pings every app resource at most once per *cache_ttl*, however many probes come."""

    def __init__(self, ping_timeout: float, cache_ttl: float) -> None:
        self.ping_timeout = ping_timeout
        self.cache_ttl = cache_ttl
        self.checked_at = -math.inf
        self.checks: dict[str, str] = {}
        self.lock = anyio.Lock()

    async def check(self, app_scope: AppScope) -> dict[str, str]:
        """Each pinged resource's state: "ok" or what its ping raised."""
        async with self.lock:  # one ping round at a time; the others reuse it
            if anyio.current_time() - self.checked_at >= self.cache_ttl:
                results = await app_scope.ping(self.ping_timeout)
                self.checks = {
                    name: "ok" if err is None else _describe(err)
                    for name, err in sorted(results.items())
                }
                self.checked_at = anyio.current_time()
            return self.checks


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError) and not str(err):
        return "TimeoutError: no answer in time"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def health_routes(
    resources: Resources,
    *,
    ping_timeout: float = 2.0,
    cache_ttl: float = 1.0,
    liveness_path: str = "/healthz",
    readiness_path: str = "/readyz",
) -> APIRouter:
    """Liveness and readiness endpoints: ``app.include_router(health_routes(resources))``.

    Liveness answers 200 without I/O. Readiness pings every app resource that has
    a ping hook, concurrently, each within *ping_timeout*, and caches the answer
    for *cache_ttl* seconds so a burst of probes cannot overload a database; it
    answers 503 naming the failing resources, and 503 while the app is starting
    or draining. Both answers list each pinged resource under ``checks``.
    """
    router = APIRouter(tags=["health"])
    readiness = _Readiness(ping_timeout, cache_ttl)
    key = resources.state_key

    @router.get(liveness_path, summary="Liveness: the process answers")
    async def liveness() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        readiness_path,
        summary="Readiness: every resource answers its ping",
        responses={503: {"description": "starting, draining, or a resource is failing"}},
    )
    async def readiness_probe(request: Request) -> Any:
        state = request.scope.get("state")
        app_scope = state.get(key) if state else None
        if app_scope is None:
            return problem_response(503, "starting: the app resources are not open yet")
        if app_scope.draining:
            return problem_response(503, "draining: the app is shutting down")
        checks = await readiness.check(app_scope)
        failing = [name for name, state in checks.items() if state != "ok"]
        if failing:
            return problem_response(503, f"not ready: {', '.join(failing)}", checks=checks)
        return {"status": "ready", "checks": checks}

    return router
