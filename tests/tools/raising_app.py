"""A module whose import fails, as an app with a bad setting would."""

raise RuntimeError("DATABASE_URL is not set")
