"""The plugin's app fixtures, overrides and leak check, seen from a user's test session.

No ``from __future__ import annotations``: FastAPI must resolve the routes'
annotations, which name resources local to the test helpers.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated

import anyio
import pytest
from fastapi import FastAPI

from scoped_resources import Resources, Use
from scoped_resources.exceptions import StartupFailed
from scoped_resources.testing import AppLifespan
from scoped_resources.testing._lifespan import hosted

if TYPE_CHECKING:
    from scoped_resources.testing.plugin import Overrides

pytest_plugins = ["pytester"]


GREETING_APP = '''
from typing import Annotated

import pytest
from fastapi import FastAPI

from scoped_resources import Resources, Use

resources = Resources()
events = []


@resources.app
async def greeting():
    events.append("open greeting")
    yield "hello"
    events.append("close greeting")


@resources.request
async def visitor():
    yield "visitor"


@pytest.fixture
def app():
    app = FastAPI(lifespan=resources.lifespan)

    @app.get("/")
    async def root(
        g: Annotated[str, Use(greeting)], v: Annotated[str, Use(visitor)]
    ):
        return {"text": f"{g}, {v}"}

    return app
'''


def greeting_app(journal: list[str]) -> tuple[FastAPI, Resources]:
    """An app with one app resource and one request resource that journal their lifecycle."""
    resources = Resources()

    @resources.app
    async def greeting() -> AsyncIterator[str]:
        journal.append("open greeting")
        yield "hello"
        journal.append("close greeting")

    @resources.request
    async def visitor() -> AsyncIterator[str]:
        journal.append("acquire visitor")
        yield "visitor"
        journal.append("release visitor")

    app = FastAPI(lifespan=resources.lifespan)

    @app.get("/")
    async def root(
        g: Annotated[str, Use(greeting)], v: Annotated[str, Use(visitor)]
    ) -> dict[str, str]:
        return {"text": f"{g}, {v}"}

    app.state.greeting = greeting
    app.state.visitor = visitor
    return app, resources


@pytest.mark.anyio
class TestAppLifespan:
    """The app under test runs its lifespan around the test, and requests see its state."""

    async def test_lifespan_runs_around_the_requests(self) -> None:
        """Startup opens the app resources before the first request; shutdown closes them last."""
        journal: list[str] = []
        app, _ = greeting_app(journal)
        async with AppLifespan(app) as running, running.client() as http:
            response = await http.get("/")
            journal.append("response")
        assert response.json() == {"text": "hello, visitor"}
        assert journal == [
            "open greeting", "acquire visitor", "release visitor", "response", "close greeting"
        ]

    async def test_startup_failure_is_raised_with_the_original_error(self) -> None:
        """A resource that fails to open makes entering the lifespan raise StartupFailed."""
        resources = Resources()

        @resources.app
        async def broken() -> AsyncIterator[str]:
            raise ConnectionRefusedError("no database here")
            yield "never"

        app = FastAPI(lifespan=resources.lifespan)
        with pytest.raises(StartupFailed, match="broken") as caught:
            async with AppLifespan(app):
                pass
        assert isinstance(caught.value.__cause__, ConnectionRefusedError)

    async def test_cancelled_while_the_app_starts_it_ends_the_start_up(self) -> None:
        """A deadline passing during start-up ends it: what opened is closed, the
        cancellation goes on, and the caller's cancel scopes stay properly nested."""
        journal: list[str] = []
        app, resources = greeting_app(journal)

        @resources.app
        async def slow(g: Annotated[str, Use(app.state.greeting)]) -> str:
            await anyio.sleep_forever()
            return g

        with anyio.move_on_after(0.2) as deadline:
            async with AppLifespan(app):
                pytest.fail("the app must not start")
        assert deadline.cancelled_caught
        assert journal == ["open greeting", "close greeting"]

    async def test_client_fixture_serves_the_app_fixture(
        self, client: object, app_lifespan: AppLifespan
    ) -> None:
        """The client fixture talks to the app fixture with its lifespan running."""
        import httpx

        assert isinstance(client, httpx.AsyncClient)
        response = await client.get("/")
        assert response.json() == {"text": "hello, visitor"}
        assert len(app_lifespan.app_scopes) == 1

    @pytest.fixture
    def app(self) -> FastAPI:
        """The app the fixture tests use."""
        return greeting_app([])[0]

    def test_startup_failure_is_the_test_error(self, inner: pytest.Pytester) -> None:
        """In a user's session, a failing startup errors the test that asked for the client."""
        inner.makepyfile(
            '''
            import pytest
            from fastapi import FastAPI
            from scoped_resources import Resources

            resources = Resources()

            @resources.app
            async def database():
                raise ConnectionRefusedError("no database here")
                yield

            @pytest.fixture
            def app():
                return FastAPI(lifespan=resources.lifespan)

            @pytest.mark.anyio
            async def test_uses_the_app(client):
                pass
            '''
        )
        result = inner.runpytest()
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(["*StartupFailed: could not open app resource 'database'*"])


@pytest.mark.anyio
class TestHosted:
    """``hosted`` enters and exits a context manager in a task of its own (pytest-asyncio)."""

    @pytest.mark.timeout(20)
    async def test_cancelled_while_entering_it_ends_and_cleans_up(self) -> None:
        """One plain asyncio cancellation (no anyio scope to repeat it) while the host
        task is still entering stops that, instead of waiting for ever for it."""
        log: list[str] = []

        @asynccontextmanager
        async def slow_to_enter() -> AsyncIterator[int]:
            log.append("enter")
            try:
                await anyio.sleep_forever()
                yield 1
            finally:
                log.append("exit")

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1), hosted(slow_to_enter()):
                pytest.fail("it must not be entered")
        assert log == ["enter", "exit"]


