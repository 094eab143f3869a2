"""Settings of the gateway: ``C4C_GATEWAY_*``, else ``C4C_*``."""

from ipaddress import IPv4Network, IPv6Network
from typing import ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from c4c.shared.settings import ServiceSettings

PUBLIC_ROUTES = [
    "/*/healthz",
    "/*/readyz",
    "/*/openapi.json",
    "/mobis/v1/auth/register",
    "/mobis/v1/auth/login",
    "/mobis/v1/auth/refresh",
    "/mobis/v1/auth/oidc/start",
    "/mobis/v1/auth/oidc/callback",
    "/mobis/v1/auth/oidc/token",
    "/mobis/v1/.well-known/jwks.json",
    "/mobis/v1/apps/*/config",
]
MOBIS_PREFIX = "/mobis"
MOBIS_JWKS_PATH = MOBIS_PREFIX + "/v1/.well-known/jwks.json"


class RouteOptions(BaseModel):
    """Overrides for the requests under one path prefix."""

    connect_timeout: float | None = Field(None, gt=0)
    read_timeout: float | None = Field(None, gt=0)
    max_body_bytes: int | None = Field(None, ge=0)


class GatewaySettings(ServiceSettings):
    service_name: ClassVar[str] = "gateway"

    port: int = 8000
    upstreams: dict[str, list[str]] = Field(
        default_factory=dict,
        description='Path prefix → upstream base URLs, as JSON, e.g. {"/ingest": '
        '["http://127.0.0.1:8001"]}. Empty = embedded mode: every installed service runs '
        "in this process.",
    )
    routes: dict[str, RouteOptions] = Field(
        default_factory=dict,
        description='Per-prefix overrides, as JSON, e.g. {"/video": {"max_body_bytes": '
        '2147483648, "read_timeout": 300}}: connect_timeout, read_timeout, max_body_bytes. '
        "Without max_body_bytes a proxied prefix gets the limit its service enforces (the "
        "embedded service's own; an upstream refuses for itself); C4C_MAX_BODY_BYTES is for "
        "the gateway's own routes.",
    )
    upstream_connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect.")
    upstream_read_timeout: float = Field(60.0, gt=0, description="Seconds between bytes.")
    upstream_max_connections: int = Field(
        1000, ge=1, description="Connections kept at most to each upstream replica (per worker)."
    )
    upstream_keepalive_seconds: float = Field(
        4.0,
        gt=0,
        description="Seconds an idle upstream connection is kept; keep it below the upstream's "
        "own idle timeout (uvicorn: 5 s), or a request may meet a connection being closed.",
    )
    workers: int = Field(
        1,
        ge=1,
        description="Gateway processes sharing the port (distributed mode only; embedded mode "
        "runs one). Rate limits, quotas, breakers and the API-key cache are per process.",
    )
    upstream_retries: int = Field(
        2,
        ge=0,
        description="Further attempts, on another replica, after a connection error; only for "
        "idempotent methods and requests with an Idempotency-Key.",
    )
    breaker_failures: int = Field(
        5, ge=1, description="Consecutive failures (errors, timeouts) that open a breaker."
    )
    breaker_open_seconds: float = Field(
        10.0, gt=0, description="Seconds an open breaker refuses calls before one probe."
    )
    trusted_proxies: list[IPv4Network | IPv6Network] = Field(
        default_factory=list,
        description="Networks of proxies in front of the gateway whose X-Forwarded-* "
        'headers are believed, as JSON, e.g. ["10.0.0.0/8"].',
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins browsers may call from (CORS); none = off."
    )
    public_routes: list[str] = Field(
        default_factory=lambda: list(PUBLIC_ROUTES),
        description="Proxied paths served without credentials; * matches one segment.",
    )
    jwks_url: str | None = Field(
        None,
        description="MOBIS' published keys (JWKS); unset = MOBIS' own address for them: in "
        "process in embedded mode, else the first upstream of /mobis (without one, bearer "
        "tokens are refused).",
    )
    jwt_audience: str = Field("c4c", description="The audience every token must name.")
    jwt_issuer: str | None = Field(None, description="The issuer tokens must name, if set.")
    jwks_cache_seconds: float = Field(300.0, gt=0, description="Seconds a JWKS is reused.")
    api_key_cache_seconds: float = Field(
        5.0,
        ge=0,
        description="Seconds a looked-up API key is reused; a revocation takes effect after "
        "at most this long.",
    )
    api_key_daily_quota: int | None = Field(
        None, ge=1, description="Requests a day for new keys unless given; unset = no quota."
    )
    rate_limit_per_second: float = Field(
        20.0, ge=0, description="Sustained requests/s per key, user or IP; 0 = no limit."
    )
    rate_limit_burst: int = Field(100, ge=1, description="Requests a caller may burst.")
    rate_limit_backend: Literal["memory", "database"] = Field(
        "memory",
        description="Where rate limits and quotas are counted: this process's memory (fast; "
        "per worker and replica), or the gateway's database (one upsert per request; shared "
        "by every worker and replica that uses the same PostgreSQL database).",
    )
    rate_limit_prune_interval: float = Field(
        60.0,
        gt=0,
        description="With the database backend: seconds between background passes that delete "
        "buckets idle long enough to be full again and daily counts of past days.",
    )

    @model_validator(mode="after")
    def _mobis_jwks(self) -> "GatewaySettings":
        """Verify MOBIS' tokens against the keys MOBIS publishes, unless a JWKS URL is given:
        straight from its first upstream, or in embedded mode (MOBIS in this process) through
        this gateway on loopback."""
        if self.jwks_url is not None:
            return self
        mobis = self.upstreams.get(MOBIS_PREFIX)
        if mobis:
            self.jwks_url = mobis[0].rstrip("/") + MOBIS_JWKS_PATH
        elif not self.upstreams:
            host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(  # noqa: S104
                self.host, self.host
            )
            self.jwks_url = f"http://{host}:{self.port}{MOBIS_JWKS_PATH}"
        return self
