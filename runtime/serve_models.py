"""emrrg-serve's API schemas (pydantic): the JSON bodies that /openapi.json describes."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

class Timings(BaseModel):
    preprocess: float = Field(description="decoding the upload + resize/normalize, ms")
    encoder: float = Field(description="vision encoder (+ visual K/V of hybrid layers), ms")
    prefill: float = Field(description="decoder prefill over the prompt, ms")
    decode: float = Field(description="per-token decoding, ms")
    total: float = Field(description="preprocess to last token, ms (queue wait excluded)")


class InputView(BaseModel):
    model_config = ConfigDict(extra="allow")
    label: str = Field(description='"upload" or "view N"')
    kind: str = Field(description="dicom, png, jpeg or image")
    header_checked: bool = Field(description="a DICOM header was read and checked (false for PNG / JPEG)")
    modality: Optional[str] = None
    body_part: Optional[str] = Field(None, description="BodyPartExamined")
    view_position: Optional[str] = Field(None, description="ViewPosition, e.g. PA, AP, LL")
    sop_class: Optional[str] = None
    photometric: Optional[str] = None
    size: Optional[list[Optional[int]]] = Field(None, description="[columns, rows]")
    frames: int = 1
    header_checks: dict[str, str] = Field(description="check -> pass / allowed / absent / warn")
    warnings: list[str] = Field(description="what the gate accepted but a person should look at")
    note: Optional[str] = None


class ReportResponse(BaseModel):
    request_id: str
    report: str = Field(description="the generated report text")
    tokens: int = Field(description="number of generated tokens")
    backend: str = Field(description="execution backend, e.g. ort-cpu")
    bundle_sha256: str = Field(description="digest of the bundle that wrote the report")
    timings_ms: Timings
    peak_rss_mb: float = Field(description="peak resident memory of the server process so far, MB")
    queue_wait_ms: float = Field(description="time between the upload being decoded and generation starting, ms")
    views: int = Field(description="number of views (images) in the study")
    inputs: list[InputView] = Field(description="what the input gate read and checked per view, in order")


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable code, e.g. queue_full, undecodable_image")
    detail: str = Field(description="one-line message for a person")
    request_id: str


class QueueInfo(BaseModel):
    capacity: int = Field(description="queue_size + 1 (the one running)")
    queue_size: int
    active: int = Field(description="admitted requests not yet finished (uploading, waiting or running)")
    running: bool
    waiting: int
    uploads: int = Field(description="request bodies being read (they hold no queue slot)")
    upload_bytes: int = Field(description="upload budget reserved by those bodies")
    upload_budget_bytes: int = Field(description="--upload-budget-mb, in bytes")
    mean_generation_s: Optional[float] = Field(description="mean of the last 20 generation times (null before any)")
    retry_after_s: int = Field(description="the Retry-After a full queue would answer now")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model_loaded: bool
    state: Literal["loading", "ready", "failed", "stopping"]
    backend: Optional[str] = None
    queue: QueueInfo


class ArtifactInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    path: Optional[str] = None
    precision: Optional[str] = None
    target: Optional[str] = None
    bytes: Optional[int] = None


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    bundle_sha256: str
    backend: str
    emrrg_version: Optional[str] = None
    format_version: Optional[int] = None
    source_sha256: Optional[str] = None
    artifacts: dict[str, ArtifactInfo]
    generation: dict[str, Any]
    validation: dict[str, Any]


__all__ = ["ArtifactInfo", "ErrorResponse", "Health", "InputView", "ModelInfo", "QueueInfo", "ReportResponse", "Timings"]
