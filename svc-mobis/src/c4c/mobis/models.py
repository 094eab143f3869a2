"""Tables of MOBIS: accounts and their tokens, login throttling, the observations each user
owns (with what MOBIS has learnt about them from events), expected media and notifications.
Observations themselves live in ingest; MOBIS never reads ingest's tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

Sequence = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER only
When = DateTime(timezone=True)


class MobisBase(DeclarativeBase):
    pass


class UserRow(MobisBase):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    display_name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(When)
    password_changed_at: Mapped[datetime] = mapped_column(When)


class RefreshTokenRow(MobisBase):
    __tablename__ = "refresh_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    family_id: Mapped[str] = mapped_column(String(36), index=True)
    user_id: Mapped[str] = mapped_column(String(36), index=True)
    device_id: Mapped[str | None] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    issued_at: Mapped[datetime] = mapped_column(When)
    expires_at: Mapped[datetime] = mapped_column(When, index=True)  # pruning (mobis_0007)
    used_at: Mapped[datetime | None] = mapped_column(When)
    revoked_at: Mapped[datetime | None] = mapped_column(When)
    parent_id: Mapped[str | None] = mapped_column(String(36), index=True)
    """The token this one was rotated from; None for a family's first."""
    auth_time: Mapped[datetime | None] = mapped_column(When)
    """When the user last really authenticated in this family (password or provider);
    None for tokens older than this column (never fresh)."""


class LoginThrottleRow(MobisBase):
    """Consecutive failed logins of one key (``account:<email>`` or ``ip:<address>``), or
    accounts registered from one address in a window (``register:<address>``: ``failures``
    counts them, ``blocked_until`` is the window's end)."""

    __tablename__ = "login_throttle"

    key: Mapped[str] = mapped_column(String(400), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    blocked_until: Mapped[datetime] = mapped_column(When)


class OwnedObservationRow(MobisBase):
    """An observation a user synced, and its state as events told MOBIS."""

    __tablename__ = "owned_observations"
    __table_args__ = (
        Index("ix_owned_user_seq", "user_id", "seq"),
        # Just the few reservations, for the settler (see ``Repository.stale_reservations``).
        Index(
            "ix_owned_unconfirmed",
            "updated_at",
            postgresql_where=text("confirmed = false"),
            sqlite_where=text("confirmed = 0"),
        ),
        # Just those of deleted accounts still to pseudonymise (the forgotten ones pile up).
        Index(
            "ix_owned_awaiting_pseudonym",
            "user_id",
            "seq",
            postgresql_where=text("pseudonym IS NOT NULL"),
            sqlite_where=text("pseudonym IS NOT NULL"),
        ),
    )

    seq: Mapped[int] = mapped_column(Sequence, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    user_id: Mapped[str | None] = mapped_column(String(36))
    project: Mapped[str] = mapped_column(String(200))
    body_hash: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)
    score: Mapped[float | None] = mapped_column(Float)
    grade: Mapped[str | None] = mapped_column(String(50))
    flags: Mapped[list[Any] | None] = mapped_column(JSON)
    scored_at: Mapped[datetime | None] = mapped_column(When)
    suggestions: Mapped[list[Any] | None] = mapped_column(JSON)
    identification_rejected: Mapped[bool | None] = mapped_column()
    identified_at: Mapped[datetime | None] = mapped_column(When)
    pseudonym: Mapped[str | None] = mapped_column(String(100))
    confirmed: Mapped[bool] = mapped_column(Boolean, default=True)
    """False from sync's reservation until ingest has the observation (see ``sync``, and
    ``settle_reservations`` for a sync that never finished)."""
    created_at: Mapped[datetime] = mapped_column(When)
    updated_at: Mapped[datetime] = mapped_column(When)


class ExpectedMediaRow(MobisBase):
    """A media file the app announced with an observation; ``stored_at`` once in ingest."""

    __tablename__ = "expected_media"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    observation_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("owned_observations.id", ondelete="CASCADE"), index=True
    )
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(100))
    received: Mapped[int] = mapped_column(BigInteger)
    stored_at: Mapped[datetime | None] = mapped_column(When)


class NotificationRow(MobisBase):
    __tablename__ = "notifications"
    __table_args__ = (
        Index("ix_notifications_user_seq", "user_id", "seq"),
        # A user's unread ones, counted with every page and marked read, not all they had.
        Index(
            "ix_notifications_unread",
            "user_id",
            "seq",
            postgresql_where=text("read_at IS NULL"),
            sqlite_where=text("read_at IS NULL"),
        ),
    )

    seq: Mapped[int] = mapped_column(Sequence, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(36))
    observation_id: Mapped[str] = mapped_column(String(36))
    kind: Mapped[str] = mapped_column(String(30))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(When)
    read_at: Mapped[datetime | None] = mapped_column(When)


class OidcLoginRow(MobisBase):
    """An OpenID Connect login started and not yet finished: what its callback must match.
    The state is kept hashed, like refresh tokens."""

    __tablename__ = "oidc_logins"

    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(100))
    code_verifier: Mapped[str] = mapped_column(String(128))
    device_id: Mapped[str | None] = mapped_column(String(100))
    expires_at: Mapped[datetime] = mapped_column(When, index=True)


class OidcIdentityRow(MobisBase):
    """A provider's account (issuer and subject) linked to a MOBIS user."""

    __tablename__ = "oidc_identities"

    issuer: Mapped[str] = mapped_column(String(500), primary_key=True)
    subject: Mapped[str] = mapped_column(String(255), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(36), index=True)
    created_at: Mapped[datetime] = mapped_column(When)
