"""The core knows no web framework: the FastAPI integration depends on it, never the reverse."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import scoped_resources

PACKAGE = Path(scoped_resources.__file__).parent

#: The modules of the core: declaring, planning, scopes, leases, acquiring, releasing.
CORE = (
    "_acquire",
    "_app_scope",
    "_guard",
    "_lease",
    "_observe",
    "_plan",
    "_registry",
    "_release",
    "_resource",
    "_scope",
    "exceptions",
)

#: Imported by no core module, directly or lazily inside a function.
FRAMEWORKS = ("fastapi", "starlette")


def _imports(module: str) -> set[str]:
    """Every module *module* imports anywhere in its source, as absolute names."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.add(node.module or "")
            else:
                base = f"scoped_resources.{node.module}" if node.module else "scoped_resources"
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("module", CORE)
def test_no_core_module_imports_a_framework_or_the_integration(module: str) -> None:
    """No core module names FastAPI, Starlette or scoped_resources.fastapi in any import."""
    bad = {
        name
        for name in _imports(module)
        if name.split(".")[0] in FRAMEWORKS or name.startswith("scoped_resources.fastapi")
    }
    assert not bad, f"{module} imports {sorted(bad)}"


def test_using_the_core_loads_no_framework() -> None:
    """A fresh interpreter that imports the package and runs a scope never loads FastAPI."""
    program = textwrap.dedent(
        """
        import sys
        from collections.abc import AsyncIterator

        import anyio

        import scoped_resources
        from scoped_resources import Resources

        resources = Resources("core-only")
        events = []

        @resources.app
        async def pool() -> AsyncIterator[str]:
            events.append("open pool")
            yield "pool"
            events.append("close pool")

        @resources.request
        async def conn(p: str = pool) -> AsyncIterator[str]:  # type: ignore[assignment]
            events.append("acquire")
            yield p + ":conn"
            events.append("release")

        async def main() -> None:
            async with resources.open():
                async with resources.scope() as scope:
                    assert await scope.get(conn) == "pool:conn"

        anyio.run(main)
        assert events == ["open pool", "acquire", "release", "close pool"], events
        loaded = sorted(
            name for name in sys.modules
            if name.split(".")[0] in ("fastapi", "starlette")
            or name == "scoped_resources.fastapi"
        )
        print(",".join(loaded))
        """
    )
    done = subprocess.run(  # noqa: S603 - our own interpreter and program
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_the_lifespan_of_an_app_no_integration_serves_names_the_fix() -> None:
    """Asking for the lifespan of an app no loaded integration serves raises a TypeError."""
    resources = scoped_resources.Resources("orphan")
    with pytest.raises(TypeError, match=r"no framework integration serves object apps"):
        resources.lifespan(object())
