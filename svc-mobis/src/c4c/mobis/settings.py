"""Settings of the mobis service: ``C4C_MOBIS_*``, else ``C4C_*``."""

from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr, model_validator

from c4c.shared.settings import ServiceSettings


class MobisSettings(ServiceSettings):
    service_name: ClassVar[str] = "mobis"

    port: int = 8005
    signing_key: SecretStr | None = Field(
        None,
        description="PEM private key (Ed25519 or RSA) access tokens are signed with; unset = "
        "one generated on first start and kept in <data_dir>/mobis-signing-key.pem (mode 600). "
        "Replicas must share it (this setting, or the data directory).",
    )
    jwt_audience: str = Field("c4c", description="Audience of access tokens (the gateway's).")
    jwt_issuer: str = Field("c4c-mobis", description="Issuer named in access tokens.")
    access_token_seconds: int = Field(900, ge=30, description="Lifetime of an access token.")
    refresh_token_days: float = Field(30.0, gt=0, description="Lifetime of a refresh token.")
    token_scope: str = Field(
        "mobis", description="Scopes (space-separated) an app user's access token carries."
    )
    refresh_grace_seconds: float = Field(
        30.0,
        ge=0,
        description="A refresh token repeated this soon after it was rotated (the answer "
        "was lost on a bad network) gets a new pair instead of ending the session; 0 = "
        "every repeat counts as reuse.",
    )
    reauthentication_seconds: int = Field(
        300,
        ge=30,
        le=3600,
        description="How recent a sign-in must be for an account without a password to set "
        "one or delete itself (the access token's auth_time).",
    )
    password_min_length: int = Field(10, ge=8, description="Shortest password accepted.")
    password_hash_memory_kib: int = Field(
        65536, ge=1024, description="Memory argon2id uses per password hash (KiB)."
    )
    password_hash_time_cost: int = Field(3, ge=1, description="argon2id passes per hash.")
    login_free_failures: int = Field(
        5, ge=1, description="Failed logins of one account before each try is slowed."
    )
    login_free_failures_per_ip: int = Field(
        20, ge=1, description="Failed logins from one address before each try is slowed."
    )
    registrations_per_address: int = Field(
        50,
        ge=0,
        description="Accounts one address may register an hour (each costs a password hash "
        "and has its own quotas; a bioblitz on one Wi-Fi shares an address); 0 = no limit.",
    )
    login_max_delay_seconds: float = Field(
        900.0, gt=0, description="Longest wait imposed between tries (doubles per failure)."
    )
    sync_max_items: int = Field(200, ge=1, le=1000, description="Most items in one sync.")
    media_max_bytes: int = Field(
        200 * 1024 * 1024, ge=1024, description="Largest media file an app may upload."
    )
    media_chunk_max_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest chunk of a resumable upload."
    )
    upload_dir: Path | None = Field(
        None, description="Partial uploads; unset = <data_dir>/mobis-uploads (shared by replicas)."
    )
    reservation_grace_seconds: float = Field(
        600.0,
        ge=60,
        description="A synced observation MOBIS reserved but never confirmed (the sync was "
        "refused or cut off) is forgotten once untouched this long if ingest does not have it "
        "(the app's retry reserves it again); one ingest has waits for the app's retry to "
        "confirm it. Keep it well above the longest sync.",
    )
    reservation_settle_seconds: float = Field(
        60.0, gt=0, description="How often each replica looks for reservations to settle."
    )
    identify_max_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, description="Largest photo POST /identify forwards."
    )
    page_size: int = Field(50, ge=1, le=500, description="Default page of my observations.")
    sse_poll_seconds: float = Field(
        1.0, gt=0, description="SSE streams look for new notifications at least this often."
    )
    sse_keepalive_seconds: float = Field(
        15.0, gt=0, description="Seconds between keep-alive comments on a quiet SSE stream."
    )
    sse_max_seconds: float = Field(
        300.0,
        gt=0,
        description="A live stream ends after this long; the app reconnects with Last-Event-ID "
        "(so no stream outlives a deploy or a proxy's limits).",
    )
    apps_file: Path | None = Field(
        None,
        description="JSON file of app configurations ({app: {versions: [...]}}); unset = the "
        "built-in demo configuration.",
    )

    oidc_issuer: str | None = Field(
        None,
        description="OpenID Connect provider users may also sign in with (e.g. Authenix), "
        "its issuer URL; its metadata is read from <issuer>/.well-known/openid-configuration. "
        "Unset = no OpenID Connect login (its routes answer 404).",
    )
    oidc_client_id: str | None = Field(
        None, description="MOBIS' client id at the provider (the audience of its ID tokens)."
    )
    oidc_client_secret: SecretStr | None = Field(
        None, description="MOBIS' client secret at the provider; unset = a public client (PKCE)."
    )
    oidc_redirect_uri: str | None = Field(
        None,
        description="Where the provider sends the user back: the public URL of "
        "/mobis/v1/auth/oidc/callback, or an app's own redirect URI (the app then posts the "
        "code and state to the callback).",
    )
    oidc_scopes: str = Field("openid email profile", description="Scopes asked of the provider.")
    oidc_login_seconds: int = Field(
        600, ge=30, description="How long a started OpenID Connect login may take to finish."
    )
    oidc_metadata_seconds: float = Field(
        3600.0, gt=0, description="How long the provider's metadata and keys are cached."
    )
    oidc_timeout_seconds: float = Field(
        10.0, gt=0, description="Longest wait for an answer of the provider."
    )

    @model_validator(mode="after")
    def _oidc_complete(self) -> "MobisSettings":
        if self.oidc_issuer and not (self.oidc_client_id and self.oidc_redirect_uri):
            raise ValueError("oidc_issuer needs oidc_client_id and oidc_redirect_uri")
        return self

    @property
    def resolved_upload_dir(self) -> Path:
        return self.upload_dir or self.data_dir / "mobis-uploads"
