"""Delivery workers: the workers table, each ledger row's claiming worker, relay locks.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    op.create_table(
        "relay_locks",
        sa.Column("relay", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("relay", name=op.f("pk_relay_locks")),
    )
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("worker_id", sa.Integer(), nullable=True))
    # The salt for erased addresses' hashes, created here once rather than on first use,
    # where two imports starting together could both try to create it.
    op.execute(sa.text(
        "INSERT INTO meta (key, value) SELECT :key, :value "
        "WHERE NOT EXISTS (SELECT 1 FROM meta WHERE key = :key)",
    ).bindparams(key="erase_salt", value=secrets.token_hex(32)))
    op.create_index("ix_deliveries_worker_id", "deliveries", ["worker_id"],
                    sqlite_where=sa.text("worker_id IS NOT NULL"),
                    postgresql_where=sa.text("worker_id IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_deliveries_worker_id", table_name="deliveries")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("worker_id")
    op.drop_table("relay_locks")
    op.drop_table("workers")
