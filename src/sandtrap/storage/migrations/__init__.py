"""Alembic migrations for the sandtrap schema, run by :func:`sandtrap.storage.migrate.upgrade`."""
