"""tasks: a job says what its model does (classification, detection, segmentation, or auto) and its
tolerance on that task's metric; a dataset says whether its labels are classes or boxes

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("task", sa.String(32), nullable=False, server_default="auto"))
        batch_op.add_column(sa.Column("task_options", sa.JSON(), nullable=True))
    with op.batch_alter_table("datasets") as batch_op:
        batch_op.add_column(sa.Column("label_type", sa.String(16), nullable=True))
    datasets = sa.table("datasets", sa.column("labeled", sa.Boolean), sa.column("label_type", sa.String))
    # Every labeled dataset before this revision had class labels (folders or an npz's y).
    op.get_bind().execute(datasets.update().where(datasets.c.labeled.is_(True)).values(label_type="classes"))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch_op:
        batch_op.drop_column("label_type")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("task_options")
        batch_op.drop_column("task")
