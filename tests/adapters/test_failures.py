"""The outage classification and the traceback limiter, on errors raised by the real drivers."""

from __future__ import annotations

import errno
import logging
import socket
import uuid
from collections.abc import AsyncIterator

import aiormq.exceptions
import asyncpg
import asyncpg.exceptions
import pytest
import redis.asyncio
import redis.exceptions
import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from scoped_resources._failures import (
    TracebackLimiter,
    cause_of,
    current_route,
    log_failure,
    mark_outage,
    outage_of,
)
from scoped_resources.exceptions import ReleaseFailed, ReleaseTimeout
from scoped_resources.fastapi import outage_of as public_outage_of

pytestmark = pytest.mark.anyio


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _raised(coro: object) -> BaseException:
    try:
        await coro  # type: ignore[misc]
    except Exception as err:
        return err
    raise AssertionError("the call did not fail")


@pytest.fixture
async def pg_table(pg_dsn: str) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A connection and a table of this test's own with a unique and a check constraint."""
    conn = await asyncpg.connect(pg_dsn)
    name = f"sr_fail_{uuid.uuid4().hex[:8]}"
    await conn.execute(
        f"CREATE TABLE {name} (id int CONSTRAINT {name}_key UNIQUE,"
        f" n int CONSTRAINT {name}_positive CHECK (n > 0))"
    )
    try:
        yield conn, name
    finally:
        await conn.execute(f"DROP TABLE {name}")
        await conn.close()


class TestOutages:
    """Errors that mean a server went away are outages, with the kind of server named."""

    async def test_a_refused_postgres_connection_is_a_database_outage(self) -> None:
        """asyncpg connecting to a closed port: a connection outage."""
        err = await _raised(asyncpg.connect(host="127.0.0.1", port=_closed_port(), timeout=5))
        assert outage_of(err) is not None

    async def test_a_refused_connection_through_sqlalchemy_is_an_outage(self) -> None:
        """SQLAlchemy passes the refused socket through unwrapped: a connection outage."""
        engine = create_async_engine(f"postgresql+asyncpg://u@127.0.0.1:{_closed_port()}/x")
        try:
            err = await _raised(engine.connect().__aenter__())
        finally:
            await engine.dispose()
        assert isinstance(err, ConnectionRefusedError)
        assert outage_of(err) == "connection"

    def test_postgres_starting_up_or_shutting_down_is_an_outage(self) -> None:
        """57P03 (starting up, shutting down), 57P01 and class 08 errors are outages."""
        for err in (
            asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
            asyncpg.exceptions.AdminShutdownError("terminating connection"),
            asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
            asyncpg.exceptions.TooManyConnectionsError("too many clients"),
        ):
            assert outage_of(err) == "database", type(err).__name__

    def test_a_driver_error_wrapped_by_sqlalchemy_is_classified_by_its_cause(self) -> None:
        """A DBAPIError whose cause is CannotConnectNowError is a database outage."""
        with pytest.raises(sqlalchemy.exc.DBAPIError) as raised:
            try:
                raise asyncpg.exceptions.CannotConnectNowError("shutting down")
            except asyncpg.exceptions.CannotConnectNowError as inner:
                raise sqlalchemy.exc.DBAPIError("connect", None, inner) from inner
        assert outage_of(raised.value) == "database"

    async def test_a_refused_redis_connection_is_a_cache_outage(self) -> None:
        """redis-py's ConnectionError is a cache outage."""
        client = redis.asyncio.Redis(host="127.0.0.1", port=_closed_port())
        try:
            err = await _raised(client.ping())
        finally:
            await client.aclose()
        assert isinstance(err, redis.exceptions.ConnectionError)
        assert outage_of(err) == "cache"

    def test_release_timeouts_and_groups_of_outages_are_outages(self) -> None:
        """A ReleaseTimeout, and a ReleaseFailed holding one, are outages."""
        timeout = ReleaseTimeout("tx", 1.0, terminated=True)
        assert outage_of(timeout) == "connection"
        assert outage_of(ReleaseFailed("request", [timeout])) == "connection"

    def test_marked_errors_network_errnos_and_invalidated_connections_are_outages(self) -> None:
        """An adapter's mark, an OSError with a network errno, connection_invalidated."""
        marked = RuntimeError("another operation is in progress")
        assert outage_of(marked) is None
        mark_outage(marked, "database")
        assert outage_of(marked) is not None
        assert outage_of(OSError(errno.ENETUNREACH, "Network is unreachable")) == "connection"
        invalidated = sqlalchemy.exc.DBAPIError("SELECT 1", None, RuntimeError("gone"))
        invalidated.connection_invalidated = True
        assert outage_of(invalidated) == "database"

    def test_a_closed_broker_channel_is_a_broker_outage(self) -> None:
        """aiormq's ChannelInvalidStateError (a RuntimeError) is a broker outage."""
        err = aiormq.exceptions.ChannelInvalidStateError("writer is None")
        assert outage_of(err) == "broker"

    def test_file_errors_are_not_outages(self) -> None:
        """A missing file or a full disk is not a server going away."""
        assert outage_of(FileNotFoundError(2, "No such file")) is None
        assert outage_of(PermissionError(13, "denied")) is None
        assert outage_of(ValueError("bad")) is None

    def test_the_public_name_is_the_same_function(self) -> None:
        """scoped_resources.fastapi.outage_of is the shared classification."""
        assert public_outage_of is outage_of


