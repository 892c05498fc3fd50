"""Run an ASGI app's lifespan for a test, and host async context managers in a task."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .._app_scope import AppScope
from .._registry import Resources
from .._resource import Resource

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")

__all__ = ["AppLifespan", "hosted"]


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@asynccontextmanager
async def hosted(cm: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    """Enter and exit *cm* in one task of its own.

    pytest-asyncio sets a fixture up and tears it down in different tasks; a
    task group or cancel scope inside *cm* must be left by the task that entered
    it. On asyncio a host task does both; elsewhere (trio under anyio) the
    fixture's own task does.
    """
    if not _on_asyncio():
        async with cm as value:
            yield value
        return
    loop = asyncio.get_running_loop()
    entered: asyncio.Future[T] = loop.create_future()
    stop = asyncio.Event()

    async def host() -> None:
        try:
            async with cm as value:
                entered.set_result(value)
                await stop.wait()
        except BaseException as exc:
            if entered.done():
                raise
            entered.set_exception(exc)

    task = loop.create_task(host())
    try:
        value = await entered
    except BaseException:
        # Failed (the host task is done), or cancelled while *cm* is entered: stop
        # that, or the host would finish entering it and wait for ever.
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    try:
        yield value
    finally:
        stop.set()
        await task


# -- the app under test ------------------------------------------------------------------


class AppLifespan:
    """Run an ASGI app's lifespan: ``async with AppLifespan(app) as running``.

    Startup failures are raised with the app's own exception; the lifespan
    ``state`` is given to every request made through :meth:`client` (or
    :attr:`asgi`). Request or job scopes still open when the block ends are
    released before shutdown, so a leak cannot stall the drain.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._startup = anyio.Event()
        self._shutdown_requested = anyio.Event()
        self._shutdown = anyio.Event()
        self._failure: str | None = None
        self._error: BaseException | None = None
        self._started_message = False
        self._tg: Any = None

    @property
    def app_scopes(self) -> tuple[AppScope, ...]:
        """The app scopes the lifespan put in its state (one per registry)."""
        return tuple(v for v in self.state.values() if isinstance(v, AppScope))

    @property
    def registries(self) -> tuple[Resources, ...]:
        """The registries whose resources the app's routes use."""
        return registries_of(self.app)

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The app, with the lifespan state given to each request (a shallow copy)."""
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "state": dict(self.state)}
        await self.app(scope, receive, send)

    def client(self, **options: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` bound to the running app; close it with ``async with``."""
        import httpx

        raise_exc = options.pop("raise_app_exceptions", True)
        options.setdefault("base_url", "http://testserver")
        transport = httpx.ASGITransport(
            app=self.asgi,  # type: ignore[arg-type]  # a plain ASGI callable
            raise_app_exceptions=raise_exc,
        )
        return httpx.AsyncClient(transport=transport, **options)

    async def __aenter__(self) -> AppLifespan:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._run)
        try:
            await self._startup.wait()
        except BaseException:
            # Cancelled while the app starts: end its start-up (what it had opened is
            # released), and leave the task group before the cancellation goes on.
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            raise
        if self._failure is not None or self._error is not None:
            await self._tg.__aexit__(None, None, None)
            self._raise("startup")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            for app_scope in self.app_scopes:
                for leaked in app_scope.open_scopes:
                    await leaked.aclose()
        self._shutdown_requested.set()
        await self._tg.__aexit__(None, None, None)
        if self._failure is not None or self._error is not None:
            self._raise("shutdown")

    def _raise(self, phase: str) -> None:
        if self._error is not None:
            raise self._error
        raise RuntimeError(f"the app's lifespan {phase} failed: {self._failure}")

    async def _run(self) -> None:
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        try:
            await self.app(scope, self._receive, self._send)
        except Exception as exc:  # noqa: BLE001 - surfaced by __aenter__/__aexit__
            self._error = exc
        finally:
            self._startup.set()
            self._shutdown.set()

    async def _receive(self) -> dict[str, Any]:
        if not self._started_message:
            self._started_message = True
            return {"type": "lifespan.startup"}
        await self._shutdown_requested.wait()
        return {"type": "lifespan.shutdown"}

    async def _send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind in ("lifespan.startup.failed", "lifespan.shutdown.failed"):
            self._failure = message.get("message") or kind
        if kind.startswith("lifespan.startup."):
            self._startup.set()
        elif kind.startswith("lifespan.shutdown."):
            self._shutdown.set()


def registries_of(app: Any) -> tuple[Resources, ...]:
    found: dict[int, Resources] = {}

    def visit_dependant(dependant: Any) -> None:
        resource = getattr(dependant.call, "__scoped_resource__", None)
        if isinstance(resource, Resource) and isinstance(resource.registry, Resources):
            found.setdefault(id(resource.registry), resource.registry)
        for sub in dependant.dependencies:
            visit_dependant(sub)

    def visit(router: Any) -> None:
        for route in getattr(router, "routes", ()):
            dependant = getattr(route, "dependant", None)
            if dependant is not None:
                visit_dependant(dependant)
            inner = getattr(route, "app", None)
            if inner is not None and inner is not router:
                visit(getattr(inner, "router", inner))

    visit(getattr(app, "router", app))
    return tuple(found.values())
