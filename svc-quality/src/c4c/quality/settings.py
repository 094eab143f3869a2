"""Settings of the quality service: ``C4C_QUALITY_*``, else ``C4C_*``."""

from typing import ClassVar

from c4c.shared.settings import ServiceSettings


class QualitySettings(ServiceSettings):
    service_name: ClassVar[str] = "quality"

    port: int = 8002
