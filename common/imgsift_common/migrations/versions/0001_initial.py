"""Job-state tables: jobs, crawl frontier and outcomes, images, crops, distances and their histogram.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "compare_failures",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("crop_key", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "crop_key", name=op.f("pk_compare_failures")),
    )
    op.create_table(
        "crawl_frontier",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("url_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("lease_until", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_crawl_frontier")),
        sa.UniqueConstraint("job_id", "url_digest", name=op.f("uq_crawl_frontier_job_id_url_digest")),
    )
    with op.batch_alter_table("crawl_frontier", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_crawl_frontier_job_id_lease_until_id"), ["job_id", "lease_until", "id"], unique=False
        )

    op.create_table(
        "crawl_seen",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("url_digest", sa.LargeBinary(length=32), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "url_digest", name=op.f("pk_crawl_seen")),
    )
    op.create_table(
        "crawl_streams",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("stream_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "stream_id", name=op.f("pk_crawl_streams")),
    )
    op.create_table(
        "crops",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("key", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "key", name=op.f("pk_crops")),
    )
    op.create_table(
        "detections",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("image_key", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("crops", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "image_key", name=op.f("pk_detections")),
    )
    op.create_table(
        "distance_bins",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("bin", sa.Integer(), nullable=False),
        sa.Column("crops", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "bin", name=op.f("pk_distance_bins")),
    )
    op.create_table(
        "distances",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("crop_key", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("distance", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "crop_key", name=op.f("pk_distances")),
    )
    with op.batch_alter_table("distances", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_distances_job_id_distance_crop_key"), ["job_id", "distance", "crop_key"], unique=False
        )

    op.create_table(
        "downloads",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("url_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "url_digest", name=op.f("pk_downloads")),
    )
    op.create_table(
        "duplicates",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("kept_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("url_digest", sa.LargeBinary(length=32), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "kept_digest", "url_digest", name=op.f("pk_duplicates")),
    )
    op.create_table(
        "feedback",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("crop_key", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("correct", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "crop_key", name=op.f("pk_feedback")),
    )
    op.create_table(
        "global_shas",
        sa.Column("sha", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("sha", name=op.f("pk_global_shas")),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("key", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_idempotency_keys")),
    )
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_idempotency_keys_expires_at"), ["expires_at"], unique=False)

    op.create_table(
        "image_shas",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("sha", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "sha", name=op.f("pk_image_shas")),
    )
    op.create_table(
        "images",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("key", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "key", name=op.f("pk_images")),
    )
    op.create_table(
        "job_counters",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("name", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "name", name=op.f("pk_job_counters")),
    )
    op.create_table(
        "job_flags",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("name", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "name", name=op.f("pk_job_flags")),
    )
    op.create_table(
        "job_locks",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("name", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("owner", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "name", name=op.f("pk_job_locks")),
    )
    op.create_table(
        "job_markers",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("name", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "name", name=op.f("pk_job_markers")),
    )
    op.create_table(
        "job_notes",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("noted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "digest", name=op.f("pk_job_notes")),
    )
    op.create_table(
        "job_progress",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("fraction", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_job_progress")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("owner", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_created_at_id"), ["created_at", "id"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_owner_created_at_id"), ["owner", "created_at", "id"], unique=False)

    op.create_table(
        "phashes",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("sha", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("hash", sa.BigInteger(), nullable=False),
        sa.Column("band0", sa.Integer(), nullable=False),
        sa.Column("band1", sa.Integer(), nullable=False),
        sa.Column("band2", sa.Integer(), nullable=False),
        sa.Column("band3", sa.Integer(), nullable=False),
        sa.Column("pixels", sa.BigInteger(), nullable=False),
        sa.Column("image_key", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "sha", name=op.f("pk_phashes")),
    )
    with op.batch_alter_table("phashes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_phashes_job_id_band0"), ["job_id", "band0"], unique=False)
        batch_op.create_index(batch_op.f("ix_phashes_job_id_band1"), ["job_id", "band1"], unique=False)
        batch_op.create_index(batch_op.f("ix_phashes_job_id_band2"), ["job_id", "band2"], unique=False)
        batch_op.create_index(batch_op.f("ix_phashes_job_id_band3"), ["job_id", "band3"], unique=False)

    op.create_table(
        "superseded_images",
        sa.Column("job_id", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.Column("sha24", sa.Text().with_variant(sa.TEXT(collation="C"), "postgresql"), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "sha24", name=op.f("pk_superseded_images")),
    )


def downgrade() -> None:
    op.drop_table("superseded_images")
    with op.batch_alter_table("phashes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_phashes_job_id_band3"))
        batch_op.drop_index(batch_op.f("ix_phashes_job_id_band2"))
        batch_op.drop_index(batch_op.f("ix_phashes_job_id_band1"))
        batch_op.drop_index(batch_op.f("ix_phashes_job_id_band0"))

    op.drop_table("phashes")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_owner_created_at_id"))
        batch_op.drop_index(batch_op.f("ix_jobs_created_at_id"))

    op.drop_table("jobs")
    op.drop_table("job_progress")
    op.drop_table("job_notes")
    op.drop_table("job_markers")
    op.drop_table("job_locks")
    op.drop_table("job_flags")
    op.drop_table("job_counters")
    op.drop_table("images")
    op.drop_table("image_shas")
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idempotency_keys_expires_at"))

    op.drop_table("idempotency_keys")
    op.drop_table("global_shas")
    op.drop_table("feedback")
    op.drop_table("duplicates")
    op.drop_table("downloads")
    with op.batch_alter_table("distances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_distances_job_id_distance_crop_key"))

    op.drop_table("distances")
    op.drop_table("distance_bins")
    op.drop_table("detections")
    op.drop_table("crops")
    op.drop_table("crawl_streams")
    op.drop_table("crawl_seen")
    with op.batch_alter_table("crawl_frontier", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_crawl_frontier_job_id_lease_until_id"))

    op.drop_table("crawl_frontier")
    op.drop_table("compare_failures")
