"""Scopes: acquire once, release in reverse order, learn the outcome, report failures."""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import pytest

from scoped_resources import AppScope, Resources, Use
from scoped_resources.exceptions import (
    ReleaseFailed,
    ReleaseTimeout,
    ResourceBusy,
    ResourceMisuse,
    ScopeClosed,
)

from .helpers import Journal, generator_resource

pytestmark = pytest.mark.anyio


class TestEventOrder:
    """Open, acquire, release and close happen in a fixed order in every scope."""

    async def test_app_and_request_resources_follow_the_lifecycle_order(self) -> None:
        """The app resource opens first, request ones release in reverse, the app one last."""
        resources = Resources()
        journal = Journal()
        pool = generator_resource(resources, journal, "pool", scope="app")

        @resources.request
        async def conn(p: Annotated[str, Use(pool)]) -> AsyncIterator[str]:
            journal.add("acquire conn")
            yield f"{p}/conn"
            journal.add("release conn")

        @resources.request
        async def tx(c: Annotated[str, Use(conn)]) -> AsyncIterator[str]:
            journal.add("begin tx")
            yield f"{c}/tx"
            journal.add("commit tx")

        async with resources.open() as app_scope:
            journal.add("started")
            async with app_scope.child() as scope:
                assert await scope.get(tx) == "pool/conn/tx"
                journal.add("work")
            journal.add("request done")
        assert journal.events == [
            "acquire pool",
            "started",
            "acquire conn",
            "begin tx",
            "work",
            "commit tx",
            "release conn",
            "request done",
            "release pool",
        ]

    async def test_nested_scope_releases_its_own_instances_first(self) -> None:
        """A nested scope's request instances are its own and released when it closes."""
        resources = Resources()
        journal = Journal()
        res = generator_resource(resources, journal, "conn")
        async with resources.open() as app_scope, app_scope.child("outer") as outer:
            first = await outer.get(res)
            async with outer.child("inner") as inner:
                await inner.get(res)
            journal.add("inner closed")
            assert first == "conn"
        assert journal.events == [
            "acquire conn",
            "acquire conn",
            "release conn",
            "inner closed",
            "release conn",
        ]


class TestCaching:
    """A scope holds one instance per resource."""

    async def test_two_gets_return_the_same_instance(self) -> None:
        """Asking twice in one scope acquires once."""
        resources = Resources()
        made: list[object] = []

        @resources.request
        async def thing() -> object:
            made.append(object())
            return made[-1]

        async with resources.open() as app_scope, app_scope.child() as scope:
            assert await scope.get(thing) is await scope.get(thing)
        assert len(made) == 1

    async def test_concurrent_gets_share_one_acquisition(self) -> None:
        """Two tasks asking at once wait for the same acquisition."""
        resources = Resources()
        calls = 0
        gate = anyio.Event()

        @resources.request
        async def slow() -> object:
            nonlocal calls
            calls += 1
            await gate.wait()
            return object()

        got: list[object] = []
        async with resources.open() as app_scope, app_scope.child() as scope:

            async def ask() -> None:
                got.append(await scope.get(slow))

            async with anyio.create_task_group() as tg:
                tg.start_soon(ask)
                tg.start_soon(ask)
                await anyio.wait_all_tasks_blocked()
                gate.set()
        assert calls == 1
        assert got[0] is got[1]

    async def test_a_waiter_sees_the_failure_of_the_shared_acquisition(self) -> None:
        """When the shared acquisition fails, every waiter gets the error."""
        resources = Resources()
        gate = anyio.Event()

        @resources.request
        async def broken() -> object:
            await gate.wait()
            raise ConnectionError("refused")

        errors: list[BaseException] = []
        async with resources.open() as app_scope, app_scope.child() as scope:

            async def ask() -> None:
                try:
                    await scope.get(broken)
                except ConnectionError as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(ask)
                tg.start_soon(ask)
                await anyio.wait_all_tasks_blocked()
                gate.set()
        assert len(errors) == 2


