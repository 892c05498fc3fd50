"""The plan: the graph is checked when the app starts, never at the first request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import pytest

from scoped_resources import Resources, Use
from scoped_resources.exceptions import (
    DependencyCycle,
    MissingDependency,
    ResourceMisuse,
    ScopeViolation,
)

_cyclic = Resources("cyclic")


@_cyclic.request
def first(x: Annotated[int, Use(second)]) -> int:  # a forward reference, resolved at plan time
    return x


@_cyclic.request
def second(x: Annotated[int, Use(first)]) -> int:
    return x


class TestGraphErrors:
    """Unsound declarations fail the plan with an error naming both ends."""

    def test_a_cycle_is_reported_with_its_path(self) -> None:
        """Resources depending on each other in a cycle name the whole cycle."""
        with pytest.raises(DependencyCycle, match="'first' -> 'second' -> 'first'"):
            _cyclic.plan()

    def test_a_missing_value_names_the_resource_and_parameter(self) -> None:
        """A parameter nothing provides is named with the way to fix it."""
        resources = Resources()

        class Settings:
            pass

        @resources.app
        def pool(settings: Settings) -> int:
            return 1

        with pytest.raises(MissingDependency, match="'pool' needs Settings.*'settings'"):
            resources.plan()

    def test_a_resource_of_another_registry_is_refused(self) -> None:
        """Depending on another registry's resource is a plan error."""
        first, second = Resources("first"), Resources("second")

        @first.app
        def pool() -> int:
            return 1

        @second.request
        def conn(p: Annotated[int, Use(pool)]) -> int:
            return p

        with pytest.raises(MissingDependency, match="another Resources registry"):
            second.plan()

    def test_an_app_resource_cannot_use_a_request_resource(self) -> None:
        """A longer-lived resource depending on a shorter-lived one names both."""
        resources = Resources()

        @resources.request
        def conn() -> int:
            return 1

        @resources.app
        def cache(c: Annotated[int, Use(conn)]) -> int:
            return c

        with pytest.raises(ScopeViolation, match="'cache' depends on request-scoped.*'conn'"):
            resources.plan()

    def test_an_after_response_resource_cannot_use_a_before_response_one(self) -> None:
        """A resource held until the response is sent cannot use one released before it."""
        resources = Resources()

        @resources.request
        def tx() -> int:
            return 1

        @resources.request(release="after_response")
        def stream(t: Annotated[int, Use(tx)]) -> int:
            return t

        with pytest.raises(ScopeViolation, match="'stream'.*'tx'"):
            resources.plan()


class TestMisuseAtDeclaration:
    """Declarations that cannot be safe are refused early."""

    def test_an_unshareable_type_cannot_be_app_scoped(self) -> None:
        """A connection type declared app-scoped would be raced on by requests."""
        import asyncpg

        resources = Resources()

        @resources.app
        async def conn() -> AsyncIterator[asyncpg.Connection]:
            yield None

        with pytest.raises(ResourceMisuse, match="'conn'.*asyncpg.connection.Connection"):
            resources.plan()

    def test_a_sync_generator_is_refused(self) -> None:
        """A sync generator cannot release asynchronously."""
        resources = Resources()

        def gen() -> Any:
            yield 1

        with pytest.raises(ResourceMisuse, match="'gen'.*async generator"):
            resources.request(gen)

    def test_a_name_is_declared_once(self) -> None:
        """Two resources with one name are refused."""
        resources = Resources()

        @resources.app
        def pool() -> int:
            return 1

        with pytest.raises(ResourceMisuse, match="'pool'.*already declared"):
            resources.app(name="pool")(lambda: 2)

    def test_release_takes_only_known_values(self) -> None:
        """An unknown release mode is a ValueError naming the choices."""
        resources = Resources()
        with pytest.raises(ValueError, match="before_response"):
            resources.request(release="later")  # type: ignore[call-overload]

    def test_use_takes_only_declared_resources(self) -> None:
        """Use() of a plain function explains how to declare it."""

        def db() -> None:
            return None

        with pytest.raises(TypeError, match="declare it with @resources"):
            Use(db)  # type: ignore[arg-type]

    def test_a_non_callable_is_refused(self) -> None:
        """Declaring something that is neither callable nor a context manager fails."""
        resources = Resources()
        with pytest.raises(ResourceMisuse, match="neither callable"):
            resources.app(42, name="answer")  # type: ignore[call-overload]

    def test_string_annotations_of_local_names_resolve(self) -> None:
        """Annotations naming locals of the declaring function are resolved."""
        resources = Resources()

        class Local:
            pass

        resources.provide(Local())

        @resources.app
        def thing(value: Local) -> Local:
            return value

        plan = resources.plan()
        assert plan.app_order == (thing,)
