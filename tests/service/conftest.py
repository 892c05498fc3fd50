"""Fixtures for the reference service: one suite, two backends.

``backend`` is ``embedded`` (SQLite file, in-process cache, no broker) or
``real`` (PostgreSQL, Redis and RabbitMQ on 127.0.0.1). The real backend gets a
database, a Redis key prefix and a RabbitMQ exchange of its own for the session,
and removes them at the end.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import httpx
import pytest
import redis.asyncio
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from scoped_resources.testing import AppLifespan
from service import Settings, create_app
from service.database import engine_options

BACKENDS = ["embedded", "real"]
PROBLEM = "application/problem+json"


@dataclass(frozen=True)
class RealServices:
    """The session's share of the real servers."""

    database_url: str
    redis_url: str
    amqp_url: str
    exchange: str


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def create_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _delete_exchange(amqp_url: str, exchange: str) -> None:
    conn = await aio_pika.connect(amqp_url)
    try:
        channel = await conn.channel()
        await channel.exchange_delete(exchange)
    finally:
        await conn.close()


async def delete_keys(redis_url: str, pattern: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=pattern)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def events_exchange(amqp_url: str) -> Iterator[str]:
    """A RabbitMQ exchange name of this session's own, deleted at the end."""
    exchange = f"sr-service-test-{uuid.uuid4().hex[:8]}"
    yield exchange
    asyncio.run(_delete_exchange(amqp_url, exchange))


@pytest.fixture(scope="session")
def real_services(
    pg_dsn: str, redis_url: str, amqp_url: str, events_exchange: str
) -> Iterator[RealServices]:
    """A fresh PostgreSQL database (dropped after the session) and the real servers."""
    name = f"sr_service_test_{os.getpid()}"
    asyncio.run(create_database(pg_dsn, name))
    try:
        yield RealServices(with_database(pg_dsn, name), redis_url, amqp_url, events_exchange)
    finally:
        asyncio.run(drop_database(pg_dsn, name))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend this test runs on."""
    return str(request.param)


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[SettingsFactory]:
    """Builds settings for *backend*; keyword arguments override fields."""
    prefix = f"sr-test:{uuid.uuid4().hex[:12]}:"
    base: dict[str, Any] = {
        "files_dir": tmp_path / "files",
        "cache_prefix": prefix,
        "outbox_poll_seconds": 0.2,
        # A full collection of the test process at every app start would cost far more
        # than it saves here; TestHeapFreeze and the subprocess tests keep the default.
        "gc_freeze": False,
        "_env_file": None,
    }
    real: RealServices | None = None
    if backend == "embedded":
        base["database_url"] = f"sqlite:///{tmp_path / 'service.db'}"
    else:
        real = request.getfixturevalue("real_services")
        base.update(
            database_url=real.database_url,
            redis_url=real.redis_url,
            amqp_url=real.amqp_url,
            events_exchange=real.exchange,
        )

    def make(**overrides: Any) -> Settings:
        return Settings(**{**base, **overrides})

    yield make
    if real is not None:
        asyncio.run(delete_keys(real.redis_url, prefix + "*"))


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    """The default settings for the backend under test."""
    return make_settings()


@dataclass
class Running:
    """An app running in this process (lifespan entered) and a client for it."""

    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    @property
    def engine(self) -> AsyncEngine:
        """A separate engine on the app's database, for looking behind the API."""
        return _engine_for(self.settings)


def _engine_for(settings: Settings) -> AsyncEngine:
    # The service's driver options (those for PgBouncer among them), not its pool size.
    connect_args = engine_options(settings).get("connect_args", {})
    return create_async_engine(settings.database_url, connect_args=connect_args)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Running]:
    """Start an app for *settings* (lifespan and all) and a client talking to it.

    For tests that need settings of their own; the ``service`` fixture uses the
    plugin's ``app_lifespan`` and ``client`` fixtures instead.
    """
    app = create_app(settings)
    async with AppLifespan(app) as lifespan, lifespan.client(base_url="http://service") as http:
        yield Running(app, http, settings)


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    """The app under test, for the scoped-resources plugin's fixtures."""
    return create_app(settings)


@pytest.fixture
def service(
    app: FastAPI, app_lifespan: AppLifespan, client: httpx.AsyncClient, settings: Settings
) -> Running:
    """The service on the backend under test, with default settings.

    Its lifespan and client come from the scoped-resources pytest plugin, which
    also fails the test if a request leaves a scope open.
    """
    return Running(app, client, settings)


async def scalar(settings: Settings, sql: str, **params: Any) -> Any:
    """Run one query on the service's database (behind its back) and return one value."""
    engine = _engine_for(settings)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(text(sql), params)).scalar()
    finally:
        await engine.dispose()


_SQLITE_POISON = [
    "CREATE TABLE commit_guard (ref INTEGER REFERENCES items(id) DEFERRABLE INITIALLY DEFERRED)",
    "CREATE TRIGGER poison AFTER INSERT ON items WHEN NEW.name = 'poison' "
    "BEGIN INSERT INTO commit_guard VALUES (-1); END",
]
_SQLITE_CURE = ["DROP TRIGGER poison", "DROP TABLE commit_guard"]
_PG_POISON = [
    "CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'commit refused by the test'; END $$",
    "CREATE CONSTRAINT TRIGGER poison AFTER INSERT ON items DEFERRABLE INITIALLY DEFERRED "
    "FOR EACH ROW WHEN (NEW.name = 'poison') EXECUTE FUNCTION refuse_commit()",
]
_PG_CURE = ["DROP TRIGGER poison ON items", "DROP FUNCTION refuse_commit()"]


async def _execute(settings: Settings, statements: list[str]) -> None:
    engine = _engine_for(settings)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture
async def commit_fails_for_poison(service: Running) -> AsyncIterator[None]:
    """Makes the COMMIT of any transaction that inserted an item named 'poison' fail.

    A deferred check runs at COMMIT: a constraint trigger on PostgreSQL, a deferred
    foreign key on SQLite. Every statement before the COMMIT succeeds.
    """
    sqlite = service.settings.is_sqlite
    await _execute(service.settings, _SQLITE_POISON if sqlite else _PG_POISON)
    try:
        yield
    finally:
        await _execute(service.settings, _SQLITE_CURE if sqlite else _PG_CURE)
