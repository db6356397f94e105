"""Bilingual editions: campaign_editions, the edition of each ledger row, archive per language.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "campaign_editions",
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("language", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("issue_json", sa.Text(), nullable=False),
        sa.Column("html", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaigns.id"],
                                name=op.f("fk_campaign_editions_campaign_id_campaigns"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("campaign_id", "language", name=op.f("pk_campaign_editions")),
    )
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("edition", sa.String(length=16), nullable=True))
    with op.batch_alter_table("archive") as batch:
        batch.drop_constraint("uq_archive_list_id_issue_key", type_="unique")
        batch.create_unique_constraint("uq_archive_list_id_issue_key_language",
                                       ["list_id", "issue_key", "language"])


def downgrade() -> None:
    with op.batch_alter_table("archive") as batch:
        batch.drop_constraint("uq_archive_list_id_issue_key_language", type_="unique")
        batch.create_unique_constraint("uq_archive_list_id_issue_key", ["list_id", "issue_key"])
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("edition")
    op.drop_table("campaign_editions")
