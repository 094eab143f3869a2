"""Settings of the ingest service: ``C4C_INGEST_*``, else ``C4C_*``."""

from typing import ClassVar

from pydantic import Field

from c4c.shared.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    service_name: ClassVar[str] = "ingest"

    port: int = 8001
    batch_max_items: int = Field(
        1000, ge=1, description="Most observations in one POST /observations:batch."
    )
    batch_writers: int = Field(
        2,
        ge=1,
        description="Batches written to the database at once; the others wait, parsed.",
    )
    batch_max_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest batch body (413 above)."
    )
    media_max_bytes: int = Field(
        200 * 1024 * 1024, ge=1024, description="Largest media file (413 above)."
    )
    media_max_pixels: int = Field(
        50_000_000,
        ge=1,
        description="Most pixels an uploaded image may have (decompression bombs: 413).",
    )
    page_size: int = Field(50, ge=1, le=1000, description="Default page size of listings.")
    page_max: int = Field(500, ge=1, description="Largest page a client may ask for.")
    export_batch: int = Field(500, ge=1, description="Rows read per query while exporting.")
