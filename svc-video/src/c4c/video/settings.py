"""Settings of the video service: ``C4C_VIDEO_*``, else ``C4C_*``."""

from typing import ClassVar

from c4c.shared.settings import ServiceSettings


class VideoSettings(ServiceSettings):
    service_name: ClassVar[str] = "video"

    port: int = 8003
