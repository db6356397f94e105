"""Subscriber web: list flags (opt-in, public, language, welcome), confirmation throttle,
and the web archive.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("lists") as batch_op:
        batch_op.add_column(sa.Column("double_opt_in", sa.Boolean(), nullable=False,
                                      server_default="1"))
        batch_op.add_column(sa.Column("public", sa.Boolean(), nullable=False,
                                      server_default="1"))
        batch_op.add_column(sa.Column("language", sa.String(length=16), nullable=False,
                                      server_default="en"))
        batch_op.add_column(sa.Column("welcome", sa.Boolean(), nullable=False,
                                      server_default="0"))
    with op.batch_alter_table("subscribers") as batch_op:
        batch_op.add_column(sa.Column("confirm_sent_at", sa.DateTime(timezone=True),
                                      nullable=True))
    op.create_table(
        "archive",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("list_id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=True),
        sa.Column("issue_key", sa.String(length=200), nullable=False),
        sa.Column("number", sa.Integer(), nullable=True),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("language", sa.String(length=16), nullable=False),
        sa.Column("issue_json", sa.Text(), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("views", sa.Integer(), nullable=False, server_default="0"),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaigns.id"],
                                name=op.f("fk_archive_campaign_id_campaigns"),
                                ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["list_id"], ["lists.id"],
                                name=op.f("fk_archive_list_id_lists"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_archive")),
        sa.UniqueConstraint("list_id", "issue_key", name=op.f("uq_archive_list_id_issue_key")),
    )
    op.create_index(op.f("ix_archive_list_id_published_at"), "archive",
                    ["list_id", "published_at"], unique=False)
    # An unsubscribe skips the address's queued ledger rows; without this it scanned them all.
    op.create_index(op.f("ix_deliveries_subscriber_id"), "deliveries", ["subscriber_id"],
                    unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_deliveries_subscriber_id"), table_name="deliveries")
    op.drop_index(op.f("ix_archive_list_id_published_at"), table_name="archive")
    op.drop_table("archive")
    with op.batch_alter_table("subscribers") as batch_op:
        batch_op.drop_column("confirm_sent_at")
    with op.batch_alter_table("lists") as batch_op:
        batch_op.drop_column("welcome")
        batch_op.drop_column("language")
        batch_op.drop_column("public")
        batch_op.drop_column("double_opt_in")
