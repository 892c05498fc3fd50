"""The scoped-resources pytest plugin: the app under test, overrides, temp databases, leak check.

Loaded through the ``pytest11`` entry point (or ``pytest_plugins =
["scoped_resources.testing.plugin"]``). Async fixtures work with the anyio
plugin (``@pytest.mark.anyio``) and with pytest-asyncio (``@pytest.mark.asyncio``,
strict or auto mode); the plugin hands each async fixture to the one running
the test. The drivers need asyncio; on anyio set ``anyio_backend`` to
``"asyncio"``.

Fixtures
========

``app``
    Yours to define: return the FastAPI (or any ASGI) app under test.
``app_lifespan`` (async)
    Runs ``app``'s lifespan: startup before the test (a failed startup is the
    test's error, with the original exception), shutdown after it (a failed
    shutdown is an error too). An :class:`AppLifespan`: ``.app``, ``.state``,
    ``.app_scopes``, ``.client(**httpx_options)``.
``client`` (async)
    An ``httpx.AsyncClient`` bound to the running app (``base_url
    "http://testserver"``); each request sees the lifespan state, as under a
    server. App exceptions are raised in the test (``raise_app_exceptions``);
    use ``app_lifespan.client(raise_app_exceptions=False)`` to see the 500.
``override``
    ``override(resource, value)``, ``override(resource, factory=f)`` or
    ``override(resource, other_resource)``: replace a resource, named by itself,
    for the rest of the test, also an app resource after startup. Restored when
    the test ends, whether it passed or failed. Returns the replacement.
``leak_check`` (autouse)
    After each test that used ``app_lifespan``/``override`` (or called
    ``leak_check.watch(resources)``), the test fails if a request or job scope is
    still open, or an app scope opened with ``resources.open()`` was never
    closed, naming each scope and the leases it holds. Leaked scopes are then
    released so that shutdown does not wait for them. Opt out with
    ``@pytest.mark.allow_leaks``.
``temp_databases`` (session)
    ``temp_databases.postgres(admin_dsn, migrations)`` creates a database (named
    ``sr_test_...``) from migrations (a callable given the asyncpg connection, a
    ``.sql`` file, a folder of them, or a list) once per session and drops it
    at the end; returns a :class:`TempPostgres` (``.dsn``, ``.name``).
    ``temp_databases.sqlite(migrations)`` makes a migrated SQLite template file.
``isolate`` (async)
    Per-test isolation, undone when the test ends:
    ``await isolate.postgres(pg)`` opens one connection in an outer transaction,
    points the ``Postgres`` adapter's ``pool``/``connection`` (and so
    ``transaction``, whose commits become savepoints) at it, and rolls it all
    back afterwards. ``await isolate.sqlalchemy(sa, url)`` does the same for the
    SQLAlchemy adapter's ``connection``/``session``. ``await
    isolate.sqlite(template)`` copies a SQLite template into ``tmp_path``.
    ``await isolate.redis(url)`` gives a :class:`RedisNamespace` (a key prefix)
    whose keys are deleted afterwards.
``tcp_proxy`` (async)
    ``proxy = await tcp_proxy(host, port)``: a :class:`TcpProxy` to a real server
    (``.port``, ``.cut()``, ``.restore()``, ``.delay``), stopped after the test.

Files: use pytest's ``tmp_path``. Cancellation: see
:func:`scoped_resources.testing.cancel_at_each_await`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import pytest

from .._app_scope import AppScope
from .._registry import Resources
from .._resource import Resource
from .._scope import Scope
from ._databases import (
    DEFAULT_PREFIX,
    Migrations,
    RedisNamespace,
    TempPostgres,
    copy_sqlite_database,
    create_postgres_database,
    create_sqlite_database,
    drop_postgres_database,
    override_postgres,
    override_sqlalchemy,
    postgres_rollback,
    sqlalchemy_rollback,
)
from ._lifespan import AppLifespan, hosted
from ._proxy import TcpProxy

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")

__all__ = ["Isolation", "LeakCheck", "Overrides", "TempDatabases"]

_LEAK_CHECK = pytest.StashKey["LeakCheck"]()
_MISSING: Any = object()


def _run_blocking(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run *func* to completion on an event loop of its own, in a worker thread.

    Session fixtures use it, so they belong to no test's loop and work with any
    async plugin.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="scoped_resources") as pool:
        return pool.submit(anyio.run, func, *args).result()


# -- leak check ----------------------------------------------------------------------------


class LeakCheck:
    """Finds request and job scopes, and app scopes, left open by a test.

    App scopes already open when the test body starts (or when their registry is
    watched) are expected: fixtures opened them. Their child scopes are still
    checked.
    """

    def __init__(self) -> None:
        self._registries: dict[int, Resources] = {}
        self._app_scopes: dict[int, AppScope] = {}
        self._expected: set[int] = set()

    def watch(self, registry: Resources) -> None:
        """Check *registry*'s scopes after this test."""
        self._registries.setdefault(id(registry), registry)
        self._expected.update(id(app_scope) for app_scope in registry._open)

    def watch_app(self, running: AppLifespan) -> None:
        """Check the scopes of an app whose lifespan the plugin runs."""
        for registry in running.registries:
            self.watch(registry)
        for app_scope in running.app_scopes:
            self._app_scopes.setdefault(id(app_scope), app_scope)
            self._expected.add(id(app_scope))

    def begin(self) -> None:
        """Note the app scopes open as the test body starts: fixtures opened them."""
        for registry in self._registries.values():
            self._expected.update(id(app_scope) for app_scope in registry._open)

    def leaks(self) -> list[str]:
        """One line per scope left open, naming it and what it holds; empty if none."""
        app_scopes = dict(self._app_scopes)
        for registry in self._registries.values():
            for app_scope in registry._open:
                app_scopes.setdefault(id(app_scope), app_scope)
        found: list[str] = []
        for key, app_scope in app_scopes.items():
            if app_scope.state != "open":
                continue
            if key not in self._expected:
                found.append(
                    f"app scope {app_scope.name!r} is still open: leave "
                    "'async with resources.open()' before the test ends"
                )
            found.extend(
                f"scope {scope.name!r} of app {app_scope.name!r} is still open, {_holding(scope)}"
                for scope in sorted(app_scope.open_scopes, key=lambda s: s.name)
            )
        return found


