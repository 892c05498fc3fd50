"""The aiosqlite adapter on a real database file."""

import sqlite3
import time
from pathlib import Path
from typing import Annotated, Any

import aiosqlite
import anyio
import pytest
from fastapi import FastAPI, HTTPException

from scoped_resources import Resources, Use
from scoped_resources.adapters.sqlite import SQLite, savepoint
from scoped_resources.exceptions import ReleaseFailed, ResourceBusy

from .test_postgres import serve

pytestmark = pytest.mark.anyio

#: Counts to a hundred million: seconds of work unless interrupted.
LONG_QUERY = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 100000000) "
    "SELECT count(*) FROM c"
)


def declare(tmp_path: Path, **options: Any) -> tuple[Resources, SQLite]:
    resources = Resources("test", drain_timeout=options.pop("drain_timeout", 5.0))
    return resources, SQLite(resources, str(tmp_path / "db.sqlite3"), **options)


async def rows(db_path: Path, sql: str) -> list[Any]:
    async with aiosqlite.connect(db_path) as conn:
        return list(await conn.execute_fetchall(sql))


async def make_table(resources: Resources, db: SQLite) -> None:
    async with resources.open() as app_scope, app_scope.child() as scope:
        conn = await scope.get(db.transaction)
        await conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY)")


class TestLifecycle:
    async def test_opens_in_wal_mode_and_closes_every_thread(self, tmp_path: Path) -> None:
        """Every connection uses WAL; at exit each is closed and its thread has ended."""
        resources, db = declare(tmp_path, readers=2)
        async with resources.open() as app_scope:
            conns = await app_scope.get(db.database)
            threads = [conn._thread for conn in conns.open]
            assert len(threads) == 3
            async with app_scope.child() as scope:
                reader = await scope.get(db.connection)
                [(mode,)] = await reader.execute_fetchall("PRAGMA journal_mode")
                assert mode == "wal"
        for thread in threads:
            thread.join(5)
            assert not thread.is_alive()

    async def test_readers_cannot_write(self, tmp_path: Path) -> None:
        """A reader connection refuses writes; they go through the transaction."""
        resources, db = declare(tmp_path)
        async with resources.open() as app_scope, app_scope.child() as scope:
            reader = await scope.get(db.connection)
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                await reader.execute("CREATE TABLE t (x)")

    async def test_shutdown_with_a_lease_out_closes_it_in_time(self, tmp_path: Path) -> None:
        """A lease still out at shutdown is closed after close_timeout; no thread remains."""
        resources, db = declare(tmp_path, close_timeout=0.2, drain_timeout=0.1)
        with anyio.fail_after(5):
            async with resources.open() as app_scope:
                conns = await app_scope.get(db.database)
                threads = [conn._thread for conn in conns.open]
                scope = app_scope.child()
                await scope.get(db.transaction)
                await scope.get(db.connection)
        with pytest.raises(ReleaseFailed):  # its COMMIT finds the writer closed
            await scope.aclose()
        for thread in threads:
            thread.join(5)
            assert not thread.is_alive()


class TestAcquireTimeout:
    async def test_the_single_writer_is_busy_past_the_timeout(self, tmp_path: Path) -> None:
        """A second writer waits at most acquire_timeout, then gets ResourceBusy."""
        resources, db = declare(tmp_path, acquire_timeout=0.1)
        async with resources.open() as app_scope, app_scope.child() as holder:
            await holder.get(db.transaction)
            async with app_scope.child() as scope:
                with pytest.raises(ResourceBusy) as caught:
                    await scope.get(db.transaction)
        assert caught.value.resource == "sqlite.transaction"

    async def test_exhausted_readers_answer_503(self, tmp_path: Path) -> None:
        """With every reader leased, a request gets 503 and Retry-After."""
        resources, db = declare(tmp_path, readers=1, acquire_timeout=0.1)
        app = FastAPI(lifespan=resources.lifespan)
        held, done = anyio.Event(), anyio.Event()

        @app.get("/hold")
        async def hold(conn: Annotated[aiosqlite.Connection, Use(db.connection)]) -> str:
            held.set()
            await done.wait()
            return "held"

        @app.get("/one")
        async def one(conn: Annotated[aiosqlite.Connection, Use(db.connection)]) -> str:
            return "one"

        async with serve(app) as client, anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/hold")
            with anyio.fail_after(5):
                await held.wait()
            busy = await client.get("/one")
            done.set()
        assert busy.status_code == 503
        assert busy.headers["retry-after"] == "1"
        assert "sqlite.connection" in busy.text


class TestPing:
    async def test_ping_succeeds_on_an_open_database(self, tmp_path: Path) -> None:
        """The database's ping answers with no error."""
        resources, _ = declare(tmp_path)
        async with resources.open() as app_scope:
            assert await app_scope.ping(5.0) == {"sqlite.database": None}

    async def test_ping_fails_when_the_writer_is_broken(self, tmp_path: Path) -> None:
        """A writer that cannot run a statement fails the ping."""
        resources, db = declare(tmp_path)
        async with resources.open() as app_scope:
            conns = await app_scope.get(db.database)
            writer = conns.writer
            await writer.close()
            assert isinstance((await app_scope.ping(5.0))["sqlite.database"], ValueError)


