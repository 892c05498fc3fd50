"""Edges of the core: states, reprs, pings, and the rarer paths of acquire and release."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import pytest

from scoped_resources import Resources, Use
from scoped_resources.exceptions import (
    ReleaseFailed,
    ReleaseTimeout,
    ResourceMisuse,
    ScopeClosed,
    StartupFailed,
)

from .helpers import Journal, generator_resource

pytestmark = pytest.mark.anyio


class TestStates:
    """Scopes, leases and resources say what state they are in."""

    async def test_states_and_reprs_follow_the_lifecycle(self) -> None:
        """A lease goes held -> released and its scope open -> closed."""
        resources = Resources("shop")
        journal = Journal()
        conn = generator_resource(resources, journal, "conn")
        assert repr(conn) == "<Resource 'conn' scope=request>"
        assert repr(resources) == "<Resources 'shop': 1 resources>"
        assert resources.resources == (conn,)
        async with resources.open() as app_scope:
            scope = app_scope.child("job")
            await scope.get(conn)
            (lease,) = scope.leases
            assert repr(lease) == "<Lease 'conn' held>"
            assert repr(scope) == "<Scope 'job' open leases=1>"
            assert app_scope.open_scopes == (scope,)
            await scope.aclose()
            assert lease.state_name == "released"
            assert scope.state == "closed"
            assert await scope.aclose() is False  # idempotent
        assert await app_scope.aclose() is False

    async def test_a_resource_declared_after_the_plan_is_refused_at_acquire(self) -> None:
        """A late declaration is named with the fix."""
        resources = Resources()
        async with resources.open() as app_scope:

            @resources.request
            def late() -> int:
                return 1

            async with app_scope.child() as scope:
                with pytest.raises(ResourceMisuse, match="'late'.*declared after"):
                    await scope.get(late)

    async def test_the_app_scope_does_not_acquire_request_resources_for_children(self) -> None:
        """Asking the app scope itself for a request resource is refused."""
        resources = Resources()
        journal = Journal()
        conn = generator_resource(resources, journal, "conn")
        async with resources.open() as app_scope:
            with pytest.raises(ResourceMisuse, match="'conn'.*request scope"):
                await app_scope.get(conn)

    async def test_a_request_resource_without_its_context_value_is_refused(self) -> None:
        """A resource asking for a context value the scope lacks names it."""
        from starlette.requests import Request

        resources = Resources()

        @resources.request
        def caller(request: Request) -> str:
            return "x"

        opened = resources.open(context_types=(Request,))
        async with opened as app_scope, app_scope.child() as scope:
            with pytest.raises(ScopeClosed, match=r"without a Request for 'caller'\.request"):
                await scope.get(caller)

    async def test_a_resource_cannot_be_declared_twice(self) -> None:
        """Declaring a Resource object again is refused."""
        resources = Resources()

        @resources.app
        def pool() -> int:
            return 1

        with pytest.raises(ResourceMisuse, match="declared twice"):
            resources.app(pool)

    async def test_overriding_another_registrys_resource_is_refused(self) -> None:
        """An override names the registry mistake."""
        first, second = Resources("a"), Resources("b")

        @first.app
        def pool() -> int:
            return 1

        with pytest.raises(ResourceMisuse, match="another Resources registry"):
            second.override(pool, 2).__enter__()

    async def test_a_resource_can_override_another(self) -> None:
        """Overriding with a declared resource uses it as is."""
        resources = Resources()

        @resources.request
        def real() -> str:
            return "real"

        @resources.request
        def fake() -> str:
            return "fake"

        async with resources.open() as app_scope:
            with resources.override(real, fake):
                async with app_scope.child() as scope:
                    assert await scope.get(real) == "fake"


class TestPing:
    """The app scope pings every resource that has a ping hook, concurrently."""

    async def test_ping_reports_each_resource(self) -> None:
        """A healthy resource maps to None, a failing one to its error."""
        resources = Resources()

        async def ok(value: str) -> None:
            return None

        async def broken(value: str) -> None:
            raise ConnectionError(value)

        async def hangs(value: str) -> None:
            await anyio.sleep_forever()

        resources.app(ping=ok)(lambda: "db")
        resources.app(name="cache", ping=broken)(lambda: "cache down")
        resources.app(name="broker", ping=hangs)(lambda: "broker")
        resources.app(name="plain")(lambda: "no ping")
        async with resources.open() as app_scope:
            results = await app_scope.ping(timeout=0.05)
        assert results["<lambda>"] is None
        assert isinstance(results["cache"], ConnectionError)
        assert isinstance(results["broker"], TimeoutError)
        assert "plain" not in results


class TestRareReleases:
    """The rarer ways a release ends are each reported precisely."""

    async def test_a_generator_may_swallow_the_error_when_declared_so(self) -> None:
        """A generator that catches the outcome suppresses it only with suppress_errors."""
        resources = Resources()

        @resources.request(suppress_errors=True)
        async def forgiving() -> AsyncIterator[str]:
            with contextlib.suppress(ValueError):
                yield "x"

        async with resources.open() as app_scope, app_scope.child() as scope:
            await scope.get(forgiving)
            raise ValueError("forgiven")

    async def test_a_swallowing_generator_is_logged_when_not_declared(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Without suppress_errors the error stays, and the attempt is logged."""
        resources = Resources()

        @resources.request
        async def forgiving() -> AsyncIterator[str]:
            with contextlib.suppress(ValueError):
                yield "x"

        caplog.set_level(logging.WARNING, "scoped_resources")
        async with resources.open() as app_scope:
            with pytest.raises(ValueError, match="kept"):
                async with app_scope.child() as scope:
                    await scope.get(forgiving)
                    raise ValueError("kept")
        assert "tried to suppress ValueError" in caplog.text

    async def test_a_generator_yielding_again_after_an_error_is_reported(self) -> None:
        """Yielding again after the outcome was thrown in is a release failure."""
        resources = Resources()

        @resources.request
        async def stubborn() -> AsyncIterator[str]:
            try:
                yield "x"
            except ValueError:
                yield "again"

        async with resources.open() as app_scope:
            with pytest.raises(ValueError, match="outcome") as caught:
                async with app_scope.child() as scope:
                    await scope.get(stubborn)
                    raise ValueError("outcome")
        assert any("'stubborn' also failed" in note for note in caught.value.__notes__)

    async def test_an_async_terminate_hook_is_awaited(self) -> None:
        """A coroutine terminate hook runs to completion after a release overran."""
        resources = Resources()
        terminated: list[str] = []

        async def terminate(value: str) -> None:
            await anyio.lowlevel.checkpoint()
            terminated.append(value)

        @resources.request(release_timeout=0.02, terminate=terminate)
        async def stuck() -> AsyncIterator[str]:
            yield "conn"
            await anyio.sleep_forever()

        async with resources.open() as app_scope:
            with pytest.raises(ReleaseFailed):
                async with app_scope.child() as scope:
                    await scope.get(stuck)
        assert terminated == ["conn"]

    async def test_a_failing_terminate_hook_is_logged_not_raised(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A terminate hook that fails is logged; the release error still comes back."""
        resources = Resources()

        def terminate(value: str) -> None:
            raise RuntimeError("cannot even terminate")

        @resources.request(release_timeout=0.02, terminate=terminate)
        async def flaky() -> AsyncIterator[str]:
            yield "conn"
            await anyio.sleep_forever()

        caplog.set_level(logging.ERROR, "scoped_resources")
        async with resources.open() as app_scope:
            with pytest.raises(ReleaseFailed):
                async with app_scope.child() as scope:
                    await scope.get(flaky)
        assert "terminating resource 'flaky' failed" in caplog.text

    async def test_a_release_that_converts_its_cancellation_is_a_timeout(self) -> None:
        """A release that turns its deadline's cancellation into another error still timed out."""
        resources = Resources()

        @resources.request(release_timeout=0.02)
        async def converts() -> AsyncIterator[str]:
            yield "conn"
            try:
                await anyio.sleep_forever()
            except BaseException:
                raise OSError("socket closed") from None

        async with resources.open() as app_scope:
            with pytest.raises(ReleaseFailed) as caught:
                async with app_scope.child() as scope:
                    await scope.get(converts)
        assert isinstance(caught.value.exceptions[0], ReleaseTimeout)

    async def test_a_release_that_swallows_its_cancellation_is_a_timeout(self) -> None:
        """A release that ignores its deadline and returns late is reported as timed out."""
        resources = Resources()

        @resources.request(release_timeout=0.02)
        async def ignores() -> AsyncIterator[str]:
            yield "conn"
            try:
                await anyio.sleep_forever()
            except BaseException:
                return

        async with resources.open() as app_scope:
            with pytest.raises(ReleaseFailed) as caught:
                async with app_scope.child() as scope:
                    await scope.get(ignores)
        assert isinstance(caught.value.exceptions[0], ReleaseTimeout)

    async def test_a_generator_yielding_a_coroutine_is_released_and_reported(self) -> None:
        """A forgotten await inside a generator still releases the generator."""
        resources = Resources()
        journal = Journal()

        async def connect() -> str:
            return "conn"

        @resources.request
        async def client() -> AsyncIterator[Any]:
            try:
                yield connect()
            finally:
                journal.add("released")

        async with resources.open() as app_scope, app_scope.child() as scope:
            with pytest.raises(ResourceMisuse, match="un-awaited"):
                await scope.get(client)
        assert journal.events == ["released"]


class TestStartupEdges:
    """Start-up failures keep their cause."""

    async def test_a_startup_failed_from_a_resource_is_kept(self) -> None:
        """A resource raising StartupFailed itself is passed through unchanged."""
        resources = Resources()

        @resources.app
        def needs_config() -> int:
            raise StartupFailed("needs_config", "CONFIG is not set")

        with pytest.raises(StartupFailed, match="CONFIG is not set"):
            async with resources.open():
                pass

    async def test_dependents_of_a_failed_resource_do_not_open(self) -> None:
        """A resource whose dependency failed is not opened at all."""
        resources = Resources()
        opened: list[str] = []

        @resources.app
        def base() -> int:
            raise OSError("base down")

        @resources.app
        def dependent(b: Annotated[int, Use(base)]) -> int:
            opened.append("dependent")
            return b

        with pytest.raises(StartupFailed, match="'base'"):
            async with resources.open():
                pass
        assert opened == []


class TestMoreEdges:
    """Paths rarely taken, each with its own precise answer."""

    async def test_several_observers_each_see_every_event(self) -> None:
        """Two observers both receive the lifecycle."""
        from scoped_resources.metrics import Observer

        class Counting(Observer):
            def __init__(self) -> None:
                self.count = 0

            def acquire_started(self, resource: Any) -> None:
                self.count += 1

            def acquired(self, resource: Any, seconds: float) -> None:
                self.count += 1

            def released(self, resource: Any, seconds: float, outcome: str) -> None:
                self.count += 1

        first, second = Counting(), Counting()
        resources = Resources(observers=[first, second])
        journal = Journal()
        conn = generator_resource(resources, journal, "conn")
        async with resources.open() as app_scope, app_scope.child() as scope:
            await scope.get(conn)
        assert first.count == second.count == 3

    async def test_the_base_observer_ignores_everything(self) -> None:
        """The Observer base class is a no-op for every hook."""
        from scoped_resources.metrics import Observer

        resources = Resources(observers=[Observer(), Observer()])
        journal = Journal()
        generator_resource(resources, journal, "a", scope="app", fail_release=OSError("x"))
        with pytest.raises(ReleaseFailed):
            async with resources.open():
                pass

    async def test_open_app_scopes_lists_the_open_ones(self) -> None:
        """The process-wide list of open app scopes follows open and close."""
        from scoped_resources._app_scope import open_app_scopes

        resources = Resources()
        async with resources.open() as app_scope:
            assert app_scope in open_app_scopes()
        assert app_scope not in open_app_scopes()

    async def test_an_unresolvable_annotation_is_reported(self) -> None:
        """An annotation naming something that does not exist fails the plan clearly."""
        resources = Resources()

        def broken(x: DoesNotExist) -> int:  # type: ignore[name-defined]  # noqa: F821
            return 1

        resources.app(broken)
        with pytest.raises(ResourceMisuse, match="'broken'.*cannot be resolved"):
            resources.plan()

    async def test_a_builtin_without_a_signature_takes_no_arguments(self) -> None:
        """A factory whose signature cannot be read is called without arguments."""
        resources = Resources()
        made: Any = resources.app(name="dict")(dict)
        async with resources.open() as app_scope:
            assert await app_scope.get(made) == {}
