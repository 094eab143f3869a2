"""Settings of the plantid service: ``C4C_PLANTID_*``, else ``C4C_*``."""

from typing import ClassVar

from c4c.shared.settings import ServiceSettings


class PlantidSettings(ServiceSettings):
    service_name: ClassVar[str] = "plantid"

    port: int = 8004
