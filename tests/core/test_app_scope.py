"""The app scope: concurrent start-up, clean failure, bounded drain and shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import pytest

from scoped_resources import Resource, Resources, Use
from scoped_resources.exceptions import ReleaseFailed, ScopeClosed, StartupFailed

from .helpers import Journal, generator_resource

pytestmark = pytest.mark.anyio


def _failing_to_close(resources: Resources, journal: Journal) -> Resource[str]:
    """An app resource "pool" whose release raises OSError("close failed")."""
    return generator_resource(
        resources, journal, "pool", scope="app", fail_release=OSError("close failed")
    )


def _close_failure_logged(caplog: pytest.LogCaptureFixture) -> bool:
    return any(
        "'pool'" in r.getMessage() and "close failed" in r.getMessage() for r in caplog.records
    )


class TestStartup:
    """Independent app resources open concurrently; dependents after what they need."""

    async def test_independent_resources_open_concurrently(self) -> None:
        """Two resources each waiting for the other to start prove they run at once."""
        resources = Resources()
        a_started, b_started = anyio.Event(), anyio.Event()

        @resources.app
        async def a() -> str:
            a_started.set()
            await b_started.wait()
            return "a"

        @resources.app
        async def b() -> str:
            b_started.set()
            await a_started.wait()
            return "b"

        with anyio.fail_after(5):
            async with resources.open() as app_scope:
                assert (await app_scope.get(a), await app_scope.get(b)) == ("a", "b")

    async def test_a_dependent_opens_after_its_dependency(self) -> None:
        """A resource's parameters are open before it is."""
        resources = Resources()
        journal = Journal()
        pool = generator_resource(resources, journal, "pool", scope="app")

        @resources.app
        async def cache(p: Annotated[str, Use(pool)]) -> AsyncIterator[str]:
            journal.add("acquire cache")
            yield p
            journal.add("release cache")

        async with resources.open():
            pass
        assert journal.events == ["acquire pool", "acquire cache", "release cache", "release pool"]

    async def test_a_failure_closes_what_was_opened_in_reverse_order(self) -> None:
        """When one resource fails, those already open are closed and one error names it."""
        resources = Resources()
        journal = Journal()
        pool = generator_resource(resources, journal, "pool", scope="app")

        @resources.app
        async def cache(p: Annotated[str, Use(pool)]) -> AsyncIterator[str]:
            journal.add("acquire cache")
            yield p
            journal.add("release cache")

        @resources.app
        async def broker(c: Annotated[str, Use(cache)]) -> str:
            raise ConnectionRefusedError("broker down")

        with pytest.raises(StartupFailed, match="'broker'.*broker down") as caught:
            async with resources.open():
                pytest.fail("the app must not start")
        assert isinstance(caught.value.__cause__, ConnectionRefusedError)
        assert journal.events == ["acquire pool", "acquire cache", "release cache", "release pool"]

    async def test_a_failure_cancels_resources_still_opening(self) -> None:
        """A slow resource still opening is cancelled when another fails."""
        resources = Resources()
        cancelled = anyio.Event()

        @resources.app
        async def slow() -> str:
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()
            return "never"

        @resources.app
        async def broken() -> str:
            raise OSError("no route")

        with anyio.fail_after(5), pytest.raises(StartupFailed, match="'broken'"):
            async with resources.open():
                pass
        assert cancelled.is_set()

    async def test_a_release_failing_after_a_failed_start_up_is_logged_and_noted(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The start-up error stays the one raised; the release failure is not lost."""
        resources = Resources()
        pool = _failing_to_close(resources, Journal())

        @resources.app
        async def broker(p: Annotated[str, Use(pool)]) -> str:
            raise ConnectionRefusedError("broker down")

        with (
            caplog.at_level(logging.WARNING, logger="scoped_resources"),
            pytest.raises(StartupFailed, match="'broker'") as caught,
        ):
            async with resources.open():
                pytest.fail("the app must not start")
        assert "releasing 'pool' also failed (logged by 'scoped_resources')" in (
            caught.value.__notes__
        )
        assert _close_failure_logged(caplog)

    async def test_a_release_failing_after_a_cancelled_start_up_is_logged(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        resources = Resources()
        journal = Journal()
        pool = _failing_to_close(resources, journal)
        outer = anyio.CancelScope()

        @resources.app
        async def slow(p: Annotated[str, Use(pool)]) -> str:
            outer.cancel()
            await anyio.sleep_forever()
            return p

        with caplog.at_level(logging.WARNING, logger="scoped_resources"), outer:
            async with resources.open():
                pytest.fail("the app must not start")
        assert outer.cancelled_caught
        assert journal.open == set()
        assert _close_failure_logged(caplog)

    async def test_an_app_resource_past_its_timeout_fails_startup(self) -> None:
        """timeout= bounds opening; the error says which resource and how long."""
        resources = Resources()

        @resources.app(timeout=0.02)
        async def unreachable() -> str:
            await anyio.sleep_forever()
            return "never"

        with pytest.raises(StartupFailed, match="'unreachable'.*within 0.02 s"):
            async with resources.open():
                pass


class TestShutdown:
    """Shutdown drains open scopes (bounded), then closes app resources in reverse."""

    async def test_shutdown_waits_for_an_open_request_scope(self) -> None:
        """The pool closes only after the in-flight request released its connection."""
        resources = Resources(drain_timeout=5)
        journal = Journal()
        generator_resource(resources, journal, "pool", scope="app")
        conn = generator_resource(resources, journal, "conn")
        holding = anyio.Event()
        finish = anyio.Event()

        async def request(app_scope: object) -> None:
            async with app_scope.child() as scope:  # type: ignore[attr-defined]
                await scope.get(conn)
                holding.set()
                await finish.wait()
                journal.add("request done")

        async with anyio.create_task_group() as tg, resources.open() as app_scope:
            tg.start_soon(request, app_scope)
            await holding.wait()

            async def finish_later() -> None:
                await anyio.wait_all_tasks_blocked()
                finish.set()

            tg.start_soon(finish_later)
        assert journal.events[-3:] == ["request done", "release conn", "release pool"]

    async def test_drain_is_bounded_by_its_timeout(self) -> None:
        """A scope that never closes delays shutdown only by drain_timeout."""
        resources = Resources(drain_timeout=0.05)
        journal = Journal()
        generator_resource(resources, journal, "pool", scope="app")
        async with resources.open() as app_scope:
            stuck = app_scope.child("stuck")
        assert journal.events == ["acquire pool", "release pool"]
        await stuck.aclose()

    async def test_a_closed_app_scope_opens_no_new_scope(self) -> None:
        """After shutdown, asking for a child scope raises ScopeClosed."""
        resources = Resources()
        async with resources.open() as app_scope:
            pass
        with pytest.raises(ScopeClosed):
            app_scope.child()

    async def test_a_scope_left_open_past_shutdown_opens_no_new_scope(self) -> None:
        """A child still open after its app scope closed cannot open a child of its own."""
        resources = Resources(drain_timeout=0.01)
        async with resources.open() as app_scope:
            stuck = app_scope.child("stuck")
        with pytest.raises(ScopeClosed, match="closed"):
            stuck.child()
        await stuck.aclose()

    async def test_closing_failures_are_reported_together(self) -> None:
        """Every failing close is gathered; the others still close."""
        resources = Resources()
        journal = Journal()
        generator_resource(resources, journal, "a", scope="app", fail_release=OSError("a"))
        generator_resource(resources, journal, "b", scope="app")
        with pytest.raises(ReleaseFailed, match="'a'"):
            async with resources.open():
                pass
        assert journal.open == set()

    async def test_a_hanging_close_is_terminated(self) -> None:
        """An app resource whose close hangs is terminated at its deadline."""
        resources = Resources()
        terminated: list[str] = []

        @resources.app(release_timeout=0.05, terminate=terminated.append)
        async def pool() -> AsyncIterator[str]:
            yield "pool"
            await anyio.sleep_forever()

        with pytest.raises(ReleaseFailed, match="'pool'"):
            async with resources.open():
                pass
        assert terminated == ["pool"]


class TestScopesOutsideHttp:
    """resources.scope() gives jobs and commands a scope of their own."""

    async def test_scope_uses_the_open_app_scope(self) -> None:
        """A job scope gets app resources from the app scope and releases its own."""
        resources = Resources()
        journal = Journal()
        pool = generator_resource(resources, journal, "pool", scope="app")
        conn = generator_resource(resources, journal, "conn")
        async with resources.open():
            async with resources.scope("job") as job:
                assert (await job.get(pool), await job.get(conn)) == ("pool", "conn")
            journal.add("job done")
        assert journal.events == [
            "acquire pool",
            "acquire conn",
            "release conn",
            "job done",
            "release pool",
        ]

    async def test_scope_without_an_open_app_explains_what_to_do(self) -> None:
        """Asking for a scope before the app opened names the fix."""
        resources = Resources()
        with pytest.raises(ScopeClosed, match=r"resources\.open\(\)"):
            resources.scope()


class TestOverrides:
    """An override replaces a resource everywhere until its block ends."""

    async def test_a_value_overrides_an_app_resource_after_startup(self) -> None:
        """Overriding an open app resource takes effect at once and is undone after."""
        resources = Resources()
        journal = Journal()
        pool = generator_resource(resources, journal, "pool", scope="app")
        async with resources.open() as app_scope:
            with resources.override(pool, "fake pool"):
                async with app_scope.child() as scope:
                    assert await scope.get(pool) == "fake pool"
            async with app_scope.child() as scope:
                assert await scope.get(pool) == "pool"

    async def test_a_factory_override_is_released_like_a_resource(self) -> None:
        """A generator override is acquired and released in the request scope."""
        resources = Resources()
        journal = Journal()
        conn = generator_resource(resources, journal, "conn")

        async def fake() -> AsyncIterator[str]:
            journal.add("fake acquire")
            yield "fake"
            journal.add("fake release")

        async with resources.open() as app_scope:
            with resources.override(conn, factory=fake):
                async with app_scope.child() as scope:
                    assert await scope.get(conn) == "fake"
        assert journal.events == ["fake acquire", "fake release"]

    async def test_the_override_ends_when_its_block_fails(self) -> None:
        """The original comes back even when the block raised."""
        resources = Resources()
        journal = Journal()
        conn = generator_resource(resources, journal, "conn")
        with pytest.raises(RuntimeError), resources.override(conn, "fake"):
            raise RuntimeError
        assert conn._override is None

    async def test_a_shorter_lived_replacement_is_refused(self) -> None:
        """An app resource cannot be replaced by a request resource."""
        from scoped_resources.exceptions import ScopeViolation

        resources = Resources()
        journal = Journal()
        pool = generator_resource(resources, journal, "pool", scope="app")
        conn = generator_resource(resources, journal, "conn")
        with pytest.raises(ScopeViolation, match="'pool'.*'conn'"), resources.override(pool, conn):
            pass

    async def test_an_override_in_force_at_startup_replaces_the_opening(self) -> None:
        """The original app resource never opens when overridden before start-up."""
        resources = Resources()
        journal = Journal()
        relay = generator_resource(resources, journal, "relay", scope="app")

        @resources.app
        def user(r: Annotated[str, Use(relay)]) -> str:
            return f"uses {r}"

        with resources.override(relay, "fake relay"):
            async with resources.open() as app_scope:
                assert await app_scope.get(user) == "uses fake relay"
        assert journal.events == []


class TestAppScopeAsParameter:
    """An app resource can take the app scope, to open child scopes later."""

    async def test_a_background_resource_opens_child_scopes(self) -> None:
        """A relay-like resource uses request resources from its own task."""
        from scoped_resources import AppScope

        resources = Resources()
        journal = Journal()
        conn = generator_resource(resources, journal, "conn")
        done = anyio.Event()

        @resources.app
        async def relay(app_scope: AppScope) -> AsyncIterator[str]:
            async def work() -> None:
                async with app_scope.child("relay job") as scope:
                    journal.add(f"relay got {await scope.get(conn)}")
                done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(work)
                yield "relay"
                tg.cancel_scope.cancel()

        async with resources.open():
            await done.wait()
        assert journal.events == ["acquire conn", "relay got conn", "release conn"]

    async def test_an_app_resource_cannot_take_the_request(self) -> None:
        """Asking for the Request in an app resource is a plan error."""
        from starlette.requests import Request

        from scoped_resources.exceptions import ResourceMisuse

        resources = Resources()

        @resources.app
        def per_request(request: Request) -> str:
            return "x"

        with pytest.raises(ResourceMisuse, match="'per_request'.*Request"):
            resources.plan(context_types=(Request,))


class TestOuterCancellation:
    """Cancelling the task that holds the app scope still releases every app resource."""

    async def test_a_cancelled_owner_task_releases_app_resources(self) -> None:
        """The app resources are released in order, and nothing hangs."""
        resources = Resources()
        journal = Journal()
        generator_resource(resources, journal, "pool", scope="app")
        opened = anyio.Event()

        async def serve() -> None:
            async with resources.open():
                opened.set()
                await anyio.sleep_forever()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve)
                await opened.wait()
                tg.cancel_scope.cancel()
        assert journal.events[0] == "acquire pool"
        assert journal.events[1] in {
            "release pool after Cancelled",
            "release pool after CancelledError",
        }
        assert journal.open == set()
