"""GET /items/{id}/enriched through the shared HTTP client, against a fake upstream."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest

from .conftest import PROBLEM, Running, SettingsFactory, running
from .upstream import FakeUpstream

pytestmark = pytest.mark.anyio


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    """A fake upstream listening on a free port."""
    async with FakeUpstream().serve() as fake:
        yield fake


@pytest.fixture
async def service_with_upstream(
    make_settings: SettingsFactory, upstream: FakeUpstream
) -> AsyncIterator[Running]:
    """The service with UPSTREAM_URL pointing at the fake and a short timeout."""
    async with running(make_settings(upstream_url=upstream.url, upstream_timeout=0.5)) as svc:
        yield svc


async def new_item(svc: Running) -> int:
    """Create an item and return its id."""
    response = await svc.client.post("/items", json={"name": "widget"})
    assert response.status_code == 201
    return int(response.json()["id"])


class TestEnriched:
    async def test_item_is_merged_with_the_upstream_answer(
        self, service_with_upstream: Running, upstream: FakeUpstream
    ) -> None:
        """The answer has the upstream's fields plus the item's, and the item's id wins."""
        item_id = await new_item(service_with_upstream)
        response = await service_with_upstream.client.get(f"/items/{item_id}/enriched")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["id"] == item_id
        assert body["name"] == "widget"
        assert body["price"] == 12.5
        assert upstream.paths == [f"/items/{item_id}"]

    @pytest.mark.parametrize(
        ("mode", "status"), [("error", 502), ("missing", 502), ("garbage", 502), ("slow", 504)]
    )
    async def test_upstream_failures_map_to_gateway_errors(
        self, service_with_upstream: Running, upstream: FakeUpstream, mode: str, status: int
    ) -> None:
        """Upstream errors answer 502, an upstream timeout 504, each as a problem document."""
        item_id = await new_item(service_with_upstream)
        upstream.mode = mode
        response = await service_with_upstream.client.get(f"/items/{item_id}/enriched")
        assert response.status_code == status
        assert response.headers["content-type"] == PROBLEM
        assert "upstream" in response.json()["detail"]

    async def test_unreachable_upstream_is_502(self, make_settings: SettingsFactory) -> None:
        """An upstream that refuses connections answers 502."""
        with socket.socket() as sock:  # a port that nothing listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        async with running(make_settings(upstream_url=f"http://127.0.0.1:{port}")) as svc:
            item_id = await new_item(svc)
            response = await svc.client.get(f"/items/{item_id}/enriched")
        assert response.status_code == 502

    async def test_missing_item_is_404_without_calling_upstream(
        self, service_with_upstream: Running, upstream: FakeUpstream
    ) -> None:
        """An unknown item is a 404 and the upstream is not asked."""
        response = await service_with_upstream.client.get("/items/987654321/enriched")
        assert response.status_code == 404
        assert upstream.paths == []

    async def test_without_upstream_url_the_endpoint_is_503(self, service: Running) -> None:
        """With no UPSTREAM_URL configured the endpoint says so with 503."""
        item_id = await new_item(service)
        response = await service.client.get(f"/items/{item_id}/enriched")
        assert response.status_code == 503
        assert "UPSTREAM_URL" in response.json()["detail"]
