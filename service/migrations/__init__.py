"""Alembic migrations, run programmatically on PostgreSQL and SQLite alike."""
