"""Resource: one declaration, immutable after it is made."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Any, Generic, Literal, TypeVar

T_co = TypeVar("T_co", covariant=True)

ReleaseWhen = Literal["before_response", "after_response"]


class Level(IntEnum):
    """How long an instance lives; a scope of level N holds resources of level N."""

    APP = 0
    #: Request resources held until the response is sent and background tasks ran.
    RESPONSE = 1
    #: Request resources released before the response is sent (the default).
    REQUEST = 2

    @property
    def label(self) -> str:
        return "app" if self is Level.APP else "request"


class Kind(IntEnum):
    """How a factory is turned into an instance and released."""

    ASYNC_GEN = 0  # async generator function: one yield; also @asynccontextmanager
    CONTEXT = 1  # callable returning an async context manager (a class, say)
    INSTANCE = 2  # an object with __aenter__/__aexit__, entered per scope
    ASYNC_FN = 3  # async function; the result is entered if it is a context manager
    SYNC_FN = 4  # sync function; likewise


# The members the per-request path compares with, as module globals: on Python
# 3.11 ``Kind.ASYNC_GEN`` goes through ``EnumType.__getattr__`` (about 60 ns, ten
# times a global's cost), several times per resource per request.
ASYNC_GEN = Kind.ASYNC_GEN
CONTEXT = Kind.CONTEXT
INSTANCE = Kind.INSTANCE
ASYNC_FN = Kind.ASYNC_FN
APP = Level.APP
RESPONSE = Level.RESPONSE
REQUEST = Level.REQUEST


#: Types whose instances must never be shared by concurrent requests. Named, not
#: imported, so that no driver is imported to check them.
UNSHAREABLE_TYPES = frozenset(
    {
        "asyncpg.connection.Connection",
        "asyncpg.pool.PoolConnectionProxy",
        "asyncpg.transaction.Transaction",
        "sqlalchemy.ext.asyncio.session.AsyncSession",
        "sqlalchemy.ext.asyncio.engine.AsyncConnection",
        "sqlalchemy.ext.asyncio.engine.AsyncTransaction",
        "aiosqlite.core.Connection",
        "aiofiles.threadpool.binary.AsyncBufferedReader",
        "aiofiles.threadpool.binary.AsyncBufferedIOBase",
        "aiofiles.threadpool.text.AsyncTextIOWrapper",
        "anyio._core._fileio.AsyncFile",
        "redis.asyncio.client.Pipeline",
        "redis.asyncio.client.PubSub",
        "aio_pika.channel.Channel",
        "aio_pika.robust_channel.RobustChannel",
        "httpx.Response",
    }
)


class Resource(Generic[T_co]):
    """A declared resource: a name, a scope, a factory and its options.

    Made by :meth:`Resources.app` and :meth:`Resources.request`; ask for one in a
    route with ``Annotated[T, Use(resource)]`` or in a scope with
    ``await scope.get(resource)``.
    """

    __slots__ = (
        "_compiled",
        "_getter",
        "_override",
        "_own_deadline",
        "acquire_timeout",
        "async_only",
        "call",
        "factory",
        "kind",
        "level",
        "localns",
        "name",
        "ping",
        "registry",
        "release_timeout",
        "shareable",
        "suppress_errors",
        "terminate",
    )

    name: str
    level: Level
    factory: Any
    call: Any
    kind: Kind
    localns: dict[str, Any] | None
    acquire_timeout: float | None
    release_timeout: float | None
    terminate: Callable[[T_co], Awaitable[object] | object] | None
    ping: Callable[[T_co], Awaitable[object]] | None
    shareable: bool
    async_only: bool
    suppress_errors: bool
    registry: object
    _compiled: Any
    _getter: Any
    _override: Resource[T_co] | None
    _own_deadline: bool

    def __init__(
        self,
        factory: Any,
        *,
        name: str,
        level: Level,
        registry: object,
        acquire_timeout: float | None,
        release_timeout: float | None,
        terminate: Callable[[T_co], Awaitable[object] | object] | None,
        ping: Callable[[T_co], Awaitable[object]] | None,
        shareable: bool,
        async_only: bool | None,
        suppress_errors: bool,
    ) -> None:
        self.factory = factory
        self.kind = classify(factory, name)
        #: What is called to make an instance (the generator under @asynccontextmanager).
        self.call = unwrapped(factory) if self.kind is Kind.ASYNC_GEN else factory
        self.name = name
        self.level = level
        self.registry = registry
        self.acquire_timeout = acquire_timeout
        self.release_timeout = release_timeout
        self.terminate = terminate
        self.ping = ping
        self.shareable = shareable
        self.async_only = self.kind is not Kind.SYNC_FN if async_only is None else async_only
        self.suppress_errors = suppress_errors
        self._compiled = None
        self._getter = None
        self._override = None
        #: The factory enforces *acquire_timeout* itself (a pooled adapter's gate
        #: does, with one deadline for its wait and the pool's): the core arms none.
        self._own_deadline = False
        #: Names local to where it was declared, to resolve string annotations.
        self.localns = None

    @property
    def scope(self) -> str:
        """``"app"`` or ``"request"``."""
        return self.level.label

    def __repr__(self) -> str:
        return f"<Resource {self.name!r} scope={self.scope}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the factory as written, so decorated functions stay usable."""
        return self.factory(*args, **kwargs)


def classify(factory: Any, name: str) -> Kind:  # noqa: PLR0911 - one return per kind
    """Decide, once at declaration, how *factory* makes and releases an instance."""
    from .exceptions import ResourceMisuse

    if inspect.isasyncgenfunction(factory):
        return Kind.ASYNC_GEN
    wrapped = getattr(factory, "__wrapped__", None)
    if wrapped is not None and inspect.isasyncgenfunction(wrapped):
        # An @asynccontextmanager function: drive the generator directly.
        return Kind.ASYNC_GEN
    if inspect.isclass(factory):
        if hasattr(factory, "__aenter__") and hasattr(factory, "__aexit__"):
            return Kind.CONTEXT
        return Kind.SYNC_FN
    if hasattr(factory, "__aenter__") and hasattr(factory, "__aexit__"):
        return Kind.INSTANCE
    if inspect.isgeneratorfunction(factory):
        raise ResourceMisuse(
            name,
            "a sync generator function cannot release asynchronously",
            "write it as an async generator (async def ... yield)",
        )
    if inspect.iscoroutinefunction(factory):
        return Kind.ASYNC_FN
    call = getattr(factory, "__call__", None)  # noqa: B004 - callable objects
    if call is not None and inspect.iscoroutinefunction(call):
        return Kind.ASYNC_FN
    if not callable(factory):
        raise ResourceMisuse(
            name,
            f"{factory!r} is neither callable nor an async context manager",
            "declare a function, a class or an object with __aenter__/__aexit__",
        )
    return Kind.SYNC_FN


def unwrapped(factory: Any) -> Any:
    """The function whose signature describes *factory*'s parameters."""
    if inspect.isclass(factory):
        return factory
    wrapped = getattr(factory, "__wrapped__", None)
    if wrapped is not None and inspect.isasyncgenfunction(wrapped):
        return wrapped
    return factory
