"""Compact per-image tables: a job number, bytes for hashes and ids, keys rebuilt, a crop's distance in its row.

Revision ID: 0002
Revises: 0001

The tables that grow with a job's images are replaced (see schema.py, "per-image records"):
downloads, images, image_shas, global_shas, phashes, superseded_images, detections, crops,
distances, duplicates and compare_failures give way to url_outcomes, kept_images, superseded,
detected_images (with the crops packed), crop_distances, duplicates and compare_failures keyed by job number. The
revision carries no job records over: it refuses a database whose old per-image tables hold
rows (finish and export those jobs with the imgsift that wrote them, or start a new database),
and is irreversible.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from imgsift_common.schema import SchemaMismatch

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

OLD = (
    "downloads", "images", "image_shas", "global_shas", "phashes", "superseded_images",
    "detections", "crops", "distances", "duplicates", "compare_failures",
)  # fmt: skip
# Kept, but its bins are counted anew: ten to each of 0001's (sqlstate.BINS).
BINS_0001 = "distance_bins"


def upgrade() -> None:
    conn = op.get_bind()
    held = [
        name for name in (*OLD, BINS_0001) if conn.execute(sa.text(f"SELECT 1 FROM {name} LIMIT 1")).first() is not None
    ]
    if held:
        raise SchemaMismatch(
            f"schema revision 0002 does not carry job records over, and {', '.join(held)} hold some: finish and "
            "export those jobs with the imgsift version that wrote them, or migrate a new database (for "
            "`imgsift collect`, a new --out folder)"
        )
    for name in OLD:
        op.drop_table(name)  # their indexes go with them
    op.create_table(
        "duplicates",
        sa.Column("job", sa.Integer(), nullable=False),
        sa.Column("kept_digest", sa.LargeBinary(length=16), nullable=False),
        sa.Column("url_digest", sa.LargeBinary(length=16), nullable=False),
        sa.PrimaryKeyConstraint("job", "kept_digest", "url_digest", name=op.f("pk_duplicates")),
    )
    op.create_table(
        "compare_failures",
        sa.Column("job", sa.Integer(), nullable=False),
        sa.Column("crop", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("job", "crop", name=op.f("pk_compare_failures")),
    )
    op.create_table(
        "crop_distances",
        sa.Column("job", sa.Integer(), nullable=False),
        sa.Column("crop", sa.LargeBinary(), nullable=False),
        sa.Column("distance", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("job", "crop", name=op.f("pk_crop_distances")),
    )
    with op.batch_alter_table("crop_distances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_crop_distances_job_distance"), ["job", "distance"], unique=False)

    op.create_table(
        "detected_images",
        sa.Column("job", sa.Integer(), nullable=False),
        sa.Column("image", sa.LargeBinary(), nullable=False),
        sa.Column("crops", sa.SmallInteger(), nullable=False),
        sa.Column("tail", sa.LargeBinary(), nullable=True),
        sa.Column("packed", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("job", "image", name=op.f("pk_detected_images")),
    )
    op.create_table(
        "job_numbers",
        sa.Column("num", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.PrimaryKeyConstraint("num", name=op.f("pk_job_numbers")),
        sa.UniqueConstraint("job_id", name=op.f("uq_job_numbers_job_id")),
    )
    op.create_table(
        "kept_images",
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("phash", sa.BigInteger(), nullable=True),
        sa.Column("near", sa.BigInteger(), nullable=True),
        sa.Column("job", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("band0", sa.Integer(), nullable=True),
        sa.Column("band1", sa.Integer(), nullable=True),
        sa.Column("band2", sa.Integer(), nullable=True),
        sa.Column("band3", sa.Integer(), nullable=True),
        sa.Column("sha", sa.LargeBinary(length=32), nullable=False),
        sa.Column("format", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("source", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("key", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=True),
        sa.Column("provenance", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sha", "job", name=op.f("pk_kept_images")),
    )
    with op.batch_alter_table("kept_images", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_kept_images_job_band0"), ["job", "band0"], unique=False)
        batch_op.create_index(batch_op.f("ix_kept_images_job_band1"), ["job", "band1"], unique=False)
        batch_op.create_index(batch_op.f("ix_kept_images_job_band2"), ["job", "band2"], unique=False)
        batch_op.create_index(batch_op.f("ix_kept_images_job_band3"), ["job", "band3"], unique=False)

    op.create_table(
        "superseded",
        sa.Column("job", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.LargeBinary(length=12), nullable=False),
        sa.Column("sha", sa.LargeBinary(length=32), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("job", "prefix", name=op.f("pk_superseded")),
    )
    with op.batch_alter_table("superseded", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_superseded_sha"), ["sha"], unique=False)

    op.create_table(
        "url_outcomes",
        sa.Column("job", sa.Integer(), nullable=False),
        sa.Column("url_digest", sa.LargeBinary(length=16), nullable=False),
        sa.Column("sha", sa.LargeBinary(length=32), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("job", "url_digest", name=op.f("pk_url_outcomes")),
    )


def downgrade() -> None:
    raise NotImplementedError("schema revision 0002 is irreversible: it drops revision 0001's per-image tables")
