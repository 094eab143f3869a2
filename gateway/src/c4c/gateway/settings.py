"""Settings of the gateway: ``C4C_GATEWAY_*``, else ``C4C_*``."""

from typing import ClassVar

from pydantic import Field

from c4c.shared.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    service_name: ClassVar[str] = "gateway"

    port: int = 8000
    upstreams: dict[str, list[str]] = Field(
        default_factory=dict,
        description='Path prefix → upstream base URLs, as JSON, e.g. {"/ingest": '
        '["http://127.0.0.1:8001"]}. Empty = embedded mode: every installed service runs '
        "in this process.",
    )
    upstream_connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect.")
    upstream_read_timeout: float = Field(60.0, gt=0, description="Seconds between bytes.")
