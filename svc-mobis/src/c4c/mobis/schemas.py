# ruff: noqa: N815  (camelCase fields, as the app and Darwin Core spell them)
"""Requests and answers of the MOBIS API, and the data of the events it consumes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

# A database integer (int64): larger values are refused here, not by the driver with a 500.
MAX_INT = 2**63 - 1
# No control characters (NUL is refused by PostgreSQL) in any string of an account.
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
Email = Annotated[
    str,
    Field(
        min_length=3,
        max_length=320,
        pattern=r"^[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+$",
    ),
]
Label = Annotated[str, Field(min_length=1, max_length=100, pattern=PRINTABLE)]
Password = Annotated[str, Field(min_length=1, max_length=1024)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]
MediaType = Annotated[
    str, Field(max_length=100, pattern=r"^(image|video|audio)/[A-Za-z0-9.+-]{1,60}$")
]
CLIENT_SET = frozenset({"id", "recordedBy"})


def _normal_email(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- accounts -------------------------------------------------------------------------------


class Register(Strict):
    email: Email
    password: Password
    displayName: Label | None = Field(
        None, description="How the user is credited on observations; unset = 'MOBIS user'."
    )

    _email = field_validator("email", mode="before")(_normal_email)


class Login(Strict):
    email: Email
    password: Password
    deviceId: Label | None = None

    _email = field_validator("email", mode="before")(_normal_email)


class Refresh(Strict):
    refresh_token: Annotated[str, Field(min_length=1, max_length=200)]


class Logout(Strict):
    refresh_token: Annotated[str, Field(min_length=1, max_length=200)] | None = Field(
        None, description="End this session (its token family); unset with everywhere=true."
    )
    everywhere: bool = Field(False, description="End every session of the user.")


class PasswordChange(Strict):
    current_password: Password | None = Field(
        None,
        description="Required when the account has a password; an account without one "
        "(hasPassword false) sends none and calls with an access token from a fresh sign-in.",
    )
    new_password: Password


class AccountDeletion(Strict):
    password: Password | None = Field(
        None,
        description="The current password; an account without one sends none and calls "
        "with an access token from a fresh sign-in.",
    )


class OidcStart(BaseModel):
    """Where to send the user to sign in at the OpenID Connect provider."""

    authorizationUrl: str
    state: str = Field(description="Comes back with the code; the callback needs both.")
    expiresIn: int = Field(description="Seconds left to finish the login.")


class IdTokenLogin(Strict):
    """An ID token the app obtained from the provider itself (native sign-in)."""

    id_token: Annotated[str, Field(min_length=1, max_length=16384)]
    nonce: Annotated[str, Field(min_length=1, max_length=200)] | None = Field(
        None, description="The nonce the app sent the provider; the token must carry it."
    )
    deviceId: Label | None = None


class Tokens(BaseModel):
    """An OAuth 2.0 token response (RFC 6749 §5.1)."""

    access_token: str
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105  (a scheme name, not a secret)
    expires_in: int
    refresh_token: str
    refresh_expires_in: int
    scope: str


class Account(BaseModel):
    id: str
    email: str
    displayName: str
    createdAt: datetime
    hasPassword: bool = Field(
        description="False for an account made by an OpenID Connect sign-in that never set "
        "one: it confirms a password change or deletion by signing in again instead."
    )


# --- sync -----------------------------------------------------------------------------------


class MediaAnnounced(Strict):
    id: UUID = Field(description="The app's id of this file: uploads and retries name it.")
    sha256: Sha256
    size: int = Field(gt=0, le=MAX_INT)
    contentType: MediaType


class SyncItem(Strict):
    id: UUID = Field(description="The app's id of the observation (kept by the server).")
    createdAt: datetime = Field(description="When the observation was made on the phone.")
    formVersion: Annotated[str, Field(min_length=1, max_length=50)] | None = None
    baseVersion: int | None = Field(
        None, ge=1, le=MAX_INT, description="Edit of an observation the app holds at this version."
    )
    observation: dict[str, Any] = Field(
        description="Darwin Core fields as ingest takes them (datasetID, eventDate, "
        "decimalLatitude, …, measurements for environmental readings); id and recordedBy "
        "are set by the server."
    )
    media: list[MediaAnnounced] = Field(default_factory=list, max_length=20)

    @field_validator("observation")
    @classmethod
    def _no_server_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(CLIENT_SET & value.keys())
        if taken:
            raise ValueError(f"{', '.join(taken)} is set by the server")
        return value


class SyncRequest(Strict):
    observations: list[SyncItem] = Field(min_length=1)


SyncStatus = Literal["created", "duplicate", "updated", "conflict", "error"]


class SyncOutcome(BaseModel):
    index: int
    id: str
    status: SyncStatus
    version: int | None = None
    missingMedia: list[str] = Field(default_factory=list)
    serverVersion: dict[str, Any] | None = Field(
        None, description="On conflict: the observation as the server holds it."
    )
    problem: dict[str, Any] | None = None


class SyncResult(BaseModel):
    items: list[SyncOutcome]


# --- media ----------------------------------------------------------------------------------


class MediaState(BaseModel):
    id: str
    contentType: str
    size: int
    received: int = Field(description="Bytes the server holds; resume the upload from here.")
    stored: bool


class MissingMedia(BaseModel):
    observationId: str
    missing: list[MediaState]


# --- my observations ------------------------------------------------------------------------

Status = Literal["awaiting-media", "uploaded", "scored", "identified", "research"]


class Suggestion(BaseModel):
    model_config = ConfigDict(extra="ignore")

    scientificName: str
    score: float | None = None
    taxonRank: str | None = None
    family: str | None = None
    gbifId: int | str | None = None


class QualityView(BaseModel):
    score: float | None = None
    grade: str | None = None
    tips: list[str] = Field(default_factory=list)


class MyObservation(BaseModel):
    id: str
    project: str
    version: int
    status: Status
    scored: bool
    identified: bool
    observation: dict[str, Any]
    quality: QualityView
    suggestions: list[Suggestion]
    media: list[MediaState]
    createdAt: datetime
    updatedAt: datetime


class MyObservationPage(BaseModel):
    items: list[MyObservation]
    next: str | None = None


class Notification(BaseModel):
    id: int
    observationId: str
    kind: Literal["scored", "identified"]
    data: dict[str, Any]
    createdAt: datetime
    read: bool


class NotificationPage(BaseModel):
    items: list[Notification]
    unread: int
    next: int | None = Field(None, description="Pass as after= for the next page.")


class MarkRead(Strict):
    upTo: int = Field(ge=0, le=MAX_INT, description="Mark notifications up to this id read.")


# --- events consumed ------------------------------------------------------------------------

_OBSERVATION = AliasChoices("observation_id", "observationId")


class Flag(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: str = Field(max_length=100)
    severity: str | None = Field(None, max_length=20)
    message: str | None = Field(None, max_length=2000)
    tip: str | None = Field(None, max_length=2000)


class ObservationScored(BaseModel):
    model_config = ConfigDict(extra="ignore")

    observation_id: str = Field(validation_alias=_OBSERVATION, max_length=64)
    observation_version: int | None = None
    score: float | None = None
    grade: str | None = Field(None, max_length=50)
    flags: list[Flag] = Field(default_factory=list, max_length=500)


class ObservationIdentified(BaseModel):
    model_config = ConfigDict(extra="ignore")

    observation_id: str = Field(validation_alias=_OBSERVATION, max_length=64)
    rejected: bool = False
    candidates: list[Suggestion] = Field(default_factory=list, max_length=100)
    model_version: str | None = None


class ObservationUpdated(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(max_length=64)
    version: int
