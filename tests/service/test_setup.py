"""Start-up: settings are checked, migrations build the schema, `python -m service` runs."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from scoped_resources.exceptions import StartupFailed
from scoped_resources.testing import AppLifespan
from service import Settings, create_app
from service.database import downgrade, make_engine, migrate

from .conftest import SettingsFactory, create_database, drop_database, with_database
from .processes import run_service, service_process

TABLES = {"users", "items", "logs", "outbox", "alembic_version"}


class TestSettings:
    def test_gc_freeze_is_on_unless_turned_off(self, monkeypatch: pytest.MonkeyPatch) -> None:
        assert Settings(_env_file=None).gc_freeze  # type: ignore[call-arg]
        monkeypatch.setenv("GC_FREEZE", "false")
        assert not Settings(_env_file=None).gc_freeze  # type: ignore[call-arg]

    def test_defaults_are_embedded(self) -> None:
        """With nothing configured the service uses SQLite and no Redis, broker or upstream."""
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
        assert settings.is_sqlite
        assert settings.redis_url is None
        assert settings.amqp_url is None
        assert settings.upstream_url is None
        assert settings.api_token is None

    def test_postgres_urls_select_asyncpg(self) -> None:
        """postgres:// and postgresql:// URLs are run through asyncpg."""
        settings = Settings(database_url="postgres://u@h/db", _env_file=None)  # type: ignore[call-arg]
        assert settings.database_url == "postgresql+asyncpg://u@h/db"

    @pytest.mark.parametrize(
        ("field", "value", "message"),
        [
            ("database_url", "mysql://x", "DATABASE_URL must start with"),
            ("redis_url", "http://x", "REDIS_URL must start with"),
            ("amqp_url", "redis://x", "AMQP_URL must start with"),
            ("upstream_url", "ftp://x", "UPSTREAM_URL must start with"),
            ("upstream_url", "http://", "UPSTREAM_URL needs a host"),
            ("port", 70000, "less than or equal"),
        ],
    )
    def test_invalid_settings_name_the_variable(
        self, field: str, value: object, message: str
    ) -> None:
        """A bad value is refused with a message that names the environment variable."""
        with pytest.raises(ValidationError, match=message):
            Settings.model_validate({field: value})

    def test_empty_values_mean_unset(self) -> None:
        """REDIS_URL= (empty) is the same as not setting it; so is DATABASE_URL=."""
        settings = Settings.model_validate({"redis_url": "", "api_token": "", "database_url": ""})
        assert settings.is_sqlite
        assert settings.redis_url is None
        assert settings.api_token is None

    def test_bad_environment_stops_the_program_with_exit_code_2(self, tmp_path: Path) -> None:
        """`python -m service` with a bad DATABASE_URL prints the problem and exits 2."""
        result = run_service({"DATABASE_URL": "mysql://nope"}, tmp_path)
        assert result.returncode == 2
        assert "DATABASE_URL: Value error, DATABASE_URL must start with" in result.stderr


