"""Typing is API: mypy --strict checks these assertions (and pytest runs them)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, assert_type

import anyio
import pytest

from scoped_resources import Resource, Resources, Scope, Use


class Pool:
    """Stands for a driver's pool."""


class Connection:
    """Stands for a driver's connection."""


resources = Resources("typing")


@resources.app
async def pool() -> AsyncIterator[Pool]:
    yield Pool()


@resources.request
@asynccontextmanager
async def connection(p: Annotated[Pool, Use(pool)]) -> AsyncIterator[Connection]:
    yield Connection()


@resources.request(acquire_timeout=1.0)
async def number() -> int:
    return 1


class Session:
    async def __aenter__(self) -> str:
        return "session"

    async def __aexit__(self, *exc_info: object) -> None:
        return None


session = resources.request(Session)


@resources.app
def settings() -> dict[str, str]:
    return {}


def test_declarations_carry_their_instance_type() -> None:
    """Each declaration is a Resource of what its factory produces."""
    assert_type(pool, Resource[Pool])
    assert_type(connection, Resource[Connection])
    assert_type(number, Resource[int])
    assert_type(session, Resource[str])
    assert_type(settings, Resource[dict[str, str]])


async def _route(conn: Annotated[Connection, Use(connection)]) -> Connection:
    assert_type(conn, Connection)
    return conn


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_scope_get_returns_the_instance_type() -> None:
    """scope.get(resource) is typed as the resource's instance type."""
    async with resources.open() as app_scope, app_scope.child() as scope:
        assert_type(scope, Scope)
        conn = await scope.get(connection)
        assert_type(conn, Connection)
        assert isinstance(await _route(conn), Connection)
        assert_type(await scope.get(number), int)
    await anyio.lowlevel.checkpoint()
