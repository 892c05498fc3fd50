"""The asyncpg adapter against the real PostgreSQL on 127.0.0.1."""


import logging
import socket
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, HTTPException

from scoped_resources import Resources, Use
from scoped_resources.adapters.postgres import Postgres
from scoped_resources.exceptions import ReleaseFailed, ReleaseTimeout, ResourceBusy, StartupFailed
from scoped_resources.testing import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.fixture
def app_name() -> str:
    """A unique application_name, to find this test's backends in pg_stat_activity."""
    return f"sr-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def admin(pg_dsn: str) -> AsyncIterator[Any]:
    """A connection outside the adapter, to set up and inspect the database."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def table(admin: Any) -> AsyncIterator[str]:
    """A table whose unique key is checked only at COMMIT; dropped afterwards."""
    name = f"sr_items_{uuid.uuid4().hex[:10]}"
    await admin.execute(
        f"CREATE TABLE {name} (id int, CONSTRAINT {name}_u UNIQUE (id) "
        "DEFERRABLE INITIALLY DEFERRED)"
    )
    try:
        yield name
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {name}")


def declare(dsn: str, app_name: str, **options: Any) -> tuple[Resources, Postgres]:
    resources = Resources("test", drain_timeout=options.pop("drain_timeout", 5.0))
    pg = Postgres(
        resources, dsn, server_settings={"application_name": app_name}, **options
    )
    return resources, pg


def via(proxy: TcpProxy, dsn: str) -> str:
    return dsn.replace(":5432/", f":{proxy.port}/")


async def backends(admin: Any, app_name: str) -> list[tuple[str, str]]:
    rows = await admin.fetch(
        "SELECT state, query FROM pg_stat_activity WHERE application_name = $1", app_name
    )
    return [(r["state"], r["query"]) for r in rows]


async def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait until the async *check* returns true (state owned by another process)."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.02)


async def assert_pool_healthy(resources: Resources, pg: Postgres, app_scope: Any, admin: Any,
                              app_name: str) -> None:
    pool = await app_scope.get(pg.pool)
    assert pool.get_idle_size() == pool.get_size()
    async with app_scope.child() as scope:
        conn = await scope.get(pg.connection)
        assert await conn.fetchval("SELECT 1") == 1

    async def settled() -> bool:
        states = [state for state, _ in await backends(admin, app_name)]
        return all(state == "idle" for state in states)

    await wait_for(settled)


def startup_failure(exc: BaseException) -> StartupFailed:
    """The StartupFailed in *exc* (the core currently wraps it in an ExceptionGroup)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    assert isinstance(exc, StartupFailed), repr(exc)
    return exc


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


class TestLifecycle:
    async def test_pool_opens_leases_and_closes_every_backend(
        self, pg_dsn: str, admin: Any, app_name: str
    ) -> None:
        """The pool opens with the app scope, lends a connection, and closes every backend."""
        resources, pg = declare(pg_dsn, app_name, min_size=2, max_size=2)
        async with resources.open() as app_scope:
            pool = await app_scope.get(pg.pool)
            assert pool.get_size() == 2
            async with app_scope.child() as scope:
                conn = await scope.get(pg.connection)
                assert await conn.fetchval("SELECT 41 + 1") == 42
                assert pool.get_idle_size() == 1
            assert pool.get_idle_size() == 2
            assert len(await backends(admin, app_name)) == 2

        async def gone() -> bool:
            return not await backends(admin, app_name)

        await wait_for(gone)

    async def test_connection_and_transaction_share_one_connection(
        self, pg_dsn: str, app_name: str
    ) -> None:
        """A scope asking for both the connection and the transaction gets one connection."""
        resources, pg = declare(pg_dsn, app_name)
        async with resources.open() as app_scope, app_scope.child() as scope:
            tx_conn = await scope.get(pg.transaction)
            conn = await scope.get(pg.connection)
            assert conn is tx_conn
            assert conn.is_in_transaction()

    async def test_resource_names_derive_from_the_name(self, pg_dsn: str) -> None:
        """Every resource is named after the adapter's name."""
        pg = Postgres(Resources("test"), pg_dsn, name="main")
        assert [pg.pool.name, pg.connection.name, pg.transaction.name] == [
            "main.pool",
            "main.connection",
            "main.transaction",
        ]

    async def test_statement_cache_can_be_disabled_for_pgbouncer(
        self, pg_dsn: str, app_name: str
    ) -> None:
        """statement_cache_size=0 reaches every connection of the pool."""
        resources, pg = declare(pg_dsn, app_name, statement_cache_size=0)
        async with resources.open() as app_scope, app_scope.child() as scope:
            conn = await scope.get(pg.connection)
            assert conn._con._stmt_cache.get_max_size() == 0
            assert await conn.fetchval("SELECT $1::int", 7) == 7


