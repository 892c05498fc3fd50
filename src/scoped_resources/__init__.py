"""scoped-resources: async resources that are safe and fast in FastAPI.

Declare each resource once; the app-scoped ones open in the lifespan, the
request-scoped ones are acquired per request and released before the response,
in reverse order, shielded from cancellation and bounded by deadlines.
"""

from ._app_scope import AppScope
from ._lease import Lease
from ._registry import Resources
from ._resource import Resource
from ._scope import Scope
from .fastapi import Use

__all__ = ["AppScope", "Lease", "Resource", "Resources", "Scope", "Use"]
