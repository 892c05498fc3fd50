"""Temporary databases and per-test isolation on the real PostgreSQL, SQLite and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from scoped_resources import Resources
from scoped_resources.adapters.postgres import Postgres
from scoped_resources.testing import TempPostgres, list_postgres_databases

if TYPE_CHECKING:
    from scoped_resources.testing.plugin import Isolation, TempDatabases

pytest_plugins = ["pytester"]

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ITEMS_SQL = "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);\n"


@pytest.fixture(scope="session")
def items_database(
    temp_databases: TempDatabases, pg_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> TempPostgres:
    """A temporary database migrated from a folder of SQL files and a callable."""
    folder = tmp_path_factory.mktemp("migrations")
    (folder / "001_items.sql").write_text(ITEMS_SQL)

    async def seed(conn: Any) -> None:
        await conn.execute("CREATE TABLE seen (n int)")

    return temp_databases.postgres(pg_dsn, [folder, seed])


@pytest.fixture(scope="session")
def template(temp_databases: TempDatabases, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite template file."""
    sql = tmp_path_factory.mktemp("sqlite-migrations") / "001_items.sql"
    sql.write_text(ITEMS_SQL)
    return temp_databases.sqlite(sql)


@pytest.fixture
async def app_pg(items_database: TempPostgres) -> AsyncIterator[tuple[Resources, Postgres]]:
    """A registry with the Postgres adapter on the temporary database, opened."""
    resources = Resources()
    pg = Postgres(resources, items_database.dsn, min_size=1, max_size=2)
    async with resources.open():
        yield resources, pg


async def insert_item(resources: Resources, pg: Postgres, item_id: int) -> int:
    """Insert a row the way a request does (pg.transaction) and count the rows it sees."""
    async with resources.scope("request") as scope:
        conn = await scope.get(pg.transaction)
        await conn.execute("INSERT INTO items VALUES ($1, 'x')", item_id)
        return int(await conn.fetchval("SELECT count(*) FROM items"))


class TestPostgresIsolation:
    """Each test's writes are rolled back; the app's commits are savepoints inside."""

    @pytest.mark.parametrize("run", ["first", "second"])
    async def test_two_tests_write_the_same_row(
        self, app_pg: tuple[Resources, Postgres], isolate: Isolation, run: str
    ) -> None:
        """Both runs insert id 1 and see only their own row (no duplicate key)."""
        resources, pg = app_pg
        conn = await isolate.postgres(pg)
        assert await insert_item(resources, pg, 1) == 1
        assert await conn.fetchval("SELECT count(*) FROM items") == 1

    async def test_a_failed_transaction_rolls_back_only_its_savepoint(
        self, app_pg: tuple[Resources, Postgres], isolate: Isolation
    ) -> None:
        """A request that fails after writing loses its write; an earlier commit stays."""
        resources, pg = app_pg
        conn = await isolate.postgres(pg)
        await insert_item(resources, pg, 1)
        with pytest.raises(RuntimeError, match="after writing"):
            async with resources.scope("failing") as scope:
                tx = await scope.get(pg.transaction)
                await tx.execute("INSERT INTO items VALUES (2, 'y')")
                raise RuntimeError("after writing")
        assert await conn.fetchval("SELECT array_agg(id) FROM items") == [1]

    async def test_the_pool_lends_the_test_connection(
        self, app_pg: tuple[Resources, Postgres], isolate: Isolation
    ) -> None:
        """Code that uses the app's pool directly writes inside the test's transaction."""
        resources, pg = app_pg
        conn = await isolate.postgres(pg)
        async with resources.scope("job") as scope:
            pool = await scope.get(pg.pool)
            async with pool.acquire() as lent:
                await lent.execute("INSERT INTO items VALUES (7, 'z')")
            assert await pool.fetchval("SELECT count(*) FROM items") == 1
        assert await conn.fetchval("SELECT id FROM items") == 7

    async def test_migrations_ran(self, items_database: TempPostgres) -> None:
        """The SQL folder and the callable migration both ran, in order."""
        import asyncpg

        conn = await asyncpg.connect(items_database.dsn)
        try:
            tables = await conn.fetchval(
                "SELECT array_agg(tablename ORDER BY tablename) FROM pg_tables "
                "WHERE schemaname = 'public'"
            )
        finally:
            await conn.close()
        assert tables == ["items", "seen"]


