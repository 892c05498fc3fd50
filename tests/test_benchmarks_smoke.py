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
