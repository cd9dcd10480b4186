"""Alembic migrations of the job-state schema (see imgsift_common.schema)."""