@pytest.mark.anyio
class TestOverride:
    """A resource is replaced by naming it, for one test, and comes back afterwards."""

    @pytest.fixture
    def app(self) -> FastAPI:
        """The app the override tests use."""
        return greeting_app([])[0]

    async def test_override_replaces_an_app_resource_after_startup(
        self, app: FastAPI, client: object, override: "Overrides"
    ) -> None:
        """Overriding the app-scoped greeting after startup changes the next response."""
        import httpx

        assert isinstance(client, httpx.AsyncClient)
        override(app.state.greeting, "bonjour")
        response = await client.get("/")
        assert response.json() == {"text": "bonjour, visitor"}

    async def test_override_by_factory_and_by_resource(
        self, app: FastAPI, client: object, override: "Overrides"
    ) -> None:
        """A factory replaces a request resource, and a longer-lived resource can stand in."""
        import httpx

        assert isinstance(client, httpx.AsyncClient)
        released: list[str] = []

        async def guest() -> AsyncIterator[str]:
            yield "guest"
            released.append("guest")

        override(app.state.visitor, factory=guest)
        response = await client.get("/")
        assert response.json() == {"text": "hello, guest"}
        assert released == ["guest"]
        override(app.state.visitor, app.state.greeting)
        response = await client.get("/")
        assert response.json() == {"text": "hello, hello"}

    def test_override_is_rejected_for_a_non_resource(self, override: "Overrides") -> None:
        """Naming a plain function instead of a declared resource raises TypeError."""
        with pytest.raises(TypeError, match="declared resource"):
            override(len, 1)  # type: ignore[arg-type]

    def test_override_ends_with_a_failing_test(self, inner: pytest.Pytester) -> None:
        """A test that fails with an override active leaves the original for the next test."""
        inner.makepyfile(
            GREETING_APP
            + '''

@pytest.mark.anyio
async def test_fails_while_overridden(client, override):
    override(greeting, "bonjour")
    assert (await client.get("/")).json() == {"text": "bonjour, visitor"}
    raise AssertionError("deliberate failure")


@pytest.mark.anyio
async def test_sees_the_original(client):
    assert (await client.get("/")).json() == {"text": "hello, visitor"}
'''
        )
        result = inner.runpytest("-p", "no:randomly")
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["*AssertionError: deliberate failure*"])


class TestLeakCheck:
    """A test that leaves a scope open fails, naming the scope and what it holds."""

    LEAKY = GREETING_APP + '''

@pytest.mark.anyio
async def test_leaks_a_scope(client):
    scope = resources.scope("forgotten job")
    await scope.get(visitor)


@pytest.fixture
async def opened_by_hand():
    opened = []
    yield opened
    for cm in opened:  # the leak check ran before this teardown
        await cm.__aexit__(None, None, None)


@pytest.mark.anyio
async def test_leaks_an_app_scope(leak_check, opened_by_hand):
    leak_check.watch(resources)
    opened = resources.open()
    await opened.__aenter__()
    opened_by_hand.append(opened)


@pytest.mark.anyio
@pytest.mark.allow_leaks
async def test_allowed_to_leak(client):
    scope = resources.scope("tolerated")
    await scope.get(visitor)


@pytest.mark.anyio
async def test_closes_its_scope(client):
    async with resources.scope("tidy") as scope:
        await scope.get(visitor)
'''

    def test_leaks_fail_the_test_by_name(self, inner: pytest.Pytester) -> None:
        """Leaked job and app scopes fail their tests; allowed and tidy tests pass."""
        inner.makepyfile(self.LEAKY)
        result = inner.runpytest("-p", "no:randomly", "-W", "ignore::ResourceWarning")
        result.assert_outcomes(passed=2, failed=2)
        result.stdout.fnmatch_lines(
            [
                "*scope 'forgotten job' of app 'app' is still open, holding 'visitor' (held)*",
                "*app scope 'app' is still open*",
            ]
        )
        assert "tolerated" not in result.stdout.str()


class TestPytestAsyncio:
    """The fixtures work when pytest-asyncio, not anyio, runs the tests."""

    def test_fixtures_work_under_pytest_asyncio(
        self, inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Client, override, tcp_proxy and the leak check behave the same in strict mode."""
        inner.makeini(
            "[pytest]\nfilterwarnings = error\nasyncio_mode = strict\n"
            "asyncio_default_fixture_loop_scope = function\n"
        )
        inner.makepyfile(
            GREETING_APP
            + '''

@pytest.mark.asyncio
async def test_overridden(client, override, tcp_proxy):
    override(greeting, "bonjour")
    assert (await client.get("/")).json() == {"text": "bonjour, visitor"}
    proxy = await tcp_proxy("127.0.0.1", 5432)
    assert proxy.port


@pytest.mark.asyncio
async def test_original(client):
    assert (await client.get("/")).json() == {"text": "hello, visitor"}


@pytest.mark.asyncio
async def test_leaks(client):
    await resources.scope("forgotten").get(visitor)


def test_lifespans_ran():
    assert events == ["open greeting", "close greeting"] * 3
'''
        )
        result = inner.runpytest_subprocess("-p", "asyncio", "-p", "no:randomly")
        result.stdout.fnmatch_lines(["*plugins:*asyncio-*", "*scope 'forgotten' of app*"])
        result.assert_outcomes(passed=3, failed=1)
