"""Two replicas (two processes) on the same PostgreSQL and Redis behave as one service."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from .conftest import RealServices, delete_keys
from .processes import service_process

pytestmark = pytest.mark.anyio

ITEMS_PER_REPLICA = 100


@pytest.fixture
def replicas(real_services: RealServices, tmp_path: Path) -> Iterator[list[str]]:
    """Two `python -m service` processes on the real servers; their base URLs."""
    prefix = f"sr-test:{uuid.uuid4().hex[:12]}:"
    env = {
        "DATABASE_URL": real_services.database_url,
        "REDIS_URL": real_services.redis_url,
        "CACHE_PREFIX": prefix,
        "FILES_DIR": str(tmp_path / "files"),
    }
    with ExitStack() as stack:
        urls = []
        for index in range(2):
            folder = tmp_path / f"replica{index}"
            folder.mkdir()
            urls.append(stack.enter_context(service_process(env, folder / "stderr.log")))
        yield urls
    asyncio.run(delete_keys(real_services.redis_url, prefix + "*"))


class TestReplicas:
    async def test_user_created_on_one_replica_is_read_on_the_other(
        self, replicas: list[str]
    ) -> None:
        """A user written through replica A is served by replica B."""
        a, b = replicas
        async with httpx.AsyncClient() as client:
            created = await client.post(
                f"{a}/users", json={"name": "R", "email": f"{uuid.uuid4().hex}@r.io"}
            )
            assert created.status_code == 201, created.text
            fetched = await client.get(f"{b}/users/{created.json()['id']}")
        assert fetched.json() == created.json()

    async def test_cache_is_shared(self, replicas: list[str]) -> None:
        """A value cached through A is read through B, and /combo sees the other's access."""
        a, b = replicas
        async with httpx.AsyncClient() as client:
            await client.post(f"{a}/cache/shared", params={"value": "one"})
            assert (await client.get(f"{b}/cache/shared")).json()["value"] == "one"
            first = (await client.get(f"{a}/combo")).json()
            second = (await client.get(f"{b}/combo")).json()
        assert second["previous_access"] == first["last_access"]

    async def test_concurrent_writes_through_both_replicas_all_land(
        self, replicas: list[str]
    ) -> None:
        """Concurrent POST /items through both replicas all succeed with distinct ids."""
        limits = httpx.Limits(max_connections=20)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            started = time.perf_counter()
            responses = await asyncio.gather(
                *(
                    client.post(f"{url}/items", json={"name": f"rep-{i}"})
                    for i in range(ITEMS_PER_REPLICA)
                    for url in replicas
                )
            )
            elapsed = time.perf_counter() - started
            assert [r.status_code for r in responses] == [201] * len(responses)
            ids = {r.json()["id"] for r in responses}
            assert len(ids) == len(responses)
            listed: set[int] = set()
            for offset in range(0, 100_000, 100):
                page = (await client.get(f"{replicas[1]}/items?limit=100&offset={offset}")).json()
                listed |= {item["id"] for item in page}
                if len(page) < 100:
                    break
        assert ids <= listed
        print(
            f"\n{len(responses)} POST /items through 2 replicas in {elapsed:.2f} s "
            f"({len(responses) / elapsed:.0f} req/s)"
        )
