"""API_TOKEN: mutating endpoints need the bearer token; reads do not."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .conftest import PROBLEM, Running, SettingsFactory, running

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-token"


@pytest.fixture
async def guarded(make_settings: SettingsFactory) -> AsyncIterator[Running]:
    """The service with API_TOKEN set."""
    async with running(make_settings(api_token=TOKEN)) as svc:
        yield svc


MUTATIONS = [
    ("POST", "/users", {"json": {"name": "A", "email": "a@auth.io"}}),
    ("POST", "/items", {"json": {"name": "A"}}),
    ("POST", "/cache/k", {"params": {"value": "v"}}),
    ("POST", "/files", {"files": {"file": ("a.txt", b"a")}}),
]


class TestAuth:
    @pytest.mark.parametrize(("method", "path", "kwargs"), MUTATIONS)
    async def test_mutation_without_token_is_401(
        self, guarded: Running, method: str, path: str, kwargs: dict[str, object]
    ) -> None:
        """Every mutating endpoint answers 401 with WWW-Authenticate when the token is missing."""
        response = await guarded.client.request(method, path, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == 401
        assert response.headers["content-type"] == PROBLEM
        assert response.headers["www-authenticate"] == "Bearer"

    @pytest.mark.parametrize(
        "header", [f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", "Bearer ", TOKEN]
    )
    async def test_wrong_token_is_401(self, guarded: Running, header: str) -> None:
        """A wrong, truncated, non-bearer or bare token is refused."""
        response = await guarded.client.post(
            "/items", json={"name": "A"}, headers={"Authorization": header}
        )
        assert response.status_code == 401

    @pytest.mark.parametrize(("method", "path", "kwargs"), MUTATIONS)
    async def test_mutation_with_token_succeeds(
        self, guarded: Running, method: str, path: str, kwargs: dict[str, object]
    ) -> None:
        """With the right token every mutating endpoint works."""
        response = await guarded.client.request(
            method,
            path,
            headers={"Authorization": f"Bearer {TOKEN}"},
            **kwargs,  # type: ignore[arg-type]
        )
        assert response.status_code in (200, 201), response.text

    async def test_reads_need_no_token(self, guarded: Running) -> None:
        """GET endpoints stay open."""
        assert (await guarded.client.get("/items")).status_code == 200
        assert (await guarded.client.get("/combo")).status_code == 200
