"""The README's examples run: each python block is executed, in order, in one namespace."""

# No "from __future__ import annotations": the README's routes need real annotations.

import re
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

README = Path(__file__).resolve().parents[1] / "README.md"
README_DSN = "postgresql://postgres@127.0.0.1:5432/test"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def readme_blocks() -> list[str]:
    """The python code blocks of the README, in order."""
    return BLOCK.findall(README.read_text(encoding="utf-8"))


async def run_block(source: str, namespace: dict[str, Any]) -> None:
    """Execute one block; blocks with top-level await run inside a coroutine."""
    if re.search(r"^(async with|await) ", source, re.MULTILINE):
        wrapped = "async def __readme_block__():\n" + textwrap.indent(source, "    ")
        exec(compile(wrapped, str(README), "exec"), namespace)  # noqa: S102 - our own README
        await namespace.pop("__readme_block__")()
    else:
        exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 - our own README


async def call(app: Any, method: str, path: str) -> httpx.Response:
    """One request to *app* with its lifespan running."""
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://readme") as client:
            return await client.request(method, path)


@pytest.mark.anyio
async def test_the_readme_examples_run(pg_dsn: str) -> None:
    """Every block runs, and each app it defines answers as the README says."""
    namespace: dict[str, Any] = {"__name__": "readme"}
    blocks = readme_blocks()
    assert blocks, "the README has python examples"
    apps: list[Any] = []
    for block in blocks:
        await run_block(block.replace(README_DSN, pg_dsn), namespace)
        if namespace.get("app") is not None and (not apps or namespace["app"] is not apps[-1]):
            apps.append(namespace["app"])
    first, pressure = apps
    assert (await call(first, "GET", "/users/7")).json() == {"id": 7}
    assert (await call(pressure, "GET", "/readyz")).json()["status"] == "ready"
    assert (await call(pressure, "POST", "/payments")).json() == {"status": "paid"}


EXAMPLE_BLOCK = re.compile(r"```python (\w+_example\.py)\n(.*?)```", re.DOTALL)


def test_the_readme_shows_each_adapter_example_verbatim() -> None:
    """Every adapter example in the README is the file the suite runs, unchanged."""
    shown = dict(EXAMPLE_BLOCK.findall(README.read_text(encoding="utf-8")))
    examples = README.parent / "examples" / "adapters"
    files = {path.name: path.read_text(encoding="utf-8") for path in examples.glob("*_example.py")}
    assert sorted(shown) == sorted(files)
    for name, source in shown.items():
        assert source == files[name], f"README's {name} differs from examples/adapters/{name}"
