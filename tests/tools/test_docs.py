"""The example in docs/tools.md runs: a sound graph and a page that answers."""

import re
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from scoped_resources._check import check, registries_of

DOC = Path(__file__).resolve().parents[2] / "docs" / "tools.md"

pytestmark = pytest.mark.anyio


async def test_page_example_checks_clean_and_serves_its_page() -> None:
    """The documented app has no problem, and its page lists its resource for the token."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1
    namespace: dict[str, object] = {"__name__": "tools_doc_example"}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
    app = namespace["app"]
    assert check(app, registries_of(app)) == []
    async with LifespanManager(app) as manager:  # type: ignore[arg-type]
        transport = httpx.ASGITransport(manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://doc") as client:
            assert (await client.get("/price/tea")).json() == 3
            data = (await client.get("/resources/data.json?token=change-me")).json()
            assert (await client.get("/resources")).status_code == 401
    assert [r["name"] for r in data["resources"]] == ["prices"]
    assert data["resources"][0]["owners_open"] == 1
