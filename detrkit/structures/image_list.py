"""ImageList: differently sized images padded into one batch tensor, with their padding mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ImageList:
    """A padded batch of images.

    Attributes:
        tensor: (B, C, H, W) images, bottom/right padded with `pad_value`.
        image_sizes: the (height, width) of each image before padding.
        mask: (B, H, W) bool, True on padded pixels (the DETR convention).
    """

    def __init__(self, tensor: torch.Tensor, image_sizes: list[tuple[int, int]]) -> None:
        self.tensor = tensor
        self.image_sizes = image_sizes
        self.mask = self._padding_mask(tensor, image_sizes)

    @staticmethod
    def _padding_mask(tensor: torch.Tensor, image_sizes: list[tuple[int, int]]) -> torch.Tensor:
        batch, _, height, width = tensor.shape
        mask = torch.ones((batch, height, width), dtype=torch.bool, device=tensor.device)
        for i, (h, w) in enumerate(image_sizes):
            mask[i, :h, :w] = False
        return mask

    def __len__(self) -> int:
        return len(self.image_sizes)

    def __getitem__(self, idx: int) -> torch.Tensor:
        """The idx-th image without its padding."""
        h, w = self.image_sizes[idx]
        return self.tensor[idx, ..., :h, :w]

    def to(self, device) -> ImageList:
        return ImageList(self.tensor.to(device), self.image_sizes)

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @staticmethod
    def from_tensors(
        tensors: list[torch.Tensor], size_divisibility: int = 0, pad_value: float = 0.0
    ) -> ImageList:
        """Pad a list of (C, H_i, W_i) tensors to a common (C, H, W), H and W rounded up to
        `size_divisibility` when it is > 0."""
        if len(tensors) == 0:
            raise ValueError("ImageList.from_tensors needs at least one image")
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != tensors[0].shape[0]:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    "ImageList.from_tensors: every image must be a (C, H, W) tensor with the same "
                    f"C as the first ({tuple(tensors[0].shape)}); got {shape}"
                )
        image_sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        max_h = max(h for h, _ in image_sizes)
        max_w = max(w for _, w in image_sizes)
        if size_divisibility > 1:
            max_h = (max_h + size_divisibility - 1) // size_divisibility * size_divisibility
            max_w = (max_w + size_divisibility - 1) // size_divisibility * size_divisibility
        if len(tensors) == 1:
            h, w = image_sizes[0]
            batched = F.pad(tensors[0], (0, max_w - w, 0, max_h - h), value=pad_value)[None]
        else:
            batched = tensors[0].new_full(
                (len(tensors), tensors[0].shape[0], max_h, max_w), pad_value
            )
            for img, pad_img in zip(tensors, batched):
                pad_img[..., : img.shape[-2], : img.shape[-1]].copy_(img)
        return ImageList(batched.contiguous(), image_sizes)
