"""webhooks: a job may name a URL that is POSTed the job when it ends, signed with its tenant's
secret; each delivery and its attempts are kept

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.add_column(sa.Column("webhook_secret", sa.String(64), nullable=True))
    tenants = sa.table("tenants", sa.column("id", sa.String), sa.column("webhook_secret", sa.String))
    conn = op.get_bind()
    for (tenant_id,) in conn.execute(sa.select(tenants.c.id)).all():
        conn.execute(tenants.update().where(tenants.c.id == tenant_id).values(webhook_secret=secrets.token_hex(32)))
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.alter_column("webhook_secret", nullable=False, existing_type=sa.String(64))
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("webhook_url", sa.String(2048), nullable=True))
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, unique=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.JSON(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("webhook_url")
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.drop_column("webhook_secret")
