"""Resources: the registry users declare their resources in."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from ._app_scope import AppScope
from ._observe import Observer, combine
from ._plan import Plan, compile_plan, recipe_for
from ._resource import Level, ReleaseWhen, Resource
from ._scope import Scope
from .exceptions import ResourceMisuse, ScopeClosed, ScopeViolation

if TYPE_CHECKING:
    from types import TracebackType

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class _AsyncContext(Protocol[T_co]):
    async def __aenter__(self) -> T_co: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None: ...


Terminate = Callable[[Any], Awaitable[object] | object]
Ping = Callable[[Any], Awaitable[object]]


class _Declare(Protocol):
    """The decorator ``@resources.app(...)`` and ``@resources.request(...)`` return."""

    @overload
    def __call__(self, factory: Callable[..., AsyncIterator[T]], /) -> Resource[T]: ...
    @overload
    def __call__(self, factory: Callable[..., _AsyncContext[T]], /) -> Resource[T]: ...
    @overload
    def __call__(self, factory: Callable[..., Awaitable[T]], /) -> Resource[T]: ...
    @overload
    def __call__(self, factory: _AsyncContext[T], /) -> Resource[T]: ...
    @overload
    def __call__(self, factory: Callable[..., T], /) -> Resource[T]: ...


class Resources:
    """A registry of resources for one application.

    Declare each resource once with :meth:`app` or :meth:`request`, pass
    :meth:`lifespan` to FastAPI, and ask for resources in routes with
    ``Annotated[T, Use(resource)]``.

    *acquire_timeout* and *release_timeout* are the defaults for every resource
    that does not set its own; *startup_timeout* is the default acquire deadline
    of app resources; *drain_timeout* bounds how long shutdown waits for open
    request scopes before closing app resources. *observers* receive every acquire
    and release (see :mod:`scoped_resources.metrics`); *debug* records where each
    lease was acquired, for leak reports; *leak_after* is when a held lease is
    reported. In FastAPI, *cancel_on_disconnect* cancels a route's work (and
    releases its resources) when its client goes away (watched from
    *watch_disconnect_after* seconds into the request), and *request_timeout*
    bounds each request that uses resources.
    """

    def __init__(
        self,
        name: str = "app",
        *,
        acquire_timeout: float | None = 10.0,
        release_timeout: float | None = 10.0,
        startup_timeout: float | None = 30.0,
        drain_timeout: float | None = 30.0,
        observers: Sequence[Observer] = (),
        debug: bool = False,
        cancel_on_disconnect: bool = True,
        watch_disconnect_after: float = 0.05,
        request_timeout: float | None = None,
        leak_after: float | None = 60.0,
    ) -> None:
        self.name = name
        #: Receives every acquire and release (metrics, traces); none costs nothing.
        self.observers = list(observers)
        #: Record where each lease was acquired, for leak reports.
        self.debug = debug
        #: Cancel a route's work when its client disconnects (see run_to_completion).
        self.cancel_on_disconnect = cancel_on_disconnect
        #: Watch for the disconnect only in requests still running after this many
        #: seconds, so fast requests pay one timer, not a task.
        self.watch_disconnect_after = watch_disconnect_after
        #: Bound every request that uses resources (HTTP 503 past it).
        self.request_timeout = request_timeout
        #: Report a lease held longer than this many seconds (None: never).
        self.leak_after = leak_after
        self.acquire_timeout = acquire_timeout
        self.release_timeout = release_timeout
        self.startup_timeout = startup_timeout
        self.drain_timeout = drain_timeout
        self._resources: dict[str, Resource[Any]] = {}
        self._values: dict[type, Any] = {}
        self._plan: Plan | None = None
        self._open: list[AppScope] = []
        #: The key of the app scope in the lifespan state (``request.state``).
        self.state_key = f"scoped_resources:{name}:{id(self):x}"

    def __repr__(self) -> str:
        return f"<Resources {self.name!r}: {len(self._resources)} resources>"

    @property
    def resources(self) -> tuple[Resource[Any], ...]:
        """Every declared resource, in declaration order."""
        return tuple(self._resources.values())

    # -- declaring ----------------------------------------------------------------

    @overload
    def app(
        self, factory: Callable[..., AsyncIterator[T]], /, *, name: str | None = None
    ) -> Resource[T]: ...
    @overload
    def app(
        self, factory: Callable[..., _AsyncContext[T]], /, *, name: str | None = None
    ) -> Resource[T]: ...
    @overload
    def app(
        self, factory: Callable[..., Awaitable[T]], /, *, name: str | None = None
    ) -> Resource[T]: ...
    @overload
    def app(self, factory: _AsyncContext[T], /, *, name: str | None = None) -> Resource[T]: ...
    @overload
    def app(self, factory: Callable[..., T], /, *, name: str | None = None) -> Resource[T]: ...
    @overload
    def app(
        self,
        *,
        name: str | None = None,
        timeout: float | None = ...,
        release_timeout: float | None = ...,
        terminate: Terminate | None = None,
        ping: Ping | None = None,
        async_only: bool | None = None,
    ) -> _Declare: ...
    def app(
        self,
        factory: Any = None,
        *,
        name: str | None = None,
        timeout: Any = ...,
        release_timeout: Any = ...,
        terminate: Terminate | None = None,
        ping: Ping | None = None,
        async_only: bool | None = None,
    ) -> Any:
        """Declare an app-scoped resource: opened once at start-up, closed at shutdown.

        *timeout* bounds its opening; *release_timeout* its closing, after which
        *terminate* runs. *ping* checks it for readiness.
        """

        def declare(f: Any) -> Resource[Any]:
            return self._add(
                f,
                name=name,
                level=Level.APP,
                acquire_timeout=self.startup_timeout if timeout is ... else timeout,
                release_timeout=release_timeout,
                terminate=terminate,
                ping=ping,
                shareable=True,
                async_only=async_only,
                suppress_errors=False,
            )

        return declare if factory is None else declare(factory)

    @overload
    def request(
        self, factory: Callable[..., AsyncIterator[T]], /, *, name: str | None = None
    ) -> Resource[T]: ...
    @overload
    def request(
        self, factory: Callable[..., _AsyncContext[T]], /, *, name: str | None = None
    ) -> Resource[T]: ...
    @overload
    def request(
        self, factory: Callable[..., Awaitable[T]], /, *, name: str | None = None
    ) -> Resource[T]: ...
    @overload
    def request(self, factory: _AsyncContext[T], /, *, name: str | None = None) -> Resource[T]: ...
    @overload
    def request(self, factory: Callable[..., T], /, *, name: str | None = None) -> Resource[T]: ...
    @overload
    def request(
        self,
        *,
        name: str | None = None,
        acquire_timeout: float | None = ...,
        release_timeout: float | None = ...,
        terminate: Terminate | None = None,
        release: ReleaseWhen = "before_response",
        async_only: bool | None = None,
        suppress_errors: bool = False,
    ) -> _Declare: ...
    def request(
        self,
        factory: Any = None,
        *,
        name: str | None = None,
        acquire_timeout: Any = ...,
        release_timeout: Any = ...,
        terminate: Terminate | None = None,
        release: ReleaseWhen = "before_response",
        async_only: bool | None = None,
        suppress_errors: bool = False,
    ) -> Any:
        """Declare a request-scoped resource: one instance per request (or scope).

        By default it is released before the response is sent, so a failed
        release (a COMMIT, say) turns into a 5xx answer. With
        ``release="after_response"`` it is held until the response body is sent
        and the request's background tasks have run.
        """
        if release not in ("before_response", "after_response"):
            raise ValueError(
                f"release must be 'before_response' or 'after_response', not {release!r}"
            )
        level = Level.REQUEST if release == "before_response" else Level.RESPONSE

        def declare(f: Any) -> Resource[Any]:
            return self._add(
                f,
                name=name,
                level=level,
                acquire_timeout=acquire_timeout,
                release_timeout=release_timeout,
                terminate=terminate,
                ping=None,
                shareable=True,
                async_only=async_only,
                suppress_errors=suppress_errors,
            )

        return declare if factory is None else declare(factory)

    def provide(self, value: object, *, as_type: type | None = None) -> None:
        """Make *value* the argument of every resource parameter of its type.

        For settings and other plain values: ``resources.provide(Settings())``
        lets ``async def pool(settings: Settings)`` receive it.
        """
        self._values[as_type or type(value)] = value
        self._plan = None

    def _add(
        self,
        factory: Any,
        *,
        name: str | None,
        level: Level,
        acquire_timeout: Any,
        release_timeout: Any,
        terminate: Terminate | None,
        ping: Ping | None,
        shareable: bool,
        async_only: bool | None,
        suppress_errors: bool,
    ) -> Resource[Any]:
        if isinstance(factory, Resource):
            raise ResourceMisuse(factory.name, "it is declared twice", "declare each resource once")
        label = name or getattr(factory, "__name__", None) or type(factory).__name__
        if label in self._resources:
            raise ResourceMisuse(
                label,
                "a resource with this name is already declared",
                "give one of them another name with name=...",
            )
        res: Resource[Any] = Resource(
            factory,
            name=label,
            level=level,
            registry=self,
            acquire_timeout=self.acquire_timeout if acquire_timeout is ... else acquire_timeout,
            release_timeout=self.release_timeout if release_timeout is ... else release_timeout,
            terminate=terminate,
            ping=ping,
            shareable=shareable,
            async_only=async_only,
            suppress_errors=suppress_errors,
        )
        res.localns = _caller_locals()
        self._resources[label] = res
        self._plan = None
        return res

    @contextmanager
    def override(
        self,
        resource: Resource[T],
        value: object = None,
        *,
        factory: Callable[..., Any] | None = None,
    ) -> Iterator[Resource[Any]]:
        """Replace *resource* with *value* (or *factory*, or another resource) in this block.

        Every scope asks for the replacement instead, also an app scope that is
        already open; the original comes back when the block ends, even when it
        fails. A *factory* is declared like a resource (a generator is released).
        """
        if resource.registry is not self:
            raise ResourceMisuse(
                resource.name,
                "it belongs to another Resources registry",
                "override it on the registry that declared it",
            )
        if isinstance(value, Resource):
            if value.level > resource.level:
                raise ScopeViolation(
                    resource.name, resource.scope, value.name, "request (shorter-lived)"
                )
            replacement: Resource[Any] = value
        else:
            made = factory if factory is not None else _constant(value)
            replacement = Resource(
                made,
                name=f"{resource.name} (override)",
                level=resource.level,
                registry=self,
                acquire_timeout=resource.acquire_timeout,
                release_timeout=resource.release_timeout,
                terminate=None,
                ping=None,
                shareable=True,
                async_only=resource.async_only,
                suppress_errors=False,
            )
            ctx = self._plan.context_types if self._plan is not None else frozenset()
            replacement._compiled = recipe_for(replacement, self._values, self, ctx)
        previous = resource._override
        resource._override = replacement
        try:
            yield replacement
        finally:
            resource._override = previous

    # -- planning and opening ----------------------------------------------------------

    def plan(self, context_types: Iterable[type] = ()) -> Plan:
        """Compile (once) and return the plan; raises a PlanError if unsound."""
        ctx = frozenset(context_types) | {AppScope}
        if self._plan is None or not ctx <= self._plan.context_types:
            self._plan = compile_plan(self._resources.values(), self._values, self, ctx)
        return self._plan

    @asynccontextmanager
    async def open(self, context_types: Iterable[type] = ()) -> AsyncIterator[AppScope]:
        """Open the app resources (concurrently, in dependency order) and yield the app scope.

        Used by the lifespan; use it directly for a CLI command or a worker.
        """
        plan = self.plan(context_types)
        app_scope = AppScope(
            self.name,
            plan,
            self.drain_timeout,
            observer=combine(self.observers),
            debug=self.debug,
            leak_after=self.leak_after,
        )
        async with app_scope:
            self._open.append(app_scope)
            try:
                yield app_scope
            finally:
                self._open.remove(app_scope)

    def scope(self, name: str = "scope") -> AbstractAsyncContextManager[Scope]:
        """A scope for work outside HTTP (a job, a command, a test), released on exit.

        Needs the app scope open: inside the app's lifespan, or inside
        ``async with resources.open()``.
        """
        if len(self._open) != 1:
            state = "not open" if not self._open else f"open {len(self._open)} times"
            raise ScopeClosed(
                f"{self.name} (app)",
                f"{state}; run inside the app's lifespan or 'async with resources.open()'",
            )
        return self._open[0].child(name)

    def lifespan(self, app: Any) -> AbstractAsyncContextManager[dict[str, Any]]:
        """The app's lifespan: ``FastAPI(lifespan=resources.lifespan)``.

        The framework integration that serves *app* provides it (importing
        ``scoped_resources.fastapi``, or ``Use``, loads the FastAPI one).
        """
        return _lifespan_for(app)(self, app, None)

    def wrap_lifespan(
        self, user_lifespan: Callable[[Any], AbstractAsyncContextManager[Any]]
    ) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
        """A lifespan that opens the resources, then runs *user_lifespan* inside it."""

        def wrapped(app: Any) -> AbstractAsyncContextManager[dict[str, Any]]:
            return _lifespan_for(app)(self, app, user_lifespan)

        return wrapped


#: A framework integration's lifespan: (registry, app, the user's lifespan or None).
Lifespan = Callable[
    [Resources, Any, Callable[[Any], AbstractAsyncContextManager[Any]] | None],
    AbstractAsyncContextManager[dict[str, Any]],
]

#: The lifespans of the framework integrations loaded, each with the apps it serves.
_LIFESPANS: list[tuple[Callable[[Any], bool], Lifespan]] = []


def register_lifespan(serves: Callable[[Any], bool], lifespan: Lifespan) -> None:
    """Let ``Resources.lifespan`` open resources for the apps *serves* accepts.

    A framework integration calls this once, when it is imported; the core knows
    no framework.
    """
    _LIFESPANS.insert(0, (serves, lifespan))


def _lifespan_for(app: Any) -> Lifespan:
    for serves, lifespan in _LIFESPANS:
        if serves(app):
            return lifespan
    raise TypeError(
        f"no framework integration serves {type(app).__qualname__} apps; import its "
        "integration first (for FastAPI or Starlette: 'import scoped_resources.fastapi')"
    )


def _caller_locals() -> dict[str, Any] | None:
    """The local names of the function that declared a resource (not module level)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None or frame.f_locals is frame.f_globals:
        return None
    return dict(frame.f_locals)


def _constant(value: object) -> Callable[[], object]:
    def constant() -> object:
        return value

    return constant
