"""The JSON shapes of the API, as pydantic models: they document `/openapi.json` and the tests
validate real answers against them (`extra="forbid"`), so the schema and the server agree."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MAX_DETECTIONS_LIMIT",
    "Detection",
    "DetectionRequest",
    "DetectionResponse",
    "ErrorResponse",
    "HealthResponse",
    "ModelCard",
    "ModelList",
]

MAX_DETECTIONS_LIMIT = 1000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Detection(_Strict):
    bbox: list[float] = Field(
        min_length=4, max_length=4, description="[x0, y0, x1, y1] in the uploaded image's pixels"
    )
    score: float = Field(ge=0.0, le=1.0)
    category_id: int = Field(description="the dataset's category id")
    label: str = Field(description="the category's name")


class ImageSize(_Strict):
    width: int = Field(description="after the EXIF orientation is applied")
    height: int


class Usage(_Strict):
    images: int


class DetectionResponse(_Strict):
    id: str = Field(description="unique id of this answer")
    model: str
    created: int = Field(description="unix time of the answer")
    image: ImageSize
    detections: list[Detection] = Field(description="by decreasing score")
    usage: Usage


class DetectionRequest(_Strict):
    """The JSON form of a detection request (the multipart form has the same fields, `image`
    being the file)."""

    image: str = Field(description="the image file's bytes, base64 (a data: URL prefix is ok)")
    score_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="keep detections scoring at least this"
    )
    max_detections: int | None = Field(
        default=None, ge=1, le=MAX_DETECTIONS_LIMIT, description="keep at most this many"
    )


class ErrorDetail(_Strict):
    message: str
    type: str
    code: str


class ErrorResponse(_Strict):
    error: ErrorDetail


class ModelCard(_Strict):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(_Strict):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(_Strict):
    status: str