def _closed_port() -> int:
    """A local TCP port nothing listens on (just released by this process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class TestDatabaseUnavailableAtStart:
    """A database that cannot be opened stops `python -m service` with exit code 3 and one
    line naming DATABASE_URL and the cause, not a traceback."""

    def test_a_refused_connection(self, tmp_path: Path) -> None:
        result = run_service(
            {"DATABASE_URL": f"postgresql://127.0.0.1:{_closed_port()}/test"}, tmp_path
        )
        assert result.returncode == 3
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith("service: cannot open the database of DATABASE_URL (")
        assert "ConnectionRefusedError" in result.stderr

    def test_a_database_that_does_not_exist(self, pg_dsn: str, tmp_path: Path) -> None:
        result = run_service(
            {"DATABASE_URL": with_database(pg_dsn, "sr_no_such_database")}, tmp_path
        )
        assert result.returncode == 3
        assert 'InvalidCatalogNameError: database "sr_no_such_database" does not exist' in (
            result.stderr
        )

    def test_the_password_is_not_shown(self, tmp_path: Path) -> None:
        url = f"postgresql://someone:hunter2secret@127.0.0.1:{_closed_port()}/test"
        result = run_service({"DATABASE_URL": url}, tmp_path)
        assert result.returncode == 3
        assert "someone:***@" in result.stderr
        assert "hunter2secret" not in result.stderr

    def test_a_sqlite_folder_that_cannot_be_made(self, tmp_path: Path) -> None:
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        result = run_service(
            {"DATABASE_URL": f"sqlite:///{blocker / 'data' / 'service.db'}"}, tmp_path
        )
        assert result.returncode == 3
        assert "NotADirectoryError" in result.stderr


class TestStartUpFailureLog:
    """An app resource that cannot open is one log line naming it, not a traceback."""

    def _refused_broker(self, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return run_service(
            {
                "DATABASE_URL": f"sqlite:///{tmp_path / 'service.db'}",
                "AMQP_URL": f"amqp://guest:guest@127.0.0.1:{_closed_port()}/",
                **env,
            },
            tmp_path,
        )

    def test_the_failure_is_one_line_naming_the_resource(self, tmp_path: Path) -> None:
        result = self._refused_broker(tmp_path)
        assert result.returncode == 3
        assert (
            "ERROR uvicorn.error: the app did not start: could not open app resource 'rabbitmq': "
            "ConnectionError: resource 'rabbitmq': cannot connect to amqp://guest:***@"
        ) in result.stderr
        assert "Traceback" not in result.stderr

    def test_at_debug_level_the_traceback_is_kept(self, tmp_path: Path) -> None:
        result = self._refused_broker(tmp_path, LOG_LEVEL="debug")
        assert result.returncode == 3
        assert "Traceback" in result.stderr


@pytest.fixture
async def empty_database(
    backend: str, make_settings: SettingsFactory, tmp_path: Path
) -> AsyncIterator[AsyncEngine]:
    """An engine on a database with no tables: a new SQLite file or PostgreSQL database."""
    if backend == "embedded":
        settings = make_settings(database_url=f"sqlite:///{tmp_path / 'fresh.db'}")
        engine = make_engine(settings)
        yield engine
        await engine.dispose()
        return
    pg_dsn = os.environ.get("SR_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    name = f"sr_service_migrations_{os.getpid()}"
    await create_database(pg_dsn, name)
    engine = make_engine(make_settings(database_url=with_database(pg_dsn, name)))
    try:
        yield engine
    finally:
        await engine.dispose()
        await drop_database(pg_dsn, name)


async def table_names(engine: AsyncEngine) -> set[str]:
    """The tables in *engine*'s database."""
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda sync: sa_inspect(sync).get_table_names()))


@pytest.mark.anyio
class TestHeapFreeze:
    """``GC_FREEZE``: the objects start-up made are frozen while the app runs, and only then."""

    async def test_the_start_up_heap_is_frozen_for_the_apps_lifetime(
        self, make_settings: SettingsFactory
    ) -> None:
        app = create_app(make_settings(gc_freeze=True))
        assert gc.get_freeze_count() == 0
        async with AppLifespan(app):
            frozen = gc.get_freeze_count()
            # the app itself is among them: full collections no longer walk it
            assert not any(obj is app for obj in gc.get_objects())
        assert frozen > 0
        assert gc.get_freeze_count() == 0

    async def test_turned_off_it_freezes_nothing(self, make_settings: SettingsFactory) -> None:
        async with AppLifespan(create_app(make_settings(gc_freeze=False))):
            assert gc.get_freeze_count() == 0

    async def test_a_failed_start_up_freezes_nothing(
        self, make_settings: SettingsFactory, tmp_path: Path
    ) -> None:
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        app = create_app(make_settings(gc_freeze=True, files_dir=blocker / "files"))
        with pytest.raises(StartupFailed, match="'files.directory'"):
            async with AppLifespan(app):
                pass
        assert gc.get_freeze_count() == 0


@pytest.mark.anyio
class TestMigrations:
    async def test_upgrade_creates_the_tables(self, empty_database: AsyncEngine) -> None:
        """The migrations create users, items, logs and outbox (with these names)."""
        await migrate(empty_database)
        assert await table_names(empty_database) == TABLES

    async def test_upgrade_is_idempotent(self, empty_database: AsyncEngine) -> None:
        """Running the migrations twice (a second replica starting) changes nothing."""
        await migrate(empty_database)
        await migrate(empty_database)
        assert await table_names(empty_database) == TABLES

    async def test_downgrade_removes_the_tables(self, empty_database: AsyncEngine) -> None:
        """Downgrading to base drops every table the migrations made."""
        await migrate(empty_database)
        await downgrade(empty_database)
        assert await table_names(empty_database) == {"alembic_version"}


@pytest.mark.anyio
class TestRunCommand:
    async def test_python_m_service_serves_the_api_and_its_docs(self, tmp_path: Path) -> None:
        """`python -m service` with no configuration migrates, listens and serves /docs."""
        env = {"DATABASE_URL": "", "REDIS_URL": "", "AMQP_URL": "", "UPSTREAM_URL": ""}
        with service_process(env, tmp_path / "stderr.log") as url:
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await client.get("/healthz")).status_code == 200
                assert (await client.get("/docs")).status_code == 200
                created = await client.post("/items", json={"name": "from-readme"})
                assert created.status_code == 201
        assert (tmp_path / "service-data" / "service.db").exists()