def _holding(scope: Scope) -> str:
    leases = scope.leases
    if not leases:
        return "holding no resources"
    held = ", ".join(f"{lease.resource.name!r} ({lease.state_name})" for lease in leases)
    return f"holding {held}"


# -- overrides -----------------------------------------------------------------------------


class Overrides:
    """``override(resource, value)``: replace *resource* until the test ends."""

    def __init__(self, leaks: LeakCheck) -> None:
        self._stack = ExitStack()
        self._leaks = leaks

    def __call__(
        self,
        resource: Resource[Any],
        value: object = _MISSING,
        *,
        factory: Callable[..., Any] | None = None,
    ) -> Resource[Any]:
        """Replace *resource* by *value*, *factory* or another resource; return the replacement."""
        if not isinstance(resource, Resource):
            raise TypeError(
                f"override() takes a declared resource, not {resource!r}; pass the "
                "object @resources.app/@resources.request returned"
            )
        if (value is _MISSING) == (factory is None):
            raise TypeError(f"override({resource.name!r}, ...) takes a value or factory=, not both")
        registry = resource.registry
        if not isinstance(registry, Resources):
            raise TypeError(f"resource {resource.name!r} belongs to no Resources registry")
        self._leaks.watch(registry)
        cm = registry.override(resource, None if value is _MISSING else value, factory=factory)
        return self._stack.enter_context(cm)

    def restore(self) -> None:
        """End every override, latest first."""
        self._stack.close()


# -- temporary databases -------------------------------------------------------------------