class TestCancellation:
    async def test_a_cancelled_long_query_is_interrupted(self, tmp_path: Path) -> None:
        """A query whose request is cancelled stops promptly instead of running on."""
        resources, db = declare(tmp_path, readers=1)
        async with resources.open() as app_scope:
            reader: Any = None
            started = anyio.Event()

            async def long_read() -> None:
                nonlocal reader
                async with app_scope.child() as scope:
                    reader = await scope.get(db.connection)
                    started.set()
                    await reader.execute(LONG_QUERY)

            begun = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(long_read)
                await started.wait()
                await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()
            async with app_scope.child() as scope:
                conn = await scope.get(db.connection)
                assert conn is reader  # reset and handed back, not replaced
                with anyio.fail_after(2):
                    assert await conn.execute_fetchall("SELECT 1") == [(1,)]
            assert time.monotonic() - begun < 2

    async def test_cancel_during_acquire_keeps_the_writer(self, tmp_path: Path) -> None:
        """A writer cancelled while waiting for the lock takes nothing with it."""
        resources, db = declare(tmp_path)
        async with resources.open() as app_scope:
            async with app_scope.child() as holder:
                await holder.get(db.transaction)

                async def wait_for_writer() -> None:
                    async with app_scope.child() as scope:
                        await scope.get(db.transaction)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait_for_writer)
                    await anyio.wait_all_tasks_blocked()
                    tg.cancel_scope.cancel()
            with anyio.fail_after(2):
                async with app_scope.child() as scope:
                    conn = await scope.get(db.transaction)
                    assert conn.in_transaction

    async def test_cancel_during_a_write_rolls_back(self, tmp_path: Path) -> None:
        """A write whose request is cancelled is interrupted and rolled back."""
        resources, db = declare(tmp_path)
        await make_table(resources, db)
        async with resources.open() as app_scope:
            started = anyio.Event()

            async def long_write() -> None:
                async with app_scope.child() as scope:
                    conn = await scope.get(db.transaction)
                    await conn.execute("INSERT INTO items VALUES (1)")
                    started.set()
                    await conn.execute(f"INSERT INTO items SELECT ({LONG_QUERY}) + 1")

            async with anyio.create_task_group() as tg:
                tg.start_soon(long_write)
                await started.wait()
                await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()
            with anyio.fail_after(2):
                async with app_scope.child() as scope:
                    conn = await scope.get(db.transaction)
                    assert await conn.execute_fetchall("SELECT * FROM items") == []


class TestTransactionOverHttp:
    @staticmethod
    def app(db: SQLite, resources: Resources) -> FastAPI:
        app = FastAPI(lifespan=resources.lifespan)
        Writer = Annotated[aiosqlite.Connection, Use(db.transaction)]  # noqa: N806

        @app.post("/twice/{item}")
        async def twice(item: int, conn: Writer) -> str:
            # Deferred: the duplicate is found only at COMMIT.
            await conn.execute("PRAGMA defer_foreign_keys = ON")
            await conn.execute("INSERT INTO children VALUES (?)", (item,))
            return "inserted"

        @app.post("/fail/{item}")
        async def fail(item: int, conn: Writer) -> str:
            await conn.execute("INSERT INTO items VALUES (?)", (item,))
            raise HTTPException(409, "changed my mind")

        @app.post("/nested/{item}")
        async def nested(item: int, conn: Writer) -> str:
            await conn.execute("INSERT INTO items VALUES (?)", (item,))
            try:
                async with savepoint(conn):
                    await conn.execute("INSERT INTO items VALUES (?)", (item + 1,))
                    raise LookupError("undo the inner part only")
            except LookupError:
                pass
            return "inserted"

        return app

    async def test_commit_fails_before_the_response_with_500(self, tmp_path: Path) -> None:
        """A COMMIT that fails on a deferred foreign key answers 500 and stores nothing."""
        resources, db = declare(tmp_path)
        await make_table(resources, db)
        async with resources.open() as app_scope, app_scope.child() as scope:
            conn = await scope.get(db.transaction)
            await conn.execute(
                "CREATE TABLE children (parent INTEGER REFERENCES items (id) "
                "DEFERRABLE INITIALLY DEFERRED)"
            )
        async with serve(self.app(db, resources)) as client:
            response = await client.post("/twice/1")
            assert response.status_code == 500
            assert "sqlite.transaction" in response.text
            assert await rows(tmp_path / "db.sqlite3", "SELECT * FROM children") == []

    async def test_an_exception_rolls_back(self, tmp_path: Path) -> None:
        """A route that raises stores nothing."""
        resources, db = declare(tmp_path)
        await make_table(resources, db)
        async with serve(self.app(db, resources)) as client:
            response = await client.post("/fail/3")
        assert response.status_code == 409
        assert await rows(tmp_path / "db.sqlite3", "SELECT * FROM items") == []

    async def test_savepoint_undoes_only_its_own_work(self, tmp_path: Path) -> None:
        """A failed savepoint block undoes its work; the outer transaction commits."""
        resources, db = declare(tmp_path)
        await make_table(resources, db)
        async with serve(self.app(db, resources)) as client:
            response = await client.post("/nested/10")
        assert response.status_code == 200
        assert await rows(tmp_path / "db.sqlite3", "SELECT id FROM items") == [(10,)]