class TestAcquireTimeout:
    async def test_exhausted_pool_raises_resource_busy_naming_the_connection(
        self, pg_dsn: str, app_name: str
    ) -> None:
        """Past acquire_timeout an exhausted pool raises ResourceBusy for the connection."""
        resources, pg = declare(pg_dsn, app_name, max_size=1, acquire_timeout=0.2)
        async with resources.open() as app_scope, app_scope.child() as holder:
            await holder.get(pg.connection)
            async with app_scope.child() as scope:
                with pytest.raises(ResourceBusy) as caught:
                    await scope.get(pg.transaction)
            assert caught.value.resource == "postgres.connection"
            assert caught.value.waited == 0.2

    async def test_exhausted_pool_answers_503_with_retry_after(
        self, pg_dsn: str, app_name: str
    ) -> None:
        """A request that cannot get a connection in time gets 503 and Retry-After."""
        resources, pg = declare(pg_dsn, app_name, max_size=1, acquire_timeout=0.2)
        app = FastAPI(lifespan=resources.lifespan)
        held, done = anyio.Event(), anyio.Event()

        @app.get("/hold")
        async def hold(conn: Annotated[Any, Use(pg.connection)]) -> int:
            held.set()
            await done.wait()
            return int(await conn.fetchval("SELECT 1"))

        @app.get("/one")
        async def one(conn: Annotated[Any, Use(pg.connection)]) -> int:
            return int(await conn.fetchval("SELECT 1"))

        async with serve(app) as client, anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/hold")
            await held.wait()
            busy = await client.get("/one")
            done.set()
        assert busy.status_code == 503
        assert busy.headers["retry-after"] == "1"
        assert "postgres.connection" in busy.text


class TestPing:
    async def test_ping_succeeds_on_a_live_server(self, pg_dsn: str, app_name: str) -> None:
        """The pool's ping answers with no error while the server is up."""
        resources, _ = declare(pg_dsn, app_name)
        async with resources.open() as app_scope:
            assert await app_scope.ping(5.0) == {"postgres.pool": None}

    async def test_ping_fails_when_the_server_is_cut_off_and_recovers(
        self, pg_dsn: str, app_name: str
    ) -> None:
        """The ping reports an error while the network is cut, and none once restored."""
        async with TcpProxy("127.0.0.1", 5432) as proxy:
            resources, _ = declare(via(proxy, pg_dsn), app_name, ping_timeout=1.0)
            async with resources.open() as app_scope:
                proxy.cut()
                failed = await app_scope.ping(5.0)
                assert failed["postgres.pool"] is not None
                proxy.restore()
                assert await app_scope.ping(5.0) == {"postgres.pool": None}


class TestShutdown:
    async def test_shutdown_with_a_lease_out_is_bounded_and_terminates(
        self, pg_dsn: str, admin: Any, app_name: str
    ) -> None:
        """Closing the pool while a connection is leased gives up after close_timeout."""
        resources, pg = declare(pg_dsn, app_name, close_timeout=0.3, drain_timeout=0.1)
        scope = None
        with anyio.fail_after(5):
            with pytest.raises(ReleaseFailed) as caught:
                async with resources.open() as app_scope:
                    scope = app_scope.child()
                    await scope.get(pg.transaction)
        assert scope is not None
        with pytest.raises(ReleaseFailed):  # its connection was terminated under it
            await scope.aclose()
        [timeout] = caught.value.exceptions
        assert isinstance(timeout, ReleaseTimeout)
        assert timeout.resource == "postgres.pool"
        assert timeout.terminated

        async def gone() -> bool:
            return not await backends(admin, app_name)

        await wait_for(gone)


