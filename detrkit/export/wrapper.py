"""The module every exported graph is traced from: uint8 images in, detections out."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ExportableDetector"]


class ExportableDetector(nn.Module):
    """A detector behind the deployment contract of every exported artifact.

    Input: `images` (N, 3, H, W) uint8 RGB, already resized to the network input size (the
    model's test-time resize, e.g. shortest edge 800, is NOT inside), all of one size.
    Normalization (pixel mean / std) is inside.
    Outputs: `boxes` (N, K, 4) float32 xyxy in the pixels of `images`, clipped to the image;
    `scores` (N, K) float32, best first; `labels` (N, K) int64 class indices.

    `model` must have a `detect(images)` method taking the same batch as float32 (0..255) and
    returning (boxes, scores, labels) as above; it is traced as is, so it must not loop over
    the batch in Python (a batch of equal-size images needs no padding, so the batched
    computation is also what the model gives for each image alone).
    """

    input_names = ("images",)
    output_names = ("boxes", "scores", "labels")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(model, "detect", None)):
            raise TypeError(
                f"ExportableDetector: {type(model).__name__} has no detect(images) method "
                "returning (boxes, scores, labels); only such models can be exported"
            )
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.model.detect(images.float())
