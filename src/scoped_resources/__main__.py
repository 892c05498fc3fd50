"""``python -m scoped_resources check|graph MODULE:APP``."""

from scoped_resources._cli import main

raise SystemExit(main())