class TestOutcome:
    """A release learns the exception that ended its scope."""

    async def test_release_sees_the_error_that_ended_the_scope(self) -> None:
        """The generator gets the scope's exception thrown at its yield."""
        resources = Resources()
        journal = Journal()
        res = generator_resource(resources, journal, "tx")
        async with resources.open() as app_scope:
            with pytest.raises(KeyError):
                async with app_scope.child() as scope:
                    await scope.get(res)
                    raise KeyError("boom")
        assert journal.events == ["acquire tx", "release tx after KeyError"]

    async def test_context_manager_release_gets_exception_details(self) -> None:
        """A class resource's __aexit__ receives the type, value and traceback."""
        resources = Resources()
        seen: list[Any] = []

        class Tx:
            async def __aenter__(self) -> Tx:
                return self

            async def __aexit__(self, *exc_info: Any) -> None:
                seen.append(exc_info[0])

        tx = resources.request(Tx)
        async with resources.open() as app_scope:
            with pytest.raises(ValueError, match="bad"):
                async with app_scope.child() as scope:
                    await scope.get(tx)
                    raise ValueError("bad")
        assert seen == [ValueError]

    async def test_release_that_returns_true_does_not_hide_the_error(self) -> None:
        """A suppressing __aexit__ cannot swallow the scope's error unless declared so."""
        resources = Resources()

        class Swallower:
            async def __aenter__(self) -> Swallower:
                return self

            async def __aexit__(self, *exc_info: Any) -> bool:
                return True

        swallower = resources.request(Swallower)
        async with resources.open() as app_scope:
            with pytest.raises(ValueError, match="kept"):
                async with app_scope.child() as scope:
                    await scope.get(swallower)
                    raise ValueError("kept")

    async def test_release_declared_suppressing_may_swallow_the_error(self) -> None:
        """suppress_errors=True lets a resource suppress the scope's error, as asked."""
        resources = Resources()

        class Swallower:
            async def __aenter__(self) -> Swallower:
                return self

            async def __aexit__(self, *exc_info: Any) -> bool:
                return True

        swallower = resources.request(suppress_errors=True)(Swallower)

        async with resources.open() as app_scope, app_scope.child() as scope:
            await scope.get(swallower)
            raise ValueError("swallowed")


