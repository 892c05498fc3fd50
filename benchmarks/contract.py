"""The contract every app answers to, checked once per endpoint (runner and smoke test)."""

from __future__ import annotations

import httpx


async def check_contract(client: httpx.AsyncClient, name: str) -> None:
    """Call every endpoint of the app behind *client* once; raise AssertionError if off."""
    r = await client.get("/users/42")
    assert r.status_code == 200, (name, r.status_code, r.text)
    assert r.json() == {"id": 42, "name": "user 42", "email": "user42@example.com"}, r.text
    r = await client.get("/users/0")
    assert r.status_code == 404, (name, r.status_code, r.text)
    r = await client.get("/combo")
    assert r.status_code == 200, (name, r.status_code, r.text)
    assert isinstance(r.json()["logs"], int), r.text
    r = await client.post("/cache/check", params={"value": name})
    assert r.status_code == 200, (name, r.status_code, r.text)
    assert r.json() == {"msg": "cached"}, r.text
    r = await client.post("/items", json={"name": f"check {name}"})
    assert r.status_code == 201, (name, r.status_code, r.text)
    assert isinstance(r.json()["id"], int), r.text
