"""The benchmark apps answer their contract, in-process, against the real services.

No timing here: the benchmarks themselves run with ``python -m benchmarks``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from benchmarks.contract import check_contract
from benchmarks.schema import setup

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def _import_app(name: str) -> Any:
    module_name = f"benchmarks.apps.{name}"
    module = sys.modules.get(module_name)
    # The apps read DATABASE_URL and REDIS_URL when imported (scoped) or started.
    module = importlib.reload(module) if module else importlib.import_module(module_name)
    return module.app


@pytest.mark.parametrize(
    "name", ["scoped", "plain", "fastapi_fn", "dishka_di", "naive", "noio"]
)
async def test_app_answers_its_contract(
    name: str, pg_dsn: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_dsn)
    monkeypatch.setenv("REDIS_URL", redis_url)
    counts = await setup(pg_dsn)
    assert counts["users"] == 10_000
    app = _import_app(name)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            if name == "noio":
                r = await client.get("/ping")
                assert r.status_code == 200
                assert r.json() == {"ok": True}
            else:
                await check_contract(client, name)


@pytest.mark.parametrize("variant", ["scoped", "exitstack"])
def test_the_counted_micro_request_runs_as_the_timed_one_does(variant: str) -> None:
    """The process callgrind counts for the micro benchmark runs its requests to the end."""
    from benchmarks.instructions import _micro_child

    _micro_child(variant, 3, 20)  # uvloop.run of its own: no running loop here


def test_the_micro_instruction_table_gives_the_ratio_to_the_exit_stack() -> None:
    """Each size's row shows both counts and scoped's ratio to the bare AsyncExitStack."""
    from benchmarks.instructions import micro_table

    table = micro_table({"per_request": {"1": {"scoped": 46_000.0, "exitstack": 30_000.0}}})
    assert table.splitlines()[-1] == "| 1 | 46.0k | 30.0k | 1.53x |"
