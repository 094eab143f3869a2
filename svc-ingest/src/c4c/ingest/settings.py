"""Settings of the ingest service: ``C4C_INGEST_*``, else ``C4C_*``."""

from typing import ClassVar

from c4c.shared.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    service_name: ClassVar[str] = "ingest"

    port: int = 8001
