"""optional steps: a job's candidate steps (preset auto) whose failure is recorded on the step while
the job goes on

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_steps") as batch_op:
        batch_op.add_column(sa.Column("optional", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("job_steps") as batch_op:
        batch_op.drop_column("optional")
