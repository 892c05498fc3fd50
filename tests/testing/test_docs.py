"""Every Python example in docs/testing.md runs, and passes, as a test module."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

DOC = Path(__file__).parents[2] / "docs" / "testing.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)


def test_the_doc_has_examples() -> None:
    """The testing guide holds runnable examples."""
    assert len(BLOCKS) >= 4


@pytest.mark.integration
@pytest.mark.parametrize("source", BLOCKS, ids=[f"example-{n}" for n in range(len(BLOCKS))])
def test_example_passes(source: str, pytester: pytest.Pytester, pg_dsn: str) -> None:
    """The example runs as a test module with the plugin loaded, and all its tests pass."""
    pytester.makeini(
        "[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(test_example=source)
    result = pytester.runpytest("-p", "no:randomly")
    assert result.ret == 0, result.stdout.str()
    assert result.parseoutcomes().get("passed", 0) >= 1
