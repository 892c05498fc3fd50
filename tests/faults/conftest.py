"""Fixtures of the fault suite: a database, a Redis prefix and a settings base of each test's own.

Every fault test is marked ``faults`` (registered here, so that ``--strict-markers``
accepts it even before ``pyproject.toml`` lists it): ``pytest -m faults``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio

from scoped_resources.testing import (
    TempPostgres,
    create_postgres_database,
    drop_postgres_database,
)


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``faults`` marker."""
    config.addinivalue_line(
        "markers", "faults: black-box fault scenarios against the service process"
    )


@pytest.fixture
async def fault_db(pg_dsn: str) -> AsyncIterator[TempPostgres]:
    """A fresh, empty PostgreSQL database (``sr_faults_<random>``), dropped afterwards."""
    db = await create_postgres_database(pg_dsn, prefix="sr_faults_")
    try:
        yield db
    finally:
        await drop_postgres_database(pg_dsn, db.name)


@pytest.fixture
async def cache_prefix(redis_url: str) -> AsyncIterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"sr-faults:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
def service_env(
    fault_db: TempPostgres, redis_url: str, cache_prefix: str, tmp_path: Path
) -> dict[str, str]:
    """The environment of a service on the test's database, Redis prefix and folder."""
    return {
        "DATABASE_URL": fault_db.dsn,
        "REDIS_URL": redis_url,
        "CACHE_PREFIX": cache_prefix,
        "FILES_DIR": str(tmp_path / "files"),
        "DB_POOL_SIZE": "10",
    }
