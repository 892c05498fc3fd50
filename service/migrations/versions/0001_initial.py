"""Users, items, logs and the event outbox.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the four tables."""
    op.create_table(
        "users",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.UniqueConstraint("email", name="users_email_key"),
    )
    op.create_table(
        "items",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
    )
    op.create_table(
        "logs",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column(
            "item_id", Id, sa.ForeignKey("items.id", name="logs_item_id_fkey"), nullable=False
        ),
        sa.Column("message", sa.String(200), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("topic", sa.String(100), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("sent_at", Timestamp, nullable=True),
    )
    op.create_index("outbox_sent_at_idx", "outbox", ["sent_at"])


def downgrade() -> None:
    """Drop the four tables."""
    op.drop_index("outbox_sent_at_idx", table_name="outbox")
    op.drop_table("outbox")
    op.drop_table("logs")
    op.drop_table("items")
    op.drop_table("users")
