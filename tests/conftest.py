"""Shared fixtures: the anyio backend and the real services on 127.0.0.1.

An integration test asks for ``pg_dsn``, ``redis_url`` or ``amqp_url``. When the
service does not answer, the test is skipped on a developer's machine and fails
when ``SR_REQUIRE_SERVICES=1`` (as ``.ci/run`` sets it): CI never skips one.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

PG_DSN = os.environ.get("SR_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("SR_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        address = (parts.hostname or "127.0.0.1", parts.port or default_port)
        with socket.create_connection(address, 2):
            return True
    except OSError:
        return False


def _service(name: str, url: str, default_port: int) -> str:
    if _reachable(url, default_port):
        return url
    message = f"{name} is not reachable at {url}"
    if os.environ.get("SR_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} (SR_REQUIRE_SERVICES=1: integration tests must not skip)")
    pytest.skip(message)


@pytest.fixture
def anyio_backend() -> str:
    """Integration tests run on asyncio: the drivers (asyncpg, aio-pika) need it."""
    return "asyncio"


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """The DSN of the real PostgreSQL test database."""
    return _service("PostgreSQL", PG_DSN, 5432)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of the real Redis server."""
    return _service("Redis", REDIS_URL, 6379)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The URL of the real RabbitMQ broker."""
    return _service("RabbitMQ", AMQP_URL, 5672)
