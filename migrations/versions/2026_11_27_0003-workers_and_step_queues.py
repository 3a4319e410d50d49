"""workers and step queues: which workers are alive and what they consume (GPU jobs wait for a
GPU worker and say so), and the queue each step runs on (a job can move between GPU kinds)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("gpu", sa.JSON(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.alter_column("queue", type_=sa.String(64), existing_type=sa.String(16), existing_nullable=False)
    with op.batch_alter_table("job_steps") as batch_op:
        batch_op.add_column(sa.Column("queue", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_steps") as batch_op:
        batch_op.drop_column("queue")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.alter_column("queue", type_=sa.String(16), existing_type=sa.String(64), existing_nullable=False)
    op.drop_table("workers")
