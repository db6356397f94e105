"""Delivery engine: retry schedule and relay per ledger row, bounce counts, suppression list,
relay usage for rate windows, a campaign's status note.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.add_column(sa.Column("first_attempt_at", sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column("relay", sa.String(length=64), nullable=True))
    with op.batch_alter_table("subscribers") as batch_op:
        batch_op.add_column(sa.Column("hard_bounces", sa.Integer(), nullable=False,
                                      server_default="0"))
        batch_op.add_column(sa.Column("soft_bounces", sa.Integer(), nullable=False,
                                      server_default="0"))
    with op.batch_alter_table("campaigns") as batch_op:
        batch_op.add_column(sa.Column("status_note", sa.Text(), nullable=True))
    op.create_table(
        "suppressions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email_key", sa.String(length=320), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("note", sa.Text(), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_suppressions")),
        sa.UniqueConstraint("email_key", name=op.f("uq_suppressions_email_key")),
    )
    op.create_table(
        "relay_usage",
        sa.Column("relay", sa.String(length=64), nullable=False),
        sa.Column("second", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("relay", "second", name=op.f("pk_relay_usage")),
    )


def downgrade() -> None:
    op.drop_table("relay_usage")
    op.drop_table("suppressions")
    with op.batch_alter_table("campaigns") as batch_op:
        batch_op.drop_column("status_note")
    with op.batch_alter_table("subscribers") as batch_op:
        batch_op.drop_column("soft_bounces")
        batch_op.drop_column("hard_bounces")
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.drop_column("relay")
        batch_op.drop_column("next_attempt_at")
        batch_op.drop_column("first_attempt_at")
