"""Sine positional embedding of a 2-d feature map, computed from its padding mask."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine embedding of the (y, x) position of every valid pixel.

    Positions are the running count of valid (non-padded) pixels along each axis, so padding at
    the bottom/right does not shift them. With `normalize`, each axis is rescaled by its number of
    valid pixels to `[0, scale]`:

        y = (cumsum_y(~mask) + offset) / (y_last + eps) * scale        (same for x)

    Deformable DETR uses `offset=-0.5` (pixel centres), DETR uses 0. Each coordinate is divided by
    `dim_t[i] = temperature ** (2 * (i // 2) / num_pos_feats)`; even channels take the sine and
    odd channels the cosine, interleaved. The output stacks the y features before the x features.

    Args:
        num_pos_feats: features per axis (even); the output has `2 * num_pos_feats` channels.
        temperature: base of the geometric frequency progression.
        normalize: rescale positions by the valid extent of each image.
        scale: range of the normalized positions (2*pi by default).
        eps: added to the denominator of the normalization.
        offset: added to the running count before normalization.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        if num_pos_feats <= 0 or num_pos_feats % 2 != 0:
            raise ValueError(
                f"PositionEmbeddingSine: num_pos_feats must be a positive even number "
                f"(sin/cos pairs); got {num_pos_feats}"
            )
        if temperature <= 0:
            raise ValueError(f"PositionEmbeddingSine: temperature must be > 0; got {temperature}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        self.offset = offset

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask: (B, H, W) bool, True on padding. Returns (B, 2 * num_pos_feats, H, W) float32."""
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(
                "PositionEmbeddingSine expects a (B, H, W) bool mask (True = padding); got "
                f"shape {tuple(mask.shape)} dtype {mask.dtype}"
            )
        not_mask = ~mask
        y_embed = not_mask.cumsum(dim=1, dtype=torch.float32)  # (B, H, W): 1..valid rows
        x_embed = not_mask.cumsum(dim=2, dtype=torch.float32)  # (B, H, W): 1..valid cols
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale

        channel = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (
            2 * torch.div(channel, 2, rounding_mode="floor") / self.num_pos_feats
        )

        pos_y = y_embed[..., None] / dim_t  # (B, H, W, F)
        pos_x = x_embed[..., None] / dim_t  # (B, H, W, F)
        # interleave: channel 2k <- sin(pos[2k]), channel 2k+1 <- cos(pos[2k+1])
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3)  # (B, H, W, 2F)
        return pos.permute(0, 3, 1, 2).contiguous()  # (B, 2F, H, W)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale:.4f}, offset={self.offset}"
        )
