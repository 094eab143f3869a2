"""Settings of the mobis service: ``C4C_MOBIS_*``, else ``C4C_*``."""

from typing import ClassVar

from c4c.shared.settings import ServiceSettings


class MobisSettings(ServiceSettings):
    service_name: ClassVar[str] = "mobis"

    port: int = 8005