class TestRefusals:
    """A constraint or data error is never an outage, and its cause names it."""

    async def test_a_unique_violation_is_not_an_outage_and_names_its_constraint(
        self, pg_table: tuple[asyncpg.Connection, str]
    ) -> None:
        """The cause of a duplicate key names the violated constraint."""
        conn, table = pg_table
        await conn.execute(f"INSERT INTO {table} VALUES (1, 1)")
        err = await _raised(conn.execute(f"INSERT INTO {table} VALUES (1, 1)"))
        assert outage_of(err) is None
        assert cause_of(err) == f"UniqueViolationError (23505) on constraint '{table}_key'"

    async def test_a_check_violation_through_sqlalchemy_names_its_constraint(
        self, pg_dsn: str, pg_table: tuple[asyncpg.Connection, str]
    ) -> None:
        """SQLAlchemy's IntegrityError: the cause is the driver's, with the constraint."""
        _, table = pg_table
        engine = create_async_engine(pg_dsn.replace("postgresql://", "postgresql+asyncpg://"))
        try:
            async with engine.connect() as conn:
                err = await _raised(conn.execute(text(f"INSERT INTO {table} VALUES (2, -1)")))
        finally:
            await engine.dispose()
        assert isinstance(err, sqlalchemy.exc.IntegrityError)
        assert outage_of(err) is None
        assert cause_of(err).endswith(f"(23514) on constraint '{table}_positive'")


class TestTracebackLimiter:
    """One traceback per distinct cause per window."""

    def test_the_same_cause_is_let_through_once_per_window(self) -> None:
        """A hundred errors of one shape: one traceback, then one again after the window."""
        now = [0.0]
        limiter = TracebackLimiter(window=60.0, clock=lambda: now[0])
        allowed = [limiter.allow("tx", ValueError(f"row {i} refused")) for i in range(100)]
        assert allowed == [True] + [False] * 99
        now[0] = 60.0
        assert limiter.allow("tx", ValueError("row 7 refused"))

    def test_a_different_resource_type_or_message_shape_is_a_new_cause(self) -> None:
        """Each distinct (resource, type, shape) gets its own first traceback."""
        limiter = TracebackLimiter(clock=lambda: 0.0)
        assert limiter.allow("tx", ValueError("row 1 refused"))
        assert limiter.allow("db", ValueError("row 1 refused"))
        assert limiter.allow("tx", KeyError("row 1 refused"))
        assert limiter.allow("tx", ValueError("no such table"))
        assert not limiter.allow("tx", ValueError("row 2 refused"))

    def test_it_remembers_a_bounded_number_of_causes(self) -> None:
        """Past max_keys the oldest cause is forgotten."""
        limiter = TracebackLimiter(max_keys=2, clock=lambda: 0.0)
        assert limiter.allow("a", ValueError("x"))
        assert limiter.allow("b", ValueError("x"))
        assert limiter.allow("c", ValueError("x"))
        assert limiter.allow("a", ValueError("x"))  # forgotten, so shown again


class TestLogFailure:
    """One record per failure, at the level its meaning asks for."""

    def test_levels_and_fields(self, caplog: pytest.LogCaptureFixture) -> None:
        """An outage and a refusal are WARNING, a bug ERROR; each names resource, route, cause."""
        logger = logging.getLogger("test_failures")
        limiter = TracebackLimiter(clock=lambda: 0.0)
        token = current_route.set("POST /items")
        try:
            with caplog.at_level(logging.INFO, logger="test_failures"):
                log_failure(logger, "releasing", "tx", ConnectionResetError(104, "reset"),
                            limiter=limiter)  # fmt: skip
                log_failure(logger, "releasing", "tx", asyncpg.exceptions.UniqueViolationError(
                    "dup"), limiter=limiter)  # fmt: skip
                for _ in range(3):
                    log_failure(logger, "releasing", "tx", ZeroDivisionError("boom"),
                                limiter=limiter)  # fmt: skip
        finally:
            current_route.reset(token)
        levels = [r.levelname for r in caplog.records]
        assert levels == ["WARNING", "WARNING", "ERROR", "ERROR", "ERROR"]
        first = caplog.records[0]
        assert (first.resource, first.route, first.outage) == ("tx", "POST /items", "connection")  # type: ignore[attr-defined]
        assert "POST /items" in first.getMessage()
        assert "'tx'" in first.getMessage()
        bug_tracebacks = [r.exc_info is not None for r in caplog.records[2:]]
        assert bug_tracebacks == [True, False, False]

    def test_nothing_is_logged_below_the_loggers_level(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A logger set to CRITICAL gets no record (and the limiter is not consumed)."""
        logger = logging.getLogger("test_failures_quiet")
        limiter = TracebackLimiter(clock=lambda: 0.0)
        with caplog.at_level(logging.CRITICAL, logger="test_failures_quiet"):
            log_failure(logger, "releasing", "tx", ZeroDivisionError("boom"), limiter=limiter)
        assert caplog.records == []
        assert limiter.allow("tx", ZeroDivisionError("boom"))

    def test_every_traceback_at_debug(self, caplog: pytest.LogCaptureFixture) -> None:
        """With DEBUG enabled every record carries its traceback."""
        logger = logging.getLogger("test_failures_debug")
        limiter = TracebackLimiter(clock=lambda: 0.0)
        with caplog.at_level(logging.DEBUG, logger="test_failures_debug"):
            for _ in range(3):
                log_failure(logger, "releasing", "tx", ZeroDivisionError("boom"), limiter=limiter)
        assert [r.exc_info is not None for r in caplog.records] == [True, True, True]
