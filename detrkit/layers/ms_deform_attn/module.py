"""MultiScaleDeformableAttention, the module around the `ms_deform_attn` operator."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..onednn import cpu_compute_dtype, onednn_fusion_available, onednn_op
from .op import ms_deform_attn

__all__ = ["MultiScaleDeformableAttention"]


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over a multi-level feature pyramid (detrex's module, same names).

    Each query predicts, per head, level and point, a sampling offset around its reference point
    and an attention weight (softmax jointly over levels x points); the output is the weighted
    sum of the bilinearly sampled values, projected, plus the identity (residual).

    Args:
        embed_dim: features of query and value.
        num_heads: attention heads; embed_dim must be divisible by it.
        num_levels: feature levels sampled.
        num_points: points sampled per head and level.
        dropout: dropout on the projected output, before the residual.
        batch_first: query/value/identity are (N, L, C) if True, else (L, N, C).
    """

    # eval without autograd: offsets and attention logits from one matmul whose offset rows are
    # divided by their level's size beforehand, and on the CPU the output projection accumulated
    # onto the residual in one call and many queries in blocks; False: exactly the plain formula
    fuse_inference: bool = True

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.1,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"MultiScaleDeformableAttention: embed_dim ({embed_dim}) must be divisible by "
                f"num_heads ({num_heads})"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.batch_first = batch_first
        self.dropout = nn.Dropout(dropout)
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """Deformable DETR's initialization: head h's points start along direction
        2*pi*h/num_heads (scaled so the larger |coordinate| is 1), point i at (i + 1) times it,
        on every level; uniform attention; xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float64) * (
            2.0 * math.pi / self.num_heads
        )
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (heads, 2) as (x, y)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        scale = torch.arange(1, self.num_points + 1, dtype=torch.float64).view(1, 1, -1, 1)
        bias = directions.view(self.num_heads, 1, 1, 2).repeat(
            1, self.num_levels, self.num_points, 1
        )
        bias = bias * scale  # (heads, levels, points, xy)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def _check_own_inputs(
        self,
        N: int,
        Lq: int,
        S: int,
        reference_points: Tensor | None,
        spatial_shapes: Tensor | None,
        key_padding_mask: Tensor | None,
    ) -> None:
        """Shapes of the inputs the operator never sees as given (reference points and the
        padding mask become sampling locations and zeroed values; spatial_shapes must have one
        row per level of this module). Metadata only: no data is read. Everything the operator
        receives is checked once, by `ms_deform_attn`."""
        if reference_points is None or spatial_shapes is None:
            raise ValueError(
                "MultiScaleDeformableAttention: reference_points and spatial_shapes are required"
            )
        L = self.num_levels
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[0] != L:
            raise ValueError(
                f"MultiScaleDeformableAttention: spatial_shapes must be ({L}, 2) for num_levels="
                f"{L}, got shape {tuple(spatial_shapes.shape)}"
            )
        if (
            reference_points.dim() != 4
            or reference_points.shape[-1] not in (2, 4)
            or reference_points.shape[0] != N
            or reference_points.shape[1] != Lq
            or reference_points.shape[2] not in (L, 1)
        ):
            raise ValueError(
                "MultiScaleDeformableAttention: reference_points must be (N, Lq, L, 2) points or "
                f"(N, Lq, L, 4) boxes with N={N}, Lq={Lq} and L={L} (or 1), got shape "
                f"{tuple(reference_points.shape)}"
            )
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S):
            raise ValueError(
                f"MultiScaleDeformableAttention: key_padding_mask must be (N, S) = ({N}, {S}), "
                f"got shape {tuple(key_padding_mask.shape)}"
            )

    def forward(
        self,
        query: Tensor,
        value: Tensor | None = None,
        identity: Tensor | None = None,
        query_pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        reference_points: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
        level_start_index: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query: (Lq, N, C), or (N, Lq, C) with batch_first.
            value: (S, N, C) or (N, S, C); defaults to query (self-attention in the encoder).
            identity: added to the output; defaults to query (before query_pos is added).
            query_pos: added to query before predicting offsets and weights.
            key_padding_mask: (N, S) bool, True at padded value positions (they read zeros).
            reference_points: (N, Lq, L, 2) normalized (x, y), or (N, Lq, L, 4) boxes
                (cx, cy, w, h); L may be 1 to share one reference across levels.
            spatial_shapes: (L, 2) int64 (H, W) per level.
            level_start_index: (L,) int64; computed from spatial_shapes when None.
        Returns:
            identity + dropout(output_proj(attention)), in query's layout.
        """
        if value is None:
            value = query
        if identity is None:
            identity = query
        if not self.batch_first:
            query, value = query.transpose(0, 1), value.transpose(0, 1)
            query_pos = None if query_pos is None else query_pos.transpose(0, 1)
        N, Lq, _ = query.shape
        S = value.shape[1]
        self._check_own_inputs(N, Lq, S, reference_points, spatial_shapes, key_padding_mask)
        if level_start_index is None:
            sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
            level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))

        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(N, S, self.num_heads, -1)

        fused = self._fuses()
        if fused and self._projects_on_cpu(query, identity):
            return self._blocked_forward(
                query, query_pos, identity, value, reference_points, spatial_shapes,
                level_start_index,
            )  # fmt: skip
        sampled = self._sample(
            query, query_pos, value, reference_points, spatial_shapes, level_start_index, fused
        )
        output = self.output_proj(sampled)
        if not self.batch_first:
            output = output.transpose(0, 1)
        return identity + self.dropout(output)

    # queries per block of the CPU eval path: a block's offsets, weights and sampling
    # locations stay in cache from the matmul that makes them to the kernel that reads them
    block_queries: int = 1024

    def _sample(
        self,
        query: Tensor,  # (N, Lq, C)
        query_pos: Tensor | None,  # (N, Lq, C)
        value: Tensor,  # (N, S, M, C / M), projected
        reference_points: Tensor,  # (N, Lq, L or 1, 2 or 4)
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        fused: bool,
    ) -> Tensor:
        """The attention-weighted samples of `value` for each query, before the output
        projection: (N, Lq, C)."""
        if query_pos is not None:
            query = query + query_pos
        N, Lq, _ = query.shape
        L, P, M = self.num_levels, self.num_points, self.num_heads
        # Locations and weights stay float32 when value is half (autocast) so sampling positions
        # keep their precision; float64 models keep float64.
        loc_dtype = value.dtype if value.dtype in (torch.float32, torch.float64) else torch.float32
        points = reference_points.shape[-1] == 2
        # offsets are in pixels of each level (x / W_l, y / H_l) for points
        normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(loc_dtype)
        if fused:
            offsets, logits = self._offsets_and_logits(query, normalizer if points else None)
        else:
            offsets, logits = self.sampling_offsets(query), self.attention_weights(query)
        offsets = offsets.view(N, Lq, M, L * P * 2).to(loc_dtype)  # per head: (level, point, xy)
        logits = logits.view(N, Lq, M, L * P).to(loc_dtype)
        attention_weights = logits.softmax(-1).view(N, Lq, M, L, P)
        reference_points = reference_points.to(loc_dtype)
        if points:
            # References and level sizes repeated for each point, laid out like one head's
            # offsets: the sums then broadcast over heads only, with long contiguous rows (the
            # same numbers as broadcasting the size-2 and P dims, several times faster on a CPU).
            if not fused:  # the fused matmul already divided the offsets by the level sizes
                offsets = offsets / _repeat_per_point(normalizer, L, P)
            reference = _repeat_per_point(reference_points, L, P)  # (N, Lq, 1, L * P * 2)
            sampling_locations = (reference + offsets).view(N, Lq, M, L, P, 2)
        else:
            # offsets are in units of half the box size, spread over the points
            offsets = offsets.view(N, Lq, M, L, P, 2)
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        return ms_deform_attn(
            value.contiguous(),
            spatial_shapes.contiguous(),
            level_start_index.contiguous(),
            sampling_locations.contiguous(),
            attention_weights.contiguous(),
        )

    def _projects_on_cpu(self, query: Tensor, identity: Tensor) -> bool:
        """Whether eval can project with the residual in one call (`_project_onto`): batch-first,
        a CPU the oneDNN ops run on, and the residual in the compute dtype (a half sum would
        lose precision)."""
        return (
            self.batch_first
            and onednn_fusion_available(query, "_linear_pointwise")
            and cpu_compute_dtype(query) == identity.dtype
        )

    def _project_onto(self, sampled: Tensor, identity: Tensor, out: Tensor) -> None:
        """out = identity + output_proj(sampled) (dropout is the identity in eval), `out`
        contiguous: float32 by MKL's matmul accumulating onto identity + bias, bfloat16 by one
        oneDNN call."""
        weight, bias = self.output_proj.weight, self.output_proj.bias
        if identity.dtype == torch.float32:
            torch.add(identity, bias, out=out)  # (N, Lq, C)
            out.view(-1, out.shape[-1]).addmm_(sampled.reshape(-1, sampled.shape[-1]), weight.t())
            return
        dtype = identity.dtype
        out.copy_(
            onednn_op("_linear_pointwise").binary(
                sampled.to(dtype), identity.contiguous(), weight.to(dtype), bias.to(dtype), "add"
            )
        )

    def _blocked_forward(
        self,
        query: Tensor,
        query_pos: Tensor | None,
        identity: Tensor,
        value: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
    ) -> Tensor:
        """Eval on the CPU: the forward above for one image and at most `block_queries` queries
        at a time; with many queries (the encoder's ~18k tokens) each block's offsets, weights
        and locations are made and consumed while in cache. Queries attend independently, so
        the result is the unblocked one."""
        query, identity = query.contiguous(), identity.contiguous()
        out = torch.empty_like(identity)
        for n in range(query.shape[0]):
            image = slice(n, n + 1)
            for start in range(0, query.shape[1], self.block_queries):
                rows = slice(start, start + self.block_queries)
                sampled = self._sample(
                    query[image, rows],
                    None if query_pos is None else query_pos[image, rows],
                    value[image],
                    reference_points[image, rows],
                    spatial_shapes,
                    level_start_index,
                    fused=True,
                )
                self._project_onto(sampled, identity[image, rows], out=out[image, rows])
        return out

    def _fuses(self) -> bool:
        return (
            self.fuse_inference
            and not self.training
            and not torch.is_grad_enabled()
            and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
            and not torch.jit.is_tracing()
        )

    def _offsets_and_logits(self, query: Tensor, normalizer: Tensor | None) -> tuple:
        """`sampling_offsets(query)` (divided by `normalizer`, (L, 2) level sizes as (W, H),
        when given) and `attention_weights(query)` from one matmul over the stacked weights."""
        M, L, P = self.num_heads, self.num_levels, self.num_points
        offset_weight, offset_bias = self.sampling_offsets.weight, self.sampling_offsets.bias
        if normalizer is not None:
            # rows are ordered (head, level, point, xy)
            scale = normalizer.reciprocal().to(offset_weight.dtype)[None, :, None, :]
            scale = scale.expand(M, L, P, 2).reshape(-1)
            offset_weight, offset_bias = offset_weight * scale[:, None], offset_bias * scale
        weight = torch.cat((offset_weight, self.attention_weights.weight))
        bias = torch.cat((offset_bias, self.attention_weights.bias))
        return F.linear(query, weight, bias).split((M * L * P * 2, M * L * P), dim=-1)


def _repeat_per_point(xy: Tensor, num_levels: int, num_points: int) -> Tensor:
    """(..., L or 1, 2) per-level (x, y) pairs -> (..., 1, L * P * 2): each level's pair
    repeated for its P points, in the (level, point, xy) order of one head's offsets."""
    *lead, _, _ = xy.shape
    repeated = xy[..., None, :].expand(*lead, num_levels, num_points, 2)
    return repeated.reshape(*lead, 1, num_levels * num_points * 2)