class TempDatabases:
    """The session's temporary databases, dropped (or deleted) when it ends."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._postgres: list[TempPostgres] = []
        self._sqlite = 0

    @property
    def postgres_databases(self) -> tuple[TempPostgres, ...]:
        """The PostgreSQL databases made so far and not yet dropped."""
        return tuple(self._postgres)

    def postgres(
        self, admin_dsn: str, migrations: Migrations = None, *, prefix: str = DEFAULT_PREFIX
    ) -> TempPostgres:
        """Create a PostgreSQL database from *migrations*; dropped at the end of the session."""
        temp = _run_blocking(_create_pg, admin_dsn, migrations, prefix)
        self._postgres.append(temp)
        return temp

    def sqlite(self, migrations: Migrations = None) -> Path:
        """Create a migrated SQLite template file; copy it per test with ``isolate.sqlite``."""
        self._sqlite += 1
        path = self._folder / f"template-{self._sqlite}.sqlite3"
        return _run_blocking(create_sqlite_database, path, migrations)

    def drop_all(self) -> None:
        """Drop every PostgreSQL database made, latest first; report all failures."""
        errors: list[Exception] = []
        while self._postgres:
            temp = self._postgres.pop()
            try:
                _run_blocking(drop_postgres_database, temp.admin_dsn, temp.name)
            except Exception as exc:  # noqa: BLE001 - gathered and raised together
                exc.add_note(f"while dropping temporary database {temp.name!r}")
                errors.append(exc)
        if errors:
            raise ExceptionGroup("dropping temporary databases failed", errors)


async def _create_pg(admin_dsn: str, migrations: Migrations, prefix: str) -> TempPostgres:
    return await create_postgres_database(admin_dsn, migrations, prefix=prefix)


class Isolation:
    """Per-test isolation of databases and caches; everything is undone after the test."""

    def __init__(self, tmp_path: Path, leaks: LeakCheck) -> None:
        self._stack = AsyncExitStack()
        self._tmp_path = tmp_path
        self._leaks = leaks
        self._sqlite = 0

    async def postgres(self, pg: Any, dsn: str | None = None) -> Any:
        """Run *pg*'s (a ``Postgres`` adapter's) work in a transaction rolled back after the test.

        Returns the test's asyncpg connection (it sees what the app wrote).
        *dsn* defaults to ``pg.dsn``.
        """
        target = dsn if dsn is not None else pg.dsn
        conn = await self._stack.enter_async_context(postgres_rollback(target))
        self._watch(pg.connection)
        self._stack.enter_context(override_postgres(pg, conn))
        return conn

    async def sqlalchemy(self, sa: Any, url_or_engine: Any = None) -> Any:
        """Run *sa*'s (a ``SQLAlchemy`` adapter's) sessions in a transaction rolled back after.

        Returns the test's ``AsyncConnection``. *url_or_engine* defaults to ``sa.url``.
        """
        target = url_or_engine if url_or_engine is not None else sa.url
        conn = await self._stack.enter_async_context(sqlalchemy_rollback(target))
        self._watch(sa.session)
        self._stack.enter_context(override_sqlalchemy(sa, conn))
        return conn

    async def sqlite(self, template: Path | None = None, migrations: Migrations = None) -> Path:
        """A SQLite file of this test's own in ``tmp_path``: a copy of *template*, or migrated."""
        self._sqlite += 1
        path = self._tmp_path / f"db-{self._sqlite}.sqlite3"
        if template is not None:
            return await anyio.to_thread.run_sync(copy_sqlite_database, template, path)
        return await create_sqlite_database(path, migrations)

    async def redis(self, url: str, *, db: int | None = None) -> RedisNamespace:
        """A key prefix of this test's own; its keys are deleted after the test."""
        namespace = RedisNamespace(url, db=db)
        self._stack.push_async_callback(namespace.cleanup)
        return namespace

    def _watch(self, resource: Resource[Any]) -> None:
        if isinstance(resource.registry, Resources):
            self._leaks.watch(resource.registry)

    async def aclose(self) -> None:
        """Undo everything, latest first."""
        with anyio.CancelScope(shield=True):
            await self._stack.aclose()


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def app() -> Any:
    """The ASGI app under test: define this fixture yourself."""
    pytest.fail(
        "scoped_resources: the 'app_lifespan' and 'client' fixtures need a fixture "
        "named 'app' that returns your FastAPI app; define one in conftest.py",
        pytrace=False,
    )


@pytest.fixture(autouse=True)
def leak_check(request: pytest.FixtureRequest) -> LeakCheck:
    """The leak check of this test; ``leak_check.watch(resources)`` adds a registry."""
    check = LeakCheck()
    request.node.stash[_LEAK_CHECK] = check
    return check


