"""``scoped-resources check``: every problem start-up would find, and nothing opened."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from scoped_resources._check import check, registries_of
from scoped_resources.exceptions import PlanError
from scoped_resources.testing import TcpProxy

from . import apps, cyclic_app

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m scoped_resources`` from the project root."""
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "scoped_resources", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestBrokenApps:
    """Each kind of problem exits 1 with one line naming both ends of the bad edge."""

    @pytest.mark.parametrize(
        ("target", "kind", "ends"),
        [
            ("tests.tools.cyclic_app:app", "cycle", ("'first'", "'second'")),
            ("tests.tools.apps:missing", "missing", ("'engine'", "Config", "'config'")),
            ("tests.tools.apps:foreign", "foreign", ("'my_conn'", "'their_pool'")),
            ("tests.tools.apps:foreign_route", "foreign", ("'GET /mixed'", "'stray'")),
            ("tests.tools.apps:scope", "scope", ("'cache'", "'conn'")),
            ("tests.tools.apps:unshareable", "unshareable", ("'holder'", "app-scoped")),
            ("tests.tools.apps:sync_route", "sync-async", ("'conn'", "'handler'", "'/sync'")),
            ("tests.tools.apps:included", "sync-async", ("'conn'", "'handler'", "GET /v1/sync")),
        ],
    )
    def test_each_problem_is_one_line_naming_both_ends(
        self, target: str, kind: str, ends: tuple[str, ...]
    ) -> None:
        """The command exits 1 and prints one line of the right kind naming each end."""
        done = run_cli("check", target)
        assert done.returncode == 1, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"{kind}: ")
        for end in ends:
            assert end in lines[0]
        assert "1 problem(s)" in done.stderr

    def test_every_problem_is_reported_not_only_the_first(self) -> None:
        """An app with three problems gets three lines, in declaration order."""
        done = run_cli("check", "tests.tools.apps:many")
        assert done.returncode == 1
        lines = done.stdout.splitlines()
        assert [line.split(":")[0] for line in lines] == ["scope", "missing", "missing"]
        assert "'cache'" in lines[0]
        assert "'conn'" in lines[0]
        assert "'engine'" in lines[1]
        assert "'broker'" in lines[2]

    def test_json_report_lists_each_problem_with_both_ends(self) -> None:
        """``--json`` prints a report a machine can read, with the same problems."""
        done = run_cli("check", "--json", "tests.tools.apps:many")
        assert done.returncode == 1
        report = json.loads(done.stdout)
        assert report["ok"] is False
        assert report["registries"] == ["many"]
        assert [(p["kind"], p["resource"], p["other"]) for p in report["problems"]] == [
            ("scope", "cache", "conn"),
            ("missing", "engine", "config (Config)"),
            ("missing", "broker", "config (Config)"),
        ]

    @pytest.mark.parametrize(
        "app",
        [cyclic_app.app, apps.missing, apps.foreign, apps.scope, apps.unshareable, apps.sync_route],
        ids=["cycle", "missing", "foreign", "scope", "unshareable", "sync-async"],
    )
    async def test_check_finds_what_startup_raises(self, app: FastAPI) -> None:
        """The problem check reports is the one the app's start-up fails with."""
        problems = check(app, registries_of(app))
        with pytest.raises(PlanError) as raised:
            async with LifespanManager(app):
                pass  # pragma: no cover - start-up must fail
        assert len(problems) == 1
        assert problems[0].message.startswith(str(raised.value))


class TestSoundApps:
    """A sound graph exits 0."""

    def test_small_app_is_ok(self) -> None:
        """The small sound app passes with no problem line."""
        done = run_cli("check", "tests.tools.apps:sound")
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout == ""
        assert "3 resources checked, ok" in done.stderr

    def test_json_of_a_sound_app_says_ok(self) -> None:
        """``--json`` on a sound app reports ok and no problems."""
        report = json.loads(run_cli("check", "--json", "tests.tools.apps:sound").stdout)
        assert report == {
            "target": "tests.tools.apps:sound",
            "ok": True,
            "registries": ["small"],
            "resources": 3,
            "problems": [],
        }

    async def test_reference_service_passes_and_opens_no_connection(
        self, pg_dsn: str, redis_url: str, amqp_url: str
    ) -> None:
        """The service, configured for PostgreSQL, checks ok without one connection opened."""
        pg = urlsplit(pg_dsn)
        name = f"sr-check-{uuid.uuid4().hex[:8]}"
        seen: list[int] = []
        async with TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432) as proxy:
            dsn = pg_dsn.replace(pg.netloc, f"{pg.username or 'postgres'}@127.0.0.1:{proxy.port}")
            env = {
                "DATABASE_URL": dsn,
                "DATABASE_APPLICATION_NAME": name,
                "REDIS_URL": redis_url,
                "AMQP_URL": amqp_url,
            }
            watcher = await asyncpg.connect(pg_dsn)
            try:
                async with anyio.create_task_group() as tg:
                    done_event = anyio.Event()

                    async def sample() -> None:
                        while not done_event.is_set():
                            seen.append(
                                await watcher.fetchval(
                                    "SELECT count(*) FROM pg_stat_activity "
                                    "WHERE application_name = $1",
                                    name,
                                )
                            )
                            with anyio.move_on_after(0.02):
                                await done_event.wait()

                    tg.start_soon(sample)
                    done = await anyio.to_thread.run_sync(
                        lambda: run_cli("check", "service.app:app", env=env)
                    )
                    done_event.set()
            finally:
                await watcher.close()
            assert done.returncode == 0, done.stdout + done.stderr
            assert "resources checked, ok" in done.stderr
            assert proxy.accepted == 0
        assert seen
        assert set(seen) == {0}

    def test_unimportable_target_exits_2_with_one_line(self) -> None:
        """A module that does not import is a usage error, not a traceback."""
        done = run_cli("check", "tests.tools.no_such_module:app")
        assert done.returncode == 2
        assert done.stderr.startswith("scoped-resources: cannot import module")
        assert "Traceback" not in done.stderr
