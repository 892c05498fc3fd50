"""The SQLAlchemy async adapter against the real PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import pytest
from fastapi import FastAPI, HTTPException
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.sql import text

from scoped_resources import Resources, Use
from scoped_resources.adapters.sqlalchemy import SQLAlchemy
from scoped_resources.exceptions import ReleaseFailed, ReleaseTimeout, ResourceBusy
from scoped_resources.testing import TcpProxy

from .test_postgres import admin, app_name, backends, serve, table, via, wait_for

__all__ = ["admin", "app_name", "table"]  # fixtures shared with the asyncpg tests

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def sa_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://")


def declare(url: str, app_name: str, **options: Any) -> tuple[Resources, SQLAlchemy]:
    resources = Resources("test", drain_timeout=options.pop("drain_timeout", 5.0))
    if url.startswith("postgresql"):
        options["connect_args"] = {"server_settings": {"application_name": app_name}}
    return resources, SQLAlchemy(resources, url, **options)


def checked_out(engine: Any) -> int:
    """How many connections *engine*'s pool has lent."""
    return int(engine.pool.checkedout())


async def assert_engine_healthy(db: SQLAlchemy, app_scope: Any, admin: Any, app_name: str) -> None:
    engine = await app_scope.get(db.engine)
    assert checked_out(engine) == 0
    async with app_scope.child() as scope:
        conn = await scope.get(db.connection)
        assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    assert checked_out(engine) == 0

    async def settled() -> bool:
        return all(state == "idle" for state, _ in await backends(admin, app_name))

    await wait_for(settled)