@pytest.fixture
async def app_lifespan(app: Any, leak_check: LeakCheck) -> AsyncIterator[AppLifespan]:
    """The app with its lifespan running for the test."""
    async with hosted(AppLifespan(app)) as running:
        leak_check.watch_app(running)
        yield running


@pytest.fixture
async def client(app_lifespan: AppLifespan) -> AsyncIterator[httpx.AsyncClient]:
    """An ``httpx.AsyncClient`` for the running app."""
    async with app_lifespan.client() as http:
        yield http


@pytest.fixture
def override(leak_check: LeakCheck) -> Iterator[Overrides]:
    """``override(resource, value | factory= | other_resource)`` until the test ends."""
    overrides = Overrides(leak_check)
    try:
        yield overrides
    finally:
        overrides.restore()


@pytest.fixture(scope="session")
def temp_databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TempDatabases]:
    """Temporary databases for the session, dropped at its end."""
    databases = TempDatabases(tmp_path_factory.mktemp("scoped_resources"))
    try:
        yield databases
    finally:
        databases.drop_all()


@pytest.fixture
async def isolate(tmp_path: Path, leak_check: LeakCheck) -> AsyncIterator[Isolation]:
    """Per-test database and cache isolation, rolled back or deleted after the test."""
    isolation = Isolation(tmp_path, leak_check)
    try:
        yield isolation
    finally:
        await isolation.aclose()


@pytest.fixture
async def tcp_proxy() -> AsyncIterator[Callable[[str, int], Awaitable[TcpProxy]]]:
    """``proxy = await tcp_proxy(host, port)``: a controllable proxy, stopped after the test."""
    async with AsyncExitStack() as stack:

        async def start(host: str, port: int) -> TcpProxy:
            return await stack.enter_async_context(hosted(TcpProxy(host, port)))

        yield start


# -- hooks ---------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_leaks: do not fail the test when scopes are left open"
    )


_ASYNC_FIXTURES = frozenset({"app_lifespan", "client", "isolate", "tcp_proxy"})
_MARKED_FOR_ASYNCIO: set[Any] = set()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, object, object]:
    """Hand the plugin's async fixtures to pytest-asyncio when it, not anyio, runs the test."""
    func: Any = fixturedef.func
    if (
        fixturedef.argname not in _ASYNC_FIXTURES
        or getattr(func, "__module__", None) != __name__
        or "anyio_backend" in request.fixturenames
        or not request.config.pluginmanager.has_plugin("asyncio")
    ):
        return (yield)
    # pytest-asyncio runs a fixture whose function carries these marks, and checks
    # them again when it calls the test: they stay until the test's teardown.
    func._force_asyncio_fixture = True
    func._loop_scope = _asyncio_loop_scope(request)
    _MARKED_FOR_ASYNCIO.add(func)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    """Unmark the fixtures marked for pytest-asyncio, so an anyio test finds them plain."""
    try:
        return (yield)
    finally:
        while _MARKED_FOR_ASYNCIO:
            func = _MARKED_FOR_ASYNCIO.pop()
            del func._force_asyncio_fixture, func._loop_scope


def _asyncio_loop_scope(request: pytest.FixtureRequest) -> str:
    marker = request.node.get_closest_marker("asyncio")
    scope = marker.kwargs.get("loop_scope") if marker is not None else None
    if scope:
        return str(scope)
    default = request.config.getini("asyncio_default_test_loop_scope")
    return str(default) if default else "function"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Fail a test that passed but left scopes open."""
    check = item.stash.get(_LEAK_CHECK, None)
    if check is not None:
        check.begin()
    result = yield
    if check is None or item.get_closest_marker("allow_leaks") is not None:
        return result
    found = check.leaks()
    if found:
        lines = "\n".join(f"  - {line}" for line in found)
        pytest.fail(
            f"scoped_resources leak check: {len(found)} scope(s) left open after the "
            f"test:\n{lines}\nclose every scope you open (async with), or mark the test "
            "with @pytest.mark.allow_leaks",
            pytrace=False,
        )
    return result
