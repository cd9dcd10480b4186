"""The near-duplicate band indexes end with the near hash: a band lookup reads the index alone.

Revision ID: 0003
Revises: 0002

Each of kept_images' four band indexes, (job, bandN), becomes (job, bandN, near) (see schema.py,
kept_images): the candidates of a band lookup, some thousand per image at a million images, are
read from the index (PostgreSQL's index-only scan, SQLite's covering index) instead of one
random heap read each, and the few within reach are read in full by (job, band0, near). On
PostgreSQL, kept_images is vacuumed after 2% new rows (its autovacuum_vacuum_insert_scale_factor;
the default is 20%): an index-only scan reads the heap for rows on pages no vacuum has marked
all-visible yet. Only indexes and that setting change: every row stays as it is. Reversible.
"""

from __future__ import annotations

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

BANDS = 4
INSERT_SCALE = 0.02  # schema.KEPT_IMAGES_INSERT_SCALE when this revision was written


def upgrade() -> None:
    with op.batch_alter_table("kept_images", schema=None) as batch_op:
        for i in range(BANDS):
            batch_op.drop_index(batch_op.f(f"ix_kept_images_job_band{i}"))
            batch_op.create_index(batch_op.f(f"ix_kept_images_job_band{i}_near"), ["job", f"band{i}", "near"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE kept_images SET (autovacuum_vacuum_insert_scale_factor = {INSERT_SCALE})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE kept_images RESET (autovacuum_vacuum_insert_scale_factor)")
    with op.batch_alter_table("kept_images", schema=None) as batch_op:
        for i in range(BANDS):
            batch_op.drop_index(batch_op.f(f"ix_kept_images_job_band{i}_near"))
            batch_op.create_index(batch_op.f(f"ix_kept_images_job_band{i}"), ["job", f"band{i}"])
