"""The near log: a download batch runs its band lookup before the job's gate.

Revision ID: 0004
Revises: 0003

A new table, near_log (see schema.py): per job, a ring of the near hashes the last download
batches kept, numbered in the order they decided, so that a batch looks its candidates up before
taking the job's gate and checks under it only what was kept since. No existing row changes; a
job recorded before has no log rows, and its next batch reads none. Reversible.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "near_log",
        sa.Column("job", sa.Integer(), nullable=False),
        sa.Column("slot", sa.SmallInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("nears", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("job", "slot", name=op.f("pk_near_log")),
    )


def downgrade() -> None:
    op.drop_table("near_log")
