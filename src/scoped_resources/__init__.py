"""scoped-resources: async resources that are safe and fast in FastAPI.

Declare each resource once; the app-scoped ones open in the lifespan, the
request-scoped ones are acquired per request and released before the response,
in reverse order, shielded from cancellation and bounded by deadlines.

The core imports no web framework: ``Use``, the FastAPI marker, is loaded (with
the FastAPI integration) the first time it is asked for.
"""

from typing import TYPE_CHECKING, Any

from ._app_scope import AppScope
from ._lease import Lease
from ._registry import Resources
from ._resource import Resource
from ._scope import Scope

if TYPE_CHECKING:
    from .fastapi import Use

__all__ = ["AppScope", "Lease", "Resource", "Resources", "Scope", "Use"]


def __getattr__(name: str) -> Any:
    if name == "Use":
        from .fastapi import Use

        return Use
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
