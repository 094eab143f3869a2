"""Settings of the video service: ``C4C_VIDEO_*``, else ``C4C_*``."""

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from c4c.shared.settings import ServiceSettings
from c4c.video.analysis.pipeline import OUTPUT_NICENESS


class VideoSettings(ServiceSettings):
    service_name: ClassVar[str] = "video"

    port: int = 8003
    output_niceness: int = Field(
        OUTPUT_NICENESS,
        ge=0,
        le=19,
        description="How much nicer (Linux) the thread that encodes clips and keyframes runs "
        "than the analysis: evidence waits, live analysis does not fall behind; 0 = the same.",
    )
    max_upload_bytes: int = Field(
        2 * 1024**3, ge=0, description="Largest clip upload (POST /video/v1/jobs), in bytes."
    )

    # Sources and URL safety
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts, IP addresses or networks (CIDR) a stream URL may point at even "
        "when they are private, loopback or link-local (e.g. an on-site camera network).",
    )
    file_root: Path | None = Field(
        None, description="file:// stream URLs are accepted only under this folder; unset = none."
    )
    max_redirects: int = Field(5, ge=0, description="HTTP redirects followed (each re-checked).")
    open_timeout: float = Field(10.0, gt=0, description="Seconds to open a stream.")
    read_timeout: float = Field(10.0, gt=0, description="Seconds a stream may send nothing.")
    reconnect_initial_delay: float = Field(0.5, gt=0, description="First reconnect delay (s).")
    reconnect_max_delay: float = Field(30.0, gt=0, description="Longest reconnect delay (s).")
    reconnect_max_attempts: int = Field(
        0, ge=0, description="Failed opens in a row before a stream is failed; 0 = retry forever."
    )
    max_streams: int = Field(32, ge=1, description="Streams this service accepts.")

    # Pipeline
    analysis_fps: float = Field(
        10.0, ge=0, description="Frames analysed per second of video; 0 = every frame."
    )
    analysis_width: int = Field(
        0,
        ge=0,
        description="Analysis downscales frames to this width; 0 = by frame size (a fifth "
        "of the source width, between 160 and 320).",
    )
    subtractor: Literal["mog2", "knn"] = Field("mog2", description="Background subtractor.")
    learning_rate: float = Field(
        -1.0, le=1.0, description="Background learning rate; -1 = automatic."
    )
    var_threshold: float = Field(
        16.0, gt=0, description="Background subtractor threshold (on the luma plane)."
    )
    min_area: float = Field(
        0.001, gt=0, lt=1, description="Smallest blob, as a fraction of the frame."
    )
    min_event_seconds: float = Field(1.0, ge=0, description="A shorter track is not an event.")
    max_event_seconds: float = Field(60.0, gt=0, description="Longer tracks are cut into events.")
    clip_width: int = Field(
        0,
        ge=0,
        description="Width of event clips (H.264 MP4, resized from the decoder's YUV); 0 = "
        "the analysis width (160-320 px by default), the cheapest: the clip reuses the "
        "analysis' downscaled frame. Otherwise at least 32.",
    )
    clip_fps: float = Field(
        10.0,
        ge=0,
        description="Frames a second in event clips, at most the analysis rate (clips reuse "
        "analysed frames; encoding costs per frame); 0 = every analysed frame.",
    )
    clip_seconds: float = Field(15.0, gt=0, description="Longest event clip.")
    job_workers: int = Field(1, ge=1, description="Clips analysed at the same time.")
    job_lease_seconds: float = Field(
        60.0, gt=0, description="A running job whose worker is silent this long is resumed."
    )
    job_max_attempts: int = Field(3, ge=1, description="Starts of a job before it is failed.")

    @field_validator("clip_width")
    @classmethod
    def _clip_width(cls, width: int) -> int:
        if 0 < width < 32:
            raise ValueError("clip_width is 0 (the analysis width) or at least 32")
        return width