class TestCancellation:
    async def test_cancel_during_acquire_leaves_the_pool_intact(
        self, pg_dsn: str, admin: Any, app_name: str
    ) -> None:
        """A request cancelled while waiting for a connection takes no slot with it."""
        resources, pg = declare(pg_dsn, app_name, max_size=1)
        async with resources.open() as app_scope:
            async with app_scope.child() as holder:
                await holder.get(pg.connection)

                async def wait_for_connection() -> None:
                    async with app_scope.child() as scope:
                        await scope.get(pg.transaction)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait_for_connection)
                    await anyio.wait_all_tasks_blocked()
                    tg.cancel_scope.cancel()
            await assert_pool_healthy(resources, pg, app_scope, admin, app_name)

    async def test_cancel_during_begin_leaves_no_open_transaction(
        self, pg_dsn: str, admin: Any, app_name: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A cancel landing while BEGIN is in flight rolls back before the pool sees it."""
        async with TcpProxy("127.0.0.1", 5432) as proxy:
            resources, pg = declare(via(proxy, pg_dsn), app_name, max_size=1)
            async with resources.open() as app_scope:
                for _ in range(5):
                    async with app_scope.child() as scope:
                        await scope.get(pg.connection)  # the connection, without delay
                        proxy.delay = 0.05  # every round trip from here on is slow
                        with anyio.move_on_after(0.02):
                            await scope.get(pg.transaction)  # cancelled during BEGIN
                    proxy.delay = 0
                await assert_pool_healthy(resources, pg, app_scope, admin, app_name)
        assert "active transaction" not in caplog.text

    async def test_cancel_during_a_query_cancels_it_and_rolls_back(
        self, pg_dsn: str, admin: Any, app_name: str, table: str
    ) -> None:
        """A query cancelled mid-flight stops on the server and its transaction rolls back."""
        resources, pg = declare(pg_dsn, app_name, max_size=1)
        async with resources.open() as app_scope:

            async def slow() -> None:
                async with app_scope.child() as scope:
                    conn = await scope.get(pg.transaction)
                    await conn.execute(f"INSERT INTO {table} VALUES (1)")
                    await conn.execute("SELECT pg_sleep(30)")

            async def sleeping() -> bool:
                return any("pg_sleep" in q for s, q in await backends(admin, app_name)
                           if s == "active")

            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                await wait_for(sleeping)
                tg.cancel_scope.cancel()
            await assert_pool_healthy(resources, pg, app_scope, admin, app_name)
        assert await admin.fetchval(f"SELECT count(*) FROM {table}") == 0

    async def test_cancel_during_release_still_commits(
        self, pg_dsn: str, admin: Any, app_name: str, table: str
    ) -> None:
        """A cancel that lands while the COMMIT is in flight does not stop it."""
        async with TcpProxy("127.0.0.1", 5432) as proxy:
            resources, pg = declare(via(proxy, pg_dsn), app_name, max_size=1)
            releasing = anyio.Event()

            @resources.request
            async def marker(conn: Annotated[Any, Use(pg.transaction)]) -> AsyncIterator[Any]:
                yield conn
                releasing.set()  # released first: the COMMIT comes right after

            async with resources.open() as app_scope:

                async def write() -> None:
                    async with app_scope.child() as scope:
                        conn = await scope.get(marker)
                        await conn.execute(f"INSERT INTO {table} VALUES (1)")
                        proxy.delay = 0.1

                async with anyio.create_task_group() as tg:
                    tg.start_soon(write)
                    await releasing.wait()
                    tg.cancel_scope.cancel()
                proxy.delay = 0.0
                await assert_pool_healthy(resources, pg, app_scope, admin, app_name)
        assert await admin.fetchval(f"SELECT count(*) FROM {table}") == 1


class TestRelease:
    async def test_a_returned_connection_is_reset_for_the_next_lease(
        self, pg_dsn: str, admin: Any, app_name: str
    ) -> None:
        """Settings, advisory locks and LISTENs of one lease do not reach the next."""
        resources, pg = declare(pg_dsn, app_name, min_size=1, max_size=1)
        async with resources.open() as app_scope:
            async with app_scope.child() as scope:
                conn = await scope.get(pg.connection)
                await conn.execute("SET statement_timeout = '123s'")
                await conn.execute("SELECT pg_advisory_lock(4242)")
                await conn.execute("LISTEN sr_reset_test")
                first = await conn.fetchval("SELECT pg_backend_pid()")
            async with app_scope.child() as scope:
                conn = await scope.get(pg.connection)
                assert await conn.fetchval("SELECT pg_backend_pid()") == first
                assert await conn.fetchval("SHOW statement_timeout") == "0"
                assert await conn.fetchval("SELECT count(*) FROM pg_locks "
                                           "WHERE locktype = 'advisory'") == 0
                assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0

    @pytest.mark.parametrize("kind", ["connection", "transaction"])
    async def test_a_native_cancel_during_the_reset_terminates_the_connection(
        self, pg_dsn: str, admin: Any, app_name: str, kind: str
    ) -> None:
        """A reset interrupted by task.cancel() never lends that connection again.

        For a transaction the reset goes with its COMMIT: that round trip is the one cut.
        """
        import asyncio

        async with TcpProxy("127.0.0.1", 5432) as proxy:
            resources, pg = declare(via(proxy, pg_dsn), app_name, min_size=1, max_size=1)
            async with resources.open() as app_scope:
                first: list[int] = []
                slowed = asyncio.Event()

                async def lease() -> None:
                    async with app_scope.child() as scope:
                        conn = await scope.get(getattr(pg, kind))
                        await conn.execute("SET statement_timeout = '123s'")
                        first.append(await conn.fetchval("SELECT pg_backend_pid()"))
                        proxy.delay = 0.2  # the reset's round trip is slow
                        slowed.set()

                # A plain asyncio task (no anyio scope): the release is on the loop's
                # deadline wheel, and task.cancel() reaches it natively.
                task = asyncio.get_running_loop().create_task(lease())
                await slowed.wait()
                await asyncio.sleep(0.05)  # the reset is in flight
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                proxy.delay = 0.0
                async with app_scope.child() as scope:
                    conn = await scope.get(pg.connection)
                    assert await conn.fetchval("SELECT pg_backend_pid()") != first[0]
                    assert await conn.fetchval("SHOW statement_timeout") == "0"
                await assert_pool_healthy(resources, pg, app_scope, admin, app_name)

    async def test_without_the_direct_path_leases_go_back_through_pool_release(
        self, pg_dsn: str, admin: Any, app_name: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An asyncpg whose private layout moved gets the public Pool.release."""
        import scoped_resources.adapters.postgres as module

        monkeypatch.setattr(module, "_can_release_direct", lambda pool: False)
        resources, pg = declare(pg_dsn, app_name, min_size=1, max_size=1)
        async with resources.open() as app_scope:
            async with app_scope.child() as scope:
                conn = await scope.get(pg.connection)
                await conn.execute("SET statement_timeout = '123s'")
            assert pg._direct is False
            async with app_scope.child() as scope:
                conn = await scope.get(pg.connection)
                assert await conn.fetchval("SHOW statement_timeout") == "0"
            await assert_pool_healthy(resources, pg, app_scope, admin, app_name)


class TestCommitWithReset:
    """A transaction's COMMIT carries the pool's reset when nothing else can use the connection."""

    @staticmethod
    async def queries_of(app_scope: Any, pg: Postgres) -> list[str]:
        """Every query the pool's one connection runs from now on (asyncpg's query logger)."""
        pool = await app_scope.get(pg.pool)
        logged: list[str] = []
        async with pool.acquire() as conn:
            conn._con.add_query_logger(lambda record: logged.append(record.query))
        logged.clear()  # the release's own reset
        return logged

    async def test_commit_and_reset_go_in_one_round_trip(
        self, pg_dsn: str, app_name: str, table: str
    ) -> None:
        """The COMMIT is sent with the reset query; the connection's release sends nothing."""
        resources, pg = declare(pg_dsn, app_name, min_size=1, max_size=1)
        async with resources.open() as app_scope:
            logged = await self.queries_of(app_scope, pg)
            async with app_scope.child() as scope:
                conn = await scope.get(pg.transaction)
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
            await anyio.sleep(0.05)  # asyncpg calls query loggers soon, not at once
            assert logged[-1].startswith("COMMIT;\n")
            assert "RESET ALL" in logged[-1]
            assert [q for q in logged if "RESET ALL" in q] == [logged[-1]]

    async def test_the_next_lease_finds_the_connection_reset(
        self, pg_dsn: str, app_name: str, table: str
    ) -> None:
        """Settings and advisory locks taken in the transaction do not reach the next lease."""
        resources, pg = declare(pg_dsn, app_name, min_size=1, max_size=1)
        async with resources.open() as app_scope:
            async with app_scope.child() as scope:
                conn = await scope.get(pg.transaction)
                await conn.execute("SET statement_timeout = '123s'")
                await conn.execute("SELECT pg_advisory_lock(4243)")
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
            for _ in range(2):  # and the lease after it: the reset query came back
                async with app_scope.child() as scope:
                    conn = await scope.get(pg.connection)
                    assert await conn.fetchval("SHOW statement_timeout") == "0"
                    assert await conn.fetchval("SELECT count(*) FROM pg_locks "
                                               "WHERE locktype = 'advisory'") == 0
                    await conn.execute("SET statement_timeout = '7s'")
            async with app_scope.child() as scope:
                conn = await scope.get(pg.connection)
                assert await conn.fetchval("SHOW statement_timeout") == "0"
                assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 1

    async def test_a_failed_commit_is_reported_and_the_connection_still_reset(
        self, pg_dsn: str, app_name: str, table: str
    ) -> None:
        """A COMMIT refused by a deferred constraint fails the scope; the next lease is clean."""
        resources, pg = declare(pg_dsn, app_name, min_size=1, max_size=1)
        async with resources.open() as app_scope:
            with pytest.raises(ReleaseFailed) as caught:
                async with app_scope.child() as scope:
                    conn = await scope.get(pg.transaction)
                    await conn.execute("SET statement_timeout = '123s'")
                    await conn.execute(f"INSERT INTO {table} VALUES (1), (1)")
            assert isinstance(caught.value.exceptions[0], asyncpg.UniqueViolationError)
            async with app_scope.child() as scope:
                conn = await scope.get(pg.connection)
                assert await conn.fetchval("SHOW statement_timeout") == "0"
                assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0

    async def test_another_user_of_the_connection_keeps_the_separate_reset(
        self, pg_dsn: str, app_name: str, table: str
    ) -> None:
        """When another resource takes the connection, it could use it after the COMMIT."""
        resources, pg = declare(pg_dsn, app_name, min_size=1, max_size=1)

        @resources.request
        async def audit(conn: Annotated[Any, Use(pg.connection)]) -> AsyncIterator[None]:
            yield
            await conn.execute("SET statement_timeout = '9s'")  # after the COMMIT

        async with resources.open() as app_scope:
            logged = await self.queries_of(app_scope, pg)
            async with app_scope.child() as scope:
                await scope.get(audit)
                conn = await scope.get(pg.transaction)
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
            await anyio.sleep(0.05)  # asyncpg calls query loggers soon, not at once
            assert "COMMIT;" in logged
            assert logged[-1] != "COMMIT;"
            assert "RESET ALL" in logged[-1]
            async with app_scope.child() as scope:
                conn = await scope.get(pg.connection)
                assert await conn.fetchval("SHOW statement_timeout") == "0"


class TestTransactionOverHttp:
    @staticmethod
    def app(pg: Postgres, resources: Resources, table: str) -> FastAPI:
        app = FastAPI(lifespan=resources.lifespan)

        @app.post("/twice/{item}")
        async def twice(item: int, conn: Annotated[Any, Use(pg.transaction)]) -> str:
            await conn.execute(f"INSERT INTO {table} VALUES ($1), ($1)", item)
            return "inserted"

        @app.post("/fail/{item}")
        async def fail(item: int, conn: Annotated[Any, Use(pg.transaction)]) -> str:
            await conn.execute(f"INSERT INTO {table} VALUES ($1)", item)
            raise HTTPException(409, "changed my mind")

        @app.post("/ok/{item}")
        async def ok(item: int, conn: Annotated[Any, Use(pg.transaction)]) -> str:
            await conn.execute(f"INSERT INTO {table} VALUES ($1)", item)
            return "inserted"

        @app.post("/nested/{item}")
        async def nested(item: int, conn: Annotated[Any, Use(pg.transaction)]) -> str:
            await conn.execute(f"INSERT INTO {table} VALUES ($1)", item)
            try:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES ($1)", item + 1)
                    raise LookupError("undo the inner part only")
            except LookupError:
                pass
            return "inserted"

        return app

    async def test_commit_fails_before_the_response_with_500(
        self, pg_dsn: str, admin: Any, app_name: str, table: str
    ) -> None:
        """A COMMIT that fails on a deferred constraint answers 500 and stores nothing."""
        resources, pg = declare(pg_dsn, app_name)
        async with serve(self.app(pg, resources, table)) as client:
            response = await client.post("/twice/1")
        assert response.status_code == 500
        assert "postgres.transaction" in response.text
        assert await admin.fetchval(f"SELECT count(*) FROM {table}") == 0

    async def test_success_commits_before_the_response(
        self, pg_dsn: str, admin: Any, app_name: str, table: str
    ) -> None:
        """A successful request's rows are committed by the time the client reads the answer."""
        resources, pg = declare(pg_dsn, app_name)
        async with serve(self.app(pg, resources, table)) as client:
            response = await client.post("/ok/5")
            assert await admin.fetchval(f"SELECT id FROM {table}") == 5
        assert response.status_code == 200

    async def test_an_exception_rolls_back(
        self, pg_dsn: str, admin: Any, app_name: str, table: str
    ) -> None:
        """A route that raises leaves nothing behind and no transaction open."""
        resources, pg = declare(pg_dsn, app_name)
        async with serve(self.app(pg, resources, table)) as client:
            response = await client.post("/fail/3")
            assert [s for s, _ in await backends(admin, app_name)] == ["idle"]
        assert response.status_code == 409
        assert await admin.fetchval(f"SELECT count(*) FROM {table}") == 0

    async def test_nested_transaction_is_a_savepoint(
        self, pg_dsn: str, admin: Any, app_name: str, table: str
    ) -> None:
        """A failed nested block undoes only its own work; the outer one commits."""
        resources, pg = declare(pg_dsn, app_name)
        async with serve(self.app(pg, resources, table)) as client:
            response = await client.post("/nested/10")
        assert response.status_code == 200
        assert await admin.fetchval(f"SELECT array_agg(id) FROM {table}") == [10]


class TestReconnect:
    async def test_first_requests_after_a_cut_is_restored_succeed(
        self, pg_dsn: str, app_name: str
    ) -> None:
        """Connections killed by a network cut are replaced once the server is back."""
        async with TcpProxy("127.0.0.1", 5432) as proxy:
            resources, pg = declare(via(proxy, pg_dsn), app_name, min_size=2, max_size=2)
            app = FastAPI(lifespan=resources.lifespan)

            @app.get("/one")
            async def one(conn: Annotated[Any, Use(pg.transaction)]) -> int:
                return int(await conn.fetchval("SELECT 1"))

            async with serve(app) as client:
                assert (await client.get("/one")).status_code == 200
                before = proxy.accepted
                proxy.cut()
                with anyio.fail_after(5):  # while cut off, requests fail fast
                    assert (await client.get("/one")).status_code >= 500
                proxy.restore()
                answers = [(await client.get("/one")).status_code for _ in range(4)]
            assert answers == [200, 200, 200, 200]
            assert proxy.accepted > before


class TestSecrets:
    async def test_repr_hides_the_password(self, pg_dsn: str) -> None:
        """The adapter's repr shows the DSN without its password."""
        dsn = pg_dsn.replace("postgres@", "postgres:hunter2-pw@")
        pg = Postgres(Resources("test"), dsn)
        assert "hunter2-pw" not in repr(pg)
        assert "postgres:***@" in repr(pg)

    async def test_startup_error_and_logs_hide_the_password(
        self, caplog: pytest.LogCaptureFixture, app_name: str
    ) -> None:
        """A pool that cannot open reports its failure without the password anywhere."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dsn = f"postgresql://postgres:hunter2-pw@127.0.0.1:{port}/test?password=hunter2-pw"
        resources, _ = declare(dsn, app_name)
        caplog.set_level(logging.DEBUG)
        with pytest.raises(Exception) as caught:  # noqa: PT011 - unwrapped below
            async with resources.open():
                pass
        failure = startup_failure(caught.value)
        text = "".join(traceback.format_exception(caught.value))
        assert failure.resource == "postgres.pool"
        assert "hunter2-pw" not in text
        assert "hunter2-pw" not in caplog.text
