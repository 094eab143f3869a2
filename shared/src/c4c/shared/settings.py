"""Settings every service shares, read from the environment.

Each service subclasses :class:`ServiceSettings` and names itself with ``service_name``.
A value is looked up first under the service's own section (``C4C_INGEST_DATABASE_URL``),
then under the suite-wide name (``C4C_DATABASE_URL``), then in ``.env`` under the same two
names in the same order; the defaults give the embedded mode: SQLite files and media under
``./data``, the in-process bus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from c4c.shared.db import POSTGRES_POOL

API_KEY_MIN_LENGTH = 16


def _long_enough(key: SecretStr) -> SecretStr:
    # Keys are stored and compared as plain SHA-256 (auth.py), which only a long random key
    # makes safe against guessing.
    if len(key.get_secret_value()) < API_KEY_MIN_LENGTH:
        raise ValueError(
            f"an API key must be at least {API_KEY_MIN_LENGTH} characters: make one with "
            "`openssl rand -hex 32`"
        )
    return key


ApiKey = Annotated[SecretStr, AfterValidator(_long_enough)]


class ServiceSettings(BaseSettings):
    """Suite-wide settings; a service adds its own fields in a subclass."""

    service_name: ClassVar[str] = "c4c"

    model_config = SettingsConfigDict(
        env_prefix="C4C_", env_file=".env", extra="ignore", validate_default=True
    )

    data_dir: Path = Field(Path("data"), description="Where embedded mode keeps its files.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy async URL; unset = SQLite file <data_dir>/<service>.db.",
    )
    database_schema: str | None = Field(
        None,
        description="PostgreSQL schema for this service's tables; unset = the service name.",
    )
    database_pool_size: int = Field(
        POSTGRES_POOL,
        ge=1,
        description="PostgreSQL connections a process keeps once load opened them (3 more "
        "for bursts); budget max_connections for every process and replica of the suite.",
    )
    broker_url: str | None = Field(
        None, description="AMQP URL of RabbitMQ; unset = the in-process bus."
    )
    bus_exchange: str = Field("c4c.events", description="Topic exchange for all events.")
    bus_queue_prefix: str = Field(
        "c4c", description="A service consumes from queue <prefix>.<service> (+ .dlq)."
    )
    bus_prefetch: int = Field(64, ge=1, description="Unacked messages per consumer.")
    bus_delivery_limit: int = Field(
        5, ge=1, description="Deliveries of one message before it is dead-lettered."
    )
    bus_publish_timeout: float = Field(
        10.0, gt=0, description="Seconds a publish may wait for the broker's confirm."
    )
    bus_retry_backoff: float = Field(
        0.2, ge=0, description="First retry delay in seconds; doubles per attempt."
    )
    outbox_poll_interval: float = Field(
        1.0, gt=0, description="Seconds between outbox scans when nothing wakes the relay."
    )
    media_dir: Path | None = Field(None, description="Media root; unset = <data_dir>/media.")
    max_body_bytes: int = Field(
        10 * 1024 * 1024, ge=0, description="Largest request body accepted (413 above)."
    )
    shutdown_timeout: float = Field(
        30.0, gt=0, description="Seconds to drain events and requests on shutdown."
    )
    log_level: str = Field("INFO", description="Root log level.")
    log_format: Literal["json", "text"] = Field("json", description="Log line format.")
    access_log: bool = Field(
        True,
        description="Log a line per HTTP request (metrics are kept either way; off saves "
        "about 0.1 ms a request).",
    )
    host: str = Field("127.0.0.1", description="Address a service alone listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port a service alone listens on.")
    principal_secret: SecretStr | None = Field(
        None,
        description="Secret the gateway signs the caller's identity (X-C4C-Principal) with and "
        "services verify it with; unset = the file <data_dir>/principal-secret, which the "
        "gateway creates.",
    )
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description="API keys this service accepts when run alone, without the gateway (JSON "
        "list of keys of 16 characters or more, e.g. from `openssl rand -hex 32`): a call must "
        "then send one (X-API-Key header or api-key query parameter), except health, metrics "
        "and docs; empty = open to all. The gateway does not use it (its keys are in its "
        "database: make key); require_principal wins over it.",
    )
    require_principal: bool = Field(
        False,
        description="Refuse calls that did not come through the gateway (no valid "
        "X-C4C-Principal), except health, metrics and docs, even those with one of api_keys.",
    )

    public_url: str = Field(
        "http://127.0.0.1:8000",
        description="Base URL clients reach the suite at (the gateway): media URLs in "
        "answers, events and exports start with it, and services fetch such URLs straight "
        "from the owning service.",
    )
    service_urls: dict[str, str] = Field(
        default_factory=dict,
        description="Distributed mode: where the other services listen, as JSON, e.g. "
        '{"ingest": "http://ingest:8000"}; embedded mode reaches them in process.',
    )
    service_timeout: float = Field(
        30.0, gt=0, description="Seconds a call to another service or a media fetch may take."
    )
    fetch_deadline: float = Field(
        10.0,
        gt=0,
        description="Seconds a fetch of a URL outside the suite may take in all (checking it, "
        "its redirects and the download): a server trickling bytes is cut off there.",
    )
    event_linger_seconds: float = Field(
        0.05,
        ge=0,
        le=1,
        description="How long a service's batch consumer waits before it takes the events "
        "handed to it so far, so that events trickling in share one transaction (one event "
        "a transaction costs about ten times the CPU of one in a batch); adds at most this "
        "to the time an event takes. 0 = at once.",
    )
    fetch_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Non-public hosts or networks that media URLs may point at (SSRF "
        'allowlist), as JSON, e.g. ["10.0.0.0/8"].',
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        section = f"C4C_{cls.service_name.upper()}_"
        return (
            init_settings,
            EnvSettingsSource(settings_cls, env_prefix=section),
            env_settings,
            DotEnvSettingsSource(settings_cls, env_prefix=section),
            dotenv_settings,
            file_secret_settings,
        )

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / self.service_name}.db"

    @property
    def resolved_database_schema(self) -> str:
        return self.database_schema or self.service_name

    @property
    def resolved_media_dir(self) -> Path:
        return self.media_dir or self.data_dir / "media"
