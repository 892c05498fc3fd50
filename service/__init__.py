"""The reference service of scoped-resources: the FastAPI tutorial's system, done right.

Run it with ``python -m service``; see ``service/README.md``.
"""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
