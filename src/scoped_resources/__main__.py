"""``python -m scoped_resources check|graph MODULE:APP``."""

from ._cli import main

raise SystemExit(main())