class TestFailingReleases:
    """One failing release never skips another; all failures come back together."""

    async def test_one_failing_release_does_not_skip_the_others(self) -> None:
        """The other resources are still released and the failure is raised in a group."""
        resources = Resources()
        journal = Journal()
        first = generator_resource(resources, journal, "first")
        broken = generator_resource(resources, journal, "broken", fail_release=OSError("gone"))
        last = generator_resource(resources, journal, "last")
        async with resources.open() as app_scope:
            with pytest.raises(ReleaseFailed) as caught:
                async with app_scope.child() as scope:
                    for res in (first, broken, last):
                        await scope.get(res)
        assert journal.open == set()
        assert [type(e) for e in caught.value.exceptions] == [OSError]
        assert "'broken'" in str(caught.value)

    async def test_several_failures_are_reported_together(self) -> None:
        """Every failing release is in the group, each noted with its resource."""
        resources = Resources()
        journal = Journal()
        a = generator_resource(resources, journal, "a", fail_release=OSError("a"))
        b = generator_resource(resources, journal, "b", fail_release=RuntimeError("b"))
        async with resources.open() as app_scope:
            with pytest.raises(ReleaseFailed) as caught:
                async with app_scope.child() as scope:
                    await scope.get(a)
                    await scope.get(b)
        errors = caught.value.exceptions
        assert [str(e) for e in errors] == ["b", "a"]
        assert errors[0].__notes__ == ["while releasing resource 'b'"]

    async def test_failures_are_logged_with_the_resource_name(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Each failure is logged naming its resource."""
        resources = Resources()
        journal = Journal()
        res = generator_resource(resources, journal, "db", fail_release=OSError("x"))
        caplog.set_level(logging.ERROR, "scoped_resources")
        async with resources.open() as app_scope:
            with pytest.raises(ReleaseFailed):
                async with app_scope.child() as scope:
                    await scope.get(res)
        assert "releasing resource 'db' failed" in caplog.text

    async def test_the_scope_error_wins_over_release_failures(self) -> None:
        """When the work failed too, its own exception is raised, with a note."""
        resources = Resources()
        journal = Journal()
        res = generator_resource(resources, journal, "db", fail_release=OSError("x"))
        async with resources.open() as app_scope:
            with pytest.raises(LookupError) as caught:
                async with app_scope.child() as scope:
                    await scope.get(res)
                    raise LookupError("handler")
        assert any("'db' also failed" in n for n in caught.value.__notes__)

    async def test_a_hanging_release_is_terminated_at_its_deadline(self) -> None:
        """Past release_timeout the release is cancelled and the terminate hook runs."""
        resources = Resources()
        terminated: list[str] = []
        journal = Journal()
        after = generator_resource(resources, journal, "after")

        @resources.request(release_timeout=0.05, terminate=terminated.append)
        async def stuck() -> AsyncIterator[str]:
            yield "conn"
            await anyio.sleep_forever()

        async with resources.open() as app_scope:
            with pytest.raises(ReleaseFailed) as caught:
                async with app_scope.child() as scope:
                    await scope.get(after)
                    await scope.get(stuck)
        assert terminated == ["conn"]
        assert journal.events == ["acquire after", "release after"]
        (error,) = caught.value.exceptions
        assert isinstance(error, ReleaseTimeout)
        assert error.terminated

    async def test_a_release_that_fails_by_itself_is_not_terminated(self) -> None:
        """A release that ran to its end and raised is reported, not hard-closed."""
        resources = Resources()
        terminated: list[str] = []

        @resources.request(terminate=terminated.append)
        async def refused_commit() -> AsyncIterator[str]:
            yield "conn"
            raise OSError("COMMIT refused")

        async with resources.open() as app_scope:
            with pytest.raises(ReleaseFailed):
                async with app_scope.child() as scope:
                    await scope.get(refused_commit)
        assert terminated == []


class TestMisuse:
    """Mistakes are caught with an error that names the resource and the fix."""

    async def test_a_forgotten_await_is_reported(self) -> None:
        """A factory handing back a coroutine is an error naming the resource."""
        resources = Resources()

        async def connect() -> str:
            return "conn"

        @resources.request
        def client() -> Any:
            return connect()  # the forgotten await

        async with resources.open() as app_scope, app_scope.child() as scope:
            with pytest.raises(ResourceMisuse, match="'client'.*un-awaited coroutine"):
                await scope.get(client)

    async def test_a_generator_yielding_a_coroutine_is_reported_and_closed(self) -> None:
        """A generator that yields an un-awaited coroutine is refused, and still released."""
        resources = Resources()
        closed: list[str] = []

        async def connect() -> str:
            return "conn"

        @resources.request
        async def client() -> AsyncIterator[Any]:
            try:
                yield connect()  # the forgotten await
            finally:
                closed.append("client")

        async with resources.open() as app_scope:
            with pytest.raises(ResourceMisuse, match="'client'.*un-awaited coroutine"):
                await as_a_request(getting(app_scope, client))
        assert closed == ["client"]

    async def test_a_generator_that_yields_twice_fails_its_release(self) -> None:
        """Yielding more than once is reported at release."""
        resources = Resources()

        @resources.request
        async def twice() -> AsyncIterator[int]:
            yield 1
            yield 2

        async with resources.open() as app_scope:
            with pytest.raises(ReleaseFailed, match="'twice'"):
                await getting(app_scope, twice)()
            with pytest.raises(ReleaseFailed, match="'twice'"):
                await as_a_request(getting(app_scope, twice))

    async def test_a_generator_that_never_yields_is_reported(self) -> None:
        """A generator ending before its yield is an acquire error naming it."""
        resources = Resources()

        @resources.request
        async def empty() -> AsyncIterator[int]:
            if False:
                yield 1

        async with resources.open() as app_scope:
            with pytest.raises(ResourceMisuse, match="'empty'.*without yielding"):
                await getting(app_scope, empty)()
            with pytest.raises(ResourceMisuse, match="'empty'.*without yielding"):
                await as_a_request(getting(app_scope, empty))

    async def test_a_closed_scope_refuses_to_hand_out_resources(self) -> None:
        """Using a scope after it closed raises ScopeClosed naming the resource."""
        resources = Resources()
        journal = Journal()
        res = generator_resource(resources, journal, "conn")
        async with resources.open() as app_scope:
            async with app_scope.child("job") as scope:
                pass
            with pytest.raises(ScopeClosed, match="'conn' from scope 'job'"):
                await scope.get(res)

    async def test_a_get_awaited_after_its_scope_closed_acquires_nothing(self) -> None:
        """A get handed out while the scope was open, awaited after it closed, is refused."""
        resources = Resources()
        journal = Journal()
        res = generator_resource(resources, journal, "conn")
        async with resources.open() as app_scope:
            async with app_scope.child("job") as scope:
                pending = scope.get(res)
            with pytest.raises(ScopeClosed, match="'conn' from scope 'job'"):
                await pending
        assert journal.events == []

    async def test_an_acquire_past_its_deadline_raises_resource_busy(self) -> None:
        """acquire_timeout bounds the wait and names the resource."""
        resources = Resources()

        @resources.request(acquire_timeout=0.02)
        async def exhausted() -> str:
            await anyio.sleep_forever()
            return "never"

        async with resources.open() as app_scope, app_scope.child() as scope:
            with pytest.raises(ResourceBusy, match="'exhausted'.*0.02 s") as caught:
                await scope.get(exhausted)
        assert caught.value.waited == 0.02

    async def test_a_collected_open_scope_warns(self) -> None:
        """A scope garbage-collected with instances open emits a ResourceWarning.

        Its app scope keeps an open scope until it closes, so the two can only be
        collected together: here an app scope dropped while a request is open.
        """
        resources = Resources()

        class Leaky:
            async def __aenter__(self) -> Leaky:
                return self

            async def __aexit__(self, *exc_info: object) -> None:
                return None

        leaky = resources.request(Leaky)
        app_scope = AppScope("app", resources.plan(), None)
        scope = app_scope.child("forgotten")
        await scope.get(leaky)
        with pytest.warns(ResourceWarning, match="'forgotten'.*'Leaky'"):
            del scope, app_scope
            gc.collect()

    async def test_a_closed_scope_is_collected_without_a_warning(self) -> None:
        """Closed scopes, and their app scope, leave nothing to warn about."""
        resources = Resources()
        value = generator_resource(resources, Journal(), "value")
        app_scope = AppScope("app", resources.plan(), None)
        async with app_scope, app_scope.child("tidy") as scope:
            await scope.get(value)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            del scope, app_scope
            gc.collect()


class TestFactories:
    """Every kind of factory works, and the library enters what needs entering."""

    async def test_asynccontextmanager_function(self) -> None:
        """An @asynccontextmanager function is entered and exited."""
        resources = Resources()
        journal = Journal()

        @resources.request
        @asynccontextmanager
        async def cm() -> AsyncIterator[str]:
            journal.add("enter")
            yield "v"
            journal.add("exit")

        async with resources.open() as app_scope, app_scope.child() as scope:
            assert await scope.get(cm) == "v"
        assert journal.events == ["enter", "exit"]

    async def test_a_function_returning_a_context_manager_is_entered(self) -> None:
        """A plain function's async context manager result is entered for the scope."""
        resources = Resources()
        journal = Journal()

        class Client:
            async def __aenter__(self) -> str:
                journal.add("open")
                return "client"

            async def __aexit__(self, *exc_info: object) -> None:
                journal.add("close")

        @resources.app
        def client() -> Client:
            return Client()

        async with resources.open() as app_scope:
            assert await app_scope.get(client) == "client"
        assert journal.events == ["open", "close"]

    async def test_an_instance_with_aenter_is_entered_per_scope(self) -> None:
        """An object with __aenter__/__aexit__ can itself be declared."""
        resources = Resources()
        journal = Journal()

        class Service:
            async def __aenter__(self) -> Service:
                journal.add("enter")
                return self

            async def __aexit__(self, *exc_info: object) -> None:
                journal.add("exit")

        service = Service()
        res = resources.app(service, name="service")
        async with resources.open() as app_scope:
            assert await app_scope.get(res) is service
        assert journal.events == ["enter", "exit"]

    async def test_values_and_defaults_fill_parameters(self) -> None:
        """provide() supplies values by type; defaults are kept."""
        resources = Resources()

        class Settings:
            url = "sqlite://"

        resources.provide(Settings())

        @resources.app
        def engine(settings: Settings, echo: bool = False) -> str:
            return f"{settings.url} echo={echo}"

        async with resources.open() as app_scope:
            assert await app_scope.get(engine) == "sqlite:// echo=False"

    async def test_the_decorated_function_can_still_be_called(self) -> None:
        """A Resource calls its factory when called, so helpers stay reusable."""
        resources = Resources()

        @resources.app
        def answer() -> int:
            return 42

        assert answer() == 42


async def as_a_request(work: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run *work* as a server runs a request: on asyncio, in a task no anyio scope reaches.

    That is where deadlines sit on the loop's wheel and the acquire and release
    steps run flat; elsewhere (trio, inside the app scope's task group) they run
    under anyio cancel scopes.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio
        await work()
        return
    await loop.create_task(work())


def getting(app_scope: Any, resource: Any) -> Callable[[], Coroutine[Any, Any, None]]:
    """A request of one child scope asking for *resource*."""

    async def use() -> None:
        async with app_scope.child() as scope:
            await scope.get(resource)

    return use
