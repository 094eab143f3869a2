"""OpenID Connect: logins under way and provider accounts linked to users.

Revision ID: mobis_0002
Revises: mobis_0001
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "mobis_0002"
down_revision = "mobis_0001"
branch_labels = None
depends_on = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "oidc_logins",
        sa.Column("state_hash", sa.String(64), primary_key=True),
        sa.Column("nonce", sa.String(100), nullable=False),
        sa.Column("code_verifier", sa.String(128), nullable=False),
        sa.Column("device_id", sa.String(100)),
        sa.Column("expires_at", WHEN, nullable=False, index=True),
    )
    op.create_table(
        "oidc_identities",
        sa.Column("issuer", sa.String(500), primary_key=True),
        sa.Column("subject", sa.String(255), primary_key=True),
        sa.Column("user_id", sa.String(36), nullable=False, index=True),
        sa.Column("created_at", WHEN, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("oidc_identities")
    op.drop_table("oidc_logins")
