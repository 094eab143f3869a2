"""Settings of the plantid service: ``C4C_PLANTID_*``, else ``C4C_*``."""

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from c4c.shared.settings import ServiceSettings

MiB = 1024 * 1024


class PlantidSettings(ServiceSettings):
    service_name: ClassVar[str] = "plantid"

    port: int = 8004
    daily_quota: int = Field(
        500,
        ge=0,
        description="Identifications per caller per UTC day: an API key, an app user (through "
        "MOBIS), or an anonymous caller.",
    )
    quota_block: int = Field(
        16,
        ge=1,
        description="Identifications a replica charges to a caller's daily quota in the "
        "database at once, then hands out from memory (fewer as the limit nears, one at a time "
        "at the end): one write per block instead of one per request. The quota is never "
        "exceeded; a replica that stops without its clean shutdown (which gives unused ones "
        "back) loses at most this many of each caller's identifications for the day.",
    )
    gallery_check_seconds: float = Field(
        1.0,
        ge=0,
        description="How long a replica trusts the gallery version it last read for a project "
        "before reading it again. Changes made through this replica apply at once; changes "
        "made through another one show here within this time. 0 = read it on every request.",
    )
    identify_max_bytes: int = Field(
        50 * MiB, ge=0, description="Largest body of POST /v2/identify (413 above)."
    )
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="Largest photo in pixels (decompression-bomb guard)."
    )
    workers: int = Field(1, ge=1, description="Inference threads (one CPU core each).")
    ridge: float = Field(0.1, gt=0, description="Regularisation of the gallery classifier.")
    reject_quantile: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Share of the gallery's own photos that the open-set threshold would reject.",
    )
    reject_similarity: float | None = Field(
        None, description="Fixed open-set threshold (cosine); unset = from reject_quantile."
    )
    model_cache: Path | None = Field(
        None, description="Where the built-in model is built; unset = <data_dir>/plantid/models."
    )
    model_path: Path | None = Field(
        None, description="An ONNX model to use instead of the built-in EfficientNet-Lite0."
    )
    model_kind: Literal["embedder", "classifier"] = Field(
        "embedder", description="Whether model_path outputs an embedding or class scores."
    )
    model_labels: Path | None = Field(
        None, description="Label file of a classifier model: one scientific name per line."
    )
    model_output: str | None = Field(None, description="Output of model_path to read.")
    model_input_size: int = Field(224, ge=32, description="Square input size of model_path.")
    model_mean: tuple[float, float, float] = Field(
        (123.675, 116.28, 103.53), description="Per-channel mean (0..255 RGB) of model_path."
    )
    model_std: tuple[float, float, float] = Field(
        (58.395, 57.12, 57.375), description="Per-channel std (0..255 RGB) of model_path."
    )
    classifier_min_score: float = Field(
        0.2, ge=0, le=1, description="A classifier's top score below this is 'not found'."
    )
    import_dir: Path | None = Field(
        None, description="Folder that bulk imports may read from; unset = <data_dir>/imports."
    )
    default_project: str | None = Field(
        None, description="Flora for observations whose datasetID is not a project."
    )

    @property
    def resolved_import_dir(self) -> Path:
        return self.import_dir or self.data_dir / "imports"

    @property
    def model_cache_dir(self) -> Path:
        return self.model_cache or self.data_dir / "plantid" / "models"