class TestLifecycle:
    async def test_engine_lends_a_connection_and_gets_it_back(
        self, pg_dsn: str, admin: Any, app_name: str
    ) -> None:
        """The engine opens with the app, lends a connection per scope and closes every one."""
        resources, db = declare(sa_url(pg_dsn), app_name)
        async with resources.open() as app_scope:
            engine = await app_scope.get(db.engine)
            async with app_scope.child() as scope:
                conn = await scope.get(db.connection)
                assert isinstance(conn, AsyncConnection)
                assert (await conn.execute(text("SELECT 41 + 1"))).scalar() == 42
                assert checked_out(engine) == 1
            assert checked_out(engine) == 0

        async def gone() -> bool:
            return not await backends(admin, app_name)

        await wait_for(gone)

    async def test_sqlite_session_commits(self, tmp_path: Path) -> None:
        """With aiosqlite the session commits its work when the scope ends."""
        resources, db = declare(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", "")
        async with resources.open() as app_scope:
            async with app_scope.child() as scope:
                session = await scope.get(db.session)
                assert isinstance(session, AsyncSession)
                await session.execute(text("CREATE TABLE t (x int)"))
                await session.execute(text("INSERT INTO t VALUES (7)"))
            async with app_scope.child() as scope:
                conn = await scope.get(db.connection)
                assert (await conn.execute(text("SELECT x FROM t"))).scalar() == 7

    async def test_session_and_connection_share_one_connection(
        self, pg_dsn: str, app_name: str
    ) -> None:
        """A scope asking for the session and the connection uses one database connection."""
        resources, db = declare(sa_url(pg_dsn), app_name)
        async with resources.open() as app_scope, app_scope.child() as scope:
            session = await scope.get(db.session)
            conn = await scope.get(db.connection)
            assert await session.connection() is conn
            assert checked_out(await app_scope.get(db.engine)) == 1

    async def test_repr_hides_the_password(self) -> None:
        """The adapter's repr shows the URL without its password."""
        db = SQLAlchemy(Resources("t"), "postgresql+asyncpg://u:hunter2-pw@127.0.0.1/db")
        assert "hunter2-pw" not in repr(db)


class TestAcquireTimeout:
    async def test_exhausted_pool_raises_resource_busy(self, pg_dsn: str, app_name: str) -> None:
        """Past acquire_timeout the pool's timeout becomes ResourceBusy naming the connection."""
        resources, db = declare(sa_url(pg_dsn), app_name, pool_size=1, acquire_timeout=0.2)
        async with resources.open() as app_scope, app_scope.child() as holder:
            await holder.get(db.connection)
            async with app_scope.child() as scope:
                with pytest.raises(ResourceBusy) as caught:
                    await scope.get(db.session)
        assert caught.value.resource == "sqlalchemy.connection"

    async def test_exhausted_pool_answers_503_with_retry_after(
        self, pg_dsn: str, app_name: str
    ) -> None:
        """A request that cannot get a connection in time gets 503 and Retry-After."""
        resources, db = declare(sa_url(pg_dsn), app_name, pool_size=1, acquire_timeout=0.2)
        app = FastAPI(lifespan=resources.lifespan)
        held, done = anyio.Event(), anyio.Event()

        @app.get("/hold")
        async def hold(conn: Annotated[AsyncConnection, Use(db.connection)]) -> str:
            held.set()
            await done.wait()
            return "held"

        @app.get("/one")
        async def one(conn: Annotated[AsyncConnection, Use(db.connection)]) -> str:
            return "one"

        async with serve(app) as client, anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/hold")
            with anyio.fail_after(5):
                await held.wait()
            busy = await client.get("/one")
            done.set()
        assert busy.status_code == 503
        assert busy.headers["retry-after"] == "1"


class TestPing:
    async def test_ping_succeeds_and_fails_with_the_network(
        self, pg_dsn: str, app_name: str
    ) -> None:
        """The engine's ping passes, fails while the network is cut, and passes once restored."""
        async with TcpProxy("127.0.0.1", 5432) as proxy:
            resources, _ = declare(sa_url(via(proxy, pg_dsn)), app_name, ping_timeout=1.0)
            async with resources.open() as app_scope:
                assert await app_scope.ping(5.0) == {"sqlalchemy.engine": None}
                proxy.cut()
                assert (await app_scope.ping(5.0))["sqlalchemy.engine"] is not None
                proxy.restore()
                assert await app_scope.ping(5.0) == {"sqlalchemy.engine": None}


class TestShutdown:
    async def test_shutdown_with_a_lease_out_invalidates_it_in_time(
        self, pg_dsn: str, admin: Any, app_name: str
    ) -> None:
        """Shutdown waits close_timeout for a leased connection, then closes its socket."""
        resources, db = declare(sa_url(pg_dsn), app_name, close_timeout=0.2, drain_timeout=0.1)
        with anyio.fail_after(5):
            async with resources.open() as app_scope:
                scope = app_scope.child()
                await scope.get(db.session)

        async def gone() -> bool:
            return not await backends(admin, app_name)

        await wait_for(gone)
        with pytest.raises(ReleaseFailed):  # its connection was invalidated under it
            await scope.aclose()

    async def test_dispose_overrunning_its_deadline_is_reported(
        self, pg_dsn: str, app_name: str
    ) -> None:
        """An engine whose shutdown overruns is cut off and reported as a ReleaseTimeout."""
        async with TcpProxy("127.0.0.1", 5432) as proxy:
            resources, db = declare(
                sa_url(via(proxy, pg_dsn)), app_name, close_timeout=0.0, release_timeout=0.2
            )
            with anyio.fail_after(5), pytest.raises(ReleaseFailed) as caught:
                async with resources.open() as app_scope, app_scope.child() as scope:
                    await scope.get(db.connection)
                    proxy.delay = 1.0  # the close of the returned connection hangs
        [timeout] = caught.value.exceptions
        assert isinstance(timeout, ReleaseTimeout)


class TestCancellation:
    async def test_cancel_during_acquire_leaks_no_connection(
        self, pg_dsn: str, admin: Any, app_name: str
    ) -> None:
        """A scope cancelled while waiting for the pool leaves nothing checked out."""
        resources, db = declare(sa_url(pg_dsn), app_name, pool_size=1)
        async with resources.open() as app_scope:
            async with app_scope.child() as holder:
                await holder.get(db.connection)

                async def wait_for_connection() -> None:
                    async with app_scope.child() as scope:
                        await scope.get(db.session)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait_for_connection)
                    await anyio.wait_all_tasks_blocked()
                    tg.cancel_scope.cancel()
            await assert_engine_healthy(db, app_scope, admin, app_name)

    async def test_cancel_during_a_query_leaves_the_engine_healthy(
        self, pg_dsn: str, admin: Any, app_name: str, table: str
    ) -> None:
        """A query cancelled mid-flight leaks no connection and commits nothing."""
        resources, db = declare(sa_url(pg_dsn), app_name, pool_size=1)
        async with resources.open() as app_scope:

            async def slow() -> None:
                async with app_scope.child() as scope:
                    session = await scope.get(db.session)
                    await session.execute(text(f"INSERT INTO {table} VALUES (1)"))
                    await session.execute(text("SELECT pg_sleep(30)"))

            async def sleeping() -> bool:
                return any(
                    "pg_sleep" in q for s, q in await backends(admin, app_name) if s == "active"
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                await wait_for(sleeping)
                tg.cancel_scope.cancel()
            # SQLAlchemy drops the socket; the server notices when pg_sleep ends, so
            # cancel the orphan here to keep the test quick.
            await admin.execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = $1 AND query LIKE '%pg_sleep%'",
                app_name,
            )
            await assert_engine_healthy(db, app_scope, admin, app_name)
        assert await admin.fetchval(f"SELECT count(*) FROM {table}") == 0

    async def test_cancel_during_release_still_commits(
        self, pg_dsn: str, admin: Any, app_name: str, table: str
    ) -> None:
        """A cancel that lands while the COMMIT is in flight does not stop it."""
        async with TcpProxy("127.0.0.1", 5432) as proxy:
            resources, db = declare(sa_url(via(proxy, pg_dsn)), app_name, pool_size=1)
            releasing = anyio.Event()

            @resources.request
            async def marker(session: Annotated[Any, Use(db.session)]) -> AsyncIterator[Any]:
                yield session
                releasing.set()

            async with resources.open() as app_scope:

                async def write() -> None:
                    async with app_scope.child() as scope:
                        session = await scope.get(marker)
                        await session.execute(text(f"INSERT INTO {table} VALUES (1)"))
                        proxy.delay = 0.1

                async with anyio.create_task_group() as tg:
                    tg.start_soon(write)
                    await releasing.wait()
                    tg.cancel_scope.cancel()
                proxy.delay = 0.0
                await assert_engine_healthy(db, app_scope, admin, app_name)
        assert await admin.fetchval(f"SELECT count(*) FROM {table}") == 1