class TestTempDatabaseCleanup:
    """Temporary databases are dropped when the session ends."""

    def test_no_database_is_left_after_the_session(
        self, pytester: pytest.Pytester, pg_dsn: str
    ) -> None:
        """The inner session's database exists during it and is gone after it."""
        pytester.makeini(
            "[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function\n"
        )
        pytester.makepyfile(
            f'''
            import asyncpg, pytest

            @pytest.fixture(scope="session")
            def database(temp_databases):
                return temp_databases.postgres({pg_dsn!r}, lambda conn: None)

            @pytest.fixture
            def anyio_backend():
                return "asyncio"

            @pytest.mark.anyio
            async def test_database_exists(database):
                conn = await asyncpg.connect(database.dsn)
                try:
                    assert await conn.fetchval("SELECT current_database()") == database.name
                finally:
                    await conn.close()
                with open("database-name.txt", "w") as out:
                    out.write(database.name)
            '''
        )
        before = set(anyio.run(list_postgres_databases, pg_dsn))
        pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=1)
        name = (pytester.path / "database-name.txt").read_text()
        assert name.startswith("sr_test_")
        assert name not in before
        assert name not in anyio.run(list_postgres_databases, pg_dsn)

    def test_a_failed_migration_leaves_no_database(
        self, temp_databases: TempDatabases, pg_dsn: str, tmp_path: Path
    ) -> None:
        """A migration that fails drops the database it was creating."""
        before = set(anyio.run(list_postgres_databases, pg_dsn))
        broken = tmp_path / "broken.sql"
        broken.write_text("CREATE TABLE oops (;\n")
        with pytest.raises(Exception, match="syntax error"):
            temp_databases.postgres(pg_dsn, broken)
        assert set(anyio.run(list_postgres_databases, pg_dsn)) == before


class TestSQLAlchemyIsolation:
    """SQLAlchemy sessions join the test's outer transaction with savepoints."""

    @pytest.fixture
    async def orm(self, items_database: TempPostgres) -> AsyncIterator[tuple[Resources, Any]]:
        """A registry with an engine and a session resource, shaped like the adapter."""
        from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

        resources = Resources()
        url = items_database.dsn.replace("postgresql://", "postgresql+asyncpg://")

        @resources.app
        async def engine() -> AsyncIterator[Any]:
            made = create_async_engine(url)
            yield made
            await made.dispose()

        @resources.request
        async def session(e: Any = engine) -> AsyncIterator[AsyncSession]:
            async with AsyncSession(e) as made:
                yield made
                await made.commit()

        class Adapter:
            pass

        sa = Adapter()
        sa.url, sa.engine, sa.session = url, engine, session  # type: ignore[attr-defined]
        async with resources.open():
            yield resources, sa

    @pytest.mark.parametrize("run", ["first", "second"])
    async def test_two_tests_write_the_same_row(
        self, orm: tuple[Resources, Any], isolate: Isolation, run: str
    ) -> None:
        """Both runs insert id 1 through a committed session and see only their row."""
        from sqlalchemy.sql import text

        resources, sa = orm
        conn = await isolate.sqlalchemy(sa)
        async with resources.scope("request") as scope:
            session = await scope.get(sa.session)
            await session.execute(text("INSERT INTO items VALUES (1, 'x')"))
            await session.commit()
        count = (await conn.execute(text("SELECT count(*) FROM items"))).scalar()
        assert count == 1


class TestSQLiteAndRedis:
    """SQLite files and Redis keys belong to one test and are gone after it."""

    @pytest.mark.parametrize("run", ["first", "second"])
    async def test_each_test_has_its_own_sqlite_file(
        self, isolate: Isolation, template: Path, run: str
    ) -> None:
        """Both runs insert id 1 into their copy of the template."""
        import aiosqlite

        path = await isolate.sqlite(template)
        async with aiosqlite.connect(path) as db:
            await db.execute("INSERT INTO items VALUES (1, 'x')")
            await db.commit()
            async with db.execute("SELECT count(*) FROM items") as cursor:
                assert await cursor.fetchone() == (1,)

    async def test_redis_keys_are_deleted_after_the_test(self, redis_url: str) -> None:
        """A namespace's cleanup deletes its keys and leaves other keys alone."""
        import redis.asyncio

        from scoped_resources.testing import RedisNamespace

        ns, other = RedisNamespace(redis_url), RedisNamespace(redis_url)
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            await client.set(ns.key("a"), "1")
            await client.set(ns.key("b*"), "2")
            await client.set(other.key("a"), "3")
            assert await ns.cleanup() == 2
            assert await ns.keys() == []
            assert await other.keys() == [other.key("a")]
        finally:
            await other.cleanup()
            await client.aclose()
