"""Inner pytest sessions (pytester) load the plugin the way a user's project does.

The plugin is loaded through its pytest11 entry point, as in a user's project.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import PG_DSN, REDIS_URL

#: The conftest of every inner session: the plugin, asyncio, the real services.
INNER_CONFTEST = textwrap.dedent(
    f"""
    import pytest

    PG_DSN = {PG_DSN!r}
    REDIS_URL = {REDIS_URL!r}


    @pytest.fixture
    def anyio_backend():
        return "asyncio"
    """
)

INNER_INI = textwrap.dedent(
    """
    [pytest]
    filterwarnings = error
    addopts = -p no:cacheprovider
    asyncio_default_fixture_loop_scope = function
    """
)


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester project with the plugin loaded, strict warnings, and the service URLs."""
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makeini(INNER_INI)
    return pytester
