"""Settings of the quality service: ``C4C_QUALITY_*``, else ``C4C_*``."""

from typing import ClassVar

from pydantic import Field

from c4c.shared.settings import ServiceSettings


class QualitySettings(ServiceSettings):
    service_name: ClassVar[str] = "quality"

    port: int = 8002
    media_max_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest photo fetched for image checks."
    )
    media_max_pixels: int = Field(
        60_000_000, ge=1, description="Photos with more pixels are flagged, not decoded."
    )
    max_media_per_observation: int = Field(
        8, ge=0, description="Photos of one observation analysed (the first ones)."
    )
    image_workers: int = Field(2, ge=1, description="Photos analysed at once (threads).")
    batch_max_items: int = Field(1000, ge=1, description="Observations in one :batch call.")
    history_limit: int = Field(50, ge=1, description="Assessments listed per observation.")
    context_ttl_s: float = Field(
        5.0,
        ge=0,
        description="Seconds rule sets, observers' records and taxa's accepted records are "
        "cached (this replica's own writes refresh them at once).",
    )
    preload: bool = Field(
        True, description="Load the taxonomy and geography at start-up, in the background."
    )
