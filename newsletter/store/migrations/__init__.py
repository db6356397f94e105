"""Alembic migrations for the store; applied automatically on first use (store.db.migrate)."""
