"""tenants: every key, model, dataset and job belongs to one; admin keys manage them; quotas

Rows made before tenants existed go to the tenant 'default', and keys made before then become
admin keys (they could do everything before; the operator revokes or replaces them).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

DEFAULT = "default"
OWNED = ("api_keys", "models", "datasets", "jobs")


def upgrade() -> None:
    tenants = op.create_table(
        "tenants",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("max_concurrent_jobs", sa.Integer(), nullable=True),
        sa.Column("max_storage_bytes", sa.BigInteger(), nullable=True),
        sa.Column("max_uploads_per_minute", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.bulk_insert(tenants, [{"id": DEFAULT, "name": DEFAULT, "created_at": datetime.now(UTC)}])
    for table in OWNED:
        with op.batch_alter_table(table) as batch_op:
            # The server default fills the existing rows; it is dropped below so that new rows
            # must name their tenant.
            batch_op.add_column(sa.Column("tenant_id", sa.String(32), nullable=False, server_default=DEFAULT))
            batch_op.create_foreign_key(f"fk_{table}_tenant_id_tenants", "tenants", ["tenant_id"], ["id"])
            batch_op.create_index(f"ix_{table}_tenant_id", ["tenant_id"])
        with op.batch_alter_table(table) as batch_op:
            batch_op.alter_column(
                "tenant_id", server_default=None, existing_type=sa.String(32), existing_nullable=False
            )
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.add_column(sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.true()))
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.alter_column("is_admin", server_default=None, existing_type=sa.Boolean(), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.drop_column("is_admin")
    for table in reversed(OWNED):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_index(f"ix_{table}_tenant_id")
            batch_op.drop_constraint(f"fk_{table}_tenant_id_tenants", type_="foreignkey")
            batch_op.drop_column("tenant_id")
    op.drop_table("tenants")