class TestSessionOverHttp:
    @staticmethod
    def app(db: SQLAlchemy, resources: Resources, table: str) -> FastAPI:
        app = FastAPI(lifespan=resources.lifespan)
        insert = text(f"INSERT INTO {table} VALUES (:id)")

        @app.post("/twice/{item}")
        async def twice(item: int, session: Annotated[AsyncSession, Use(db.session)]) -> str:
            await session.execute(insert, [{"id": item}, {"id": item}])
            return "inserted"

        @app.post("/fail/{item}")
        async def fail(item: int, session: Annotated[AsyncSession, Use(db.session)]) -> str:
            await session.execute(insert, {"id": item})
            raise HTTPException(409, "changed my mind")

        @app.post("/nested/{item}")
        async def nested(item: int, session: Annotated[AsyncSession, Use(db.session)]) -> str:
            await session.execute(insert, {"id": item})
            try:
                async with session.begin_nested():
                    await session.execute(insert, {"id": item + 1})
                    raise LookupError("undo the inner part only")
            except LookupError:
                pass
            return "inserted"

        return app

    async def test_commit_fails_before_the_response_with_500(
        self, pg_dsn: str, admin: Any, app_name: str, table: str
    ) -> None:
        """A COMMIT that fails on a deferred constraint answers 500 and stores nothing."""
        resources, db = declare(sa_url(pg_dsn), app_name)
        async with serve(self.app(db, resources, table)) as client:
            response = await client.post("/twice/1")
        assert response.status_code == 500
        assert "sqlalchemy.session" in response.text
        assert await admin.fetchval(f"SELECT count(*) FROM {table}") == 0

    async def test_an_exception_rolls_back(
        self, pg_dsn: str, admin: Any, app_name: str, table: str
    ) -> None:
        """A route that raises stores nothing and leaves no transaction open."""
        resources, db = declare(sa_url(pg_dsn), app_name)
        async with serve(self.app(db, resources, table)) as client:
            response = await client.post("/fail/3")
            assert all(s == "idle" for s, _ in await backends(admin, app_name))
        assert response.status_code == 409
        assert await admin.fetchval(f"SELECT count(*) FROM {table}") == 0

    async def test_begin_nested_is_a_savepoint(
        self, pg_dsn: str, admin: Any, app_name: str, table: str
    ) -> None:
        """A failed nested block undoes only its own work; the outer one commits."""
        resources, db = declare(sa_url(pg_dsn), app_name)
        async with serve(self.app(db, resources, table)) as client:
            response = await client.post("/nested/10")
        assert response.status_code == 200
        assert await admin.fetchval(f"SELECT array_agg(id) FROM {table}") == [10]


class TestReconnect:
    async def test_first_requests_after_a_cut_is_restored_succeed(
        self, pg_dsn: str, app_name: str
    ) -> None:
        """Connections killed by a network cut are replaced once the server is back."""
        async with TcpProxy("127.0.0.1", 5432) as proxy:
            resources, db = declare(sa_url(via(proxy, pg_dsn)), app_name, pool_size=2)
            app = FastAPI(lifespan=resources.lifespan)

            @app.get("/one")
            async def one(session: Annotated[AsyncSession, Use(db.session)]) -> int:
                return int((await session.execute(text("SELECT 1"))).scalar_one())

            async with serve(app) as client:
                assert (await client.get("/one")).status_code == 200
                proxy.cut()
                proxy.restore()
                answers = [(await client.get("/one")).status_code for _ in range(4)]
            assert answers == [200, 200, 200, 200]
