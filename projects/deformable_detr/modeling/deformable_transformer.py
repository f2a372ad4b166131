"""The deformable transformer of Deformable DETR: encoder, decoder, and two-stage proposals.

Shapes use N = batch, S = total tokens over all levels, Q = queries, C = embed_dim, L = levels.
Module attribute names (`attentions`, `ffns`, `norms`, `level_embeds`, ...) are detrex's, so that
state dicts carry detrex key names; the forward methods spell out the official computation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from detrkit.layers import FFN, MultiScaleDeformableAttention, float32_forward, inverse_sigmoid


def _shape_list(spatial_shapes: torch.Tensor | Sequence[tuple[int, int]]) -> list:
    """(L, 2) sizes as a list of (H, W); a tensor is read back (a host sync on a GPU). A list is
    taken as it is, so sizes stay symbolic under torch.export."""
    if isinstance(spatial_shapes, torch.Tensor):
        return spatial_shapes.tolist()
    return list(spatial_shapes)


@dataclass
class PyramidLayout:
    """The flattened pyramid's geometry and positional inputs: a function of the padding masks
    and the level embeddings alone, so images of one size and padding can share it."""

    shapes: list[tuple[int, int]]  # (H_l, W_l) per level, as Python ints
    spatial_shapes: torch.Tensor  # (L, 2) int64
    level_start_index: torch.Tensor  # (L,) int64
    valid_ratios: torch.Tensor  # (N, L, 2) valid fraction as (width, height)
    mask_flatten: torch.Tensor  # (N, S) True on padding
    pos_flatten: torch.Tensor  # (N, S, C) sine + level embedding
    reference_points: torch.Tensor  # (N, S, L, 2) encoder reference points
    padded: bool  # False only when known that no token is padded (attention then skips masking)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then an FFN."""

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        feedforward_dim: int = 1024,
        attn_dropout: float = 0.1,
        ffn_dropout: float = 0.1,
        num_feature_levels: int = 4,
        num_points: int = 4,
    ) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(
            [
                MultiScaleDeformableAttention(
                    embed_dim=embed_dim,
                    num_heads=num_heads,
                    num_levels=num_feature_levels,
                    num_points=num_points,
                    dropout=attn_dropout,
                    batch_first=True,
                )
            ]
        )
        self.ffns = nn.ModuleList([FFN(embed_dim, feedforward_dim, ffn_drop=ffn_dropout)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)])

    def forward(
        self,
        x: torch.Tensor,  # (N, S, C)
        pos: torch.Tensor,  # (N, S, C) sine + level embedding
        reference_points: torch.Tensor,  # (N, S, L, 2)
        spatial_shapes: torch.Tensor,  # (L, 2)
        level_start_index: torch.Tensor,  # (L,)
        padding_mask: torch.Tensor | None,  # (N, S), True on padding; None: no padding
    ) -> torch.Tensor:
        # the attention module returns x + dropout(attention(x + pos))
        x = self.attentions[0](
            query=x,
            value=x,
            query_pos=pos,
            key_padding_mask=padding_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
        )
        x = self.norms[0](x)
        x = self.norms[1](self.ffns[0](x, identity=x))  # x + ffn(x)
        return x


class DeformableDetrTransformerEncoder(nn.Module):
    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        feedforward_dim: int = 1024,
        attn_dropout: float = 0.1,
        ffn_dropout: float = 0.1,
        num_layers: int = 6,
        num_feature_levels: int = 4,
        num_points: int = 4,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            [
                DeformableEncoderLayer(
                    embed_dim,
                    num_heads,
                    feedforward_dim,
                    attn_dropout,
                    ffn_dropout,
                    num_feature_levels,
                    num_points,
                )
                for _ in range(num_layers)
            ]
        )

    @staticmethod
    def get_reference_points(
        spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
        valid_ratios: torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        """Pixel centres of every level, normalized to the valid (unpadded) part of their own
        level, then expressed in every level's coordinates: (N, S, L, 2) as (x, y).

        `spatial_shapes` as a list of (H, W) saves reading the sizes back from a device tensor
        (and keeps them symbolic under torch.export).
        """
        per_level = []
        for lvl, (height, width) in enumerate(_shape_list(spatial_shapes)):
            # arange + 0.5 equals the official linspace(0.5, size - 0.5, size) exactly, and
            # unlike linspace it keeps the sizes symbolic under torch.export
            ref_y, ref_x = torch.meshgrid(
                torch.arange(height, dtype=torch.float32, device=device) + 0.5,
                torch.arange(width, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * height)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * width)
            per_level.append(torch.stack((ref_x, ref_y), -1))  # (N, H*W, 2)
        reference_points = torch.cat(per_level, 1)  # (N, S, 2)
        return reference_points[:, :, None] * valid_ratios[:, None]  # (N, S, L, 2)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        padding_mask: torch.Tensor | None,
        reference_points: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x, pos: (N, S, C); `reference_points` (N, S, L, 2) when the caller has them already
        (`PyramidLayout`), else computed here; `padding_mask` None when nothing is padded."""
        if reference_points is None:
            reference_points = self.get_reference_points(spatial_shapes, valid_ratios, x.device)
        for layer in self.layers:
            x = layer(x, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return x


class SelfAttention(nn.Module):
    """Multi-head self-attention between queries (detrex's `attentions.0` with its `.attn`).

    Query and key get the positional embedding, the value does not; returns the residual sum.
    """

    # eval without autograd: the same attention written with batch-first projections (see
    # `_batch_first_attention`); DeformableDETR.set_fast_inference(False) turns it off
    fast_inference: bool = True

    def __init__(self, embed_dim: int, num_heads: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=attn_drop, batch_first=True)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        query: torch.Tensor,  # (N, Q, C)
        query_pos: torch.Tensor,  # (N, Q, C)
        attn_mask: torch.Tensor | None = None,  # (Q, Q) bool, True: query i may not see key j
    ) -> torch.Tensor:
        q = k = query + query_pos
        if self.fast_inference and not self.training and not torch.is_grad_enabled():
            out = self._batch_first_attention(q, query, attn_mask)
        else:
            out = self.attn(q, k, query, attn_mask=attn_mask, need_weights=False)[0]
        return query + self.proj_drop(out)

    def _batch_first_attention(
        self, qk: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """nn.MultiheadAttention's computation in eval (no dropout) on (N, Q, C) inputs kept
        batch-first: the module's own path projects (Q, N, C) transposed views, which for
        N > 1 under CPU autocast become batched matmuls over a weight copied Q times."""
        attn = self.attn
        batch, queries, channels = qk.shape
        heads = attn.num_heads
        weight, bias = attn.in_proj_weight, attn.in_proj_bias
        q, k = F.linear(qk, weight[: 2 * channels], bias[: 2 * channels]).chunk(2, dim=-1)
        v = F.linear(value, weight[2 * channels :], bias[2 * channels :])

        def split_heads(x: torch.Tensor) -> torch.Tensor:  # (N, Q, C) -> (N, heads, Q, C / heads)
            return x.reshape(batch, queries, heads, channels // heads).transpose(1, 2)

        allowed = None if attn_mask is None else ~attn_mask  # SDPA's bool mask: True attends
        out = F.scaled_dot_product_attention(
            split_heads(q), split_heads(k), split_heads(v), attn_mask=allowed
        )
        out = out.transpose(1, 2).reshape(batch, queries, channels)
        return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


class DeformableDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention, deformable cross-attention, FFN.

    Norm names follow detrex: norms.0 after self-attention, norms.1 after cross-attention.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        feedforward_dim: int = 1024,
        attn_dropout: float = 0.1,
        ffn_dropout: float = 0.1,
        num_feature_levels: int = 4,
        num_points: int = 4,
    ) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(
            [
                SelfAttention(embed_dim, num_heads, attn_drop=attn_dropout, proj_drop=attn_dropout),
                MultiScaleDeformableAttention(
                    embed_dim=embed_dim,
                    num_heads=num_heads,
                    num_levels=num_feature_levels,
                    num_points=num_points,
                    dropout=attn_dropout,
                    batch_first=True,
                ),
            ]
        )
        self.ffns = nn.ModuleList([FFN(embed_dim, feedforward_dim, ffn_drop=ffn_dropout)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dim) for _ in range(3)])

    def forward(
        self,
        query: torch.Tensor,  # (N, Q, C)
        query_pos: torch.Tensor,  # (N, Q, C)
        reference_points: torch.Tensor,  # (N, Q, L, 2 or 4), already scaled by valid ratios
        memory: torch.Tensor,  # (N, S, C)
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,  # (N, S); None: no padding
        self_attn_mask: torch.Tensor | None = None,  # (Q, Q) bool, True: blocked
    ) -> torch.Tensor:
        query = self.norms[0](self.attentions[0](query, query_pos, self_attn_mask))
        query = self.attentions[1](
            query=query,
            value=memory,
            query_pos=query_pos,
            key_padding_mask=memory_padding_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
        )
        query = self.norms[1](query)
        query = self.norms[2](self.ffns[0](query, identity=query))  # query + ffn(query)
        return query


class DeformableDetrTransformerDecoder(nn.Module):
    """Stack of decoder layers returning every layer's output and reference points.

    With iterative box refinement the model assigns `bbox_embed` (one head per layer); each
    layer's prediction then becomes the next layer's (detached) reference box. In two-stage mode
    the model also assigns `class_embed`, whose extra last head scores encoder proposals.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        feedforward_dim: int = 1024,
        attn_dropout: float = 0.1,
        ffn_dropout: float = 0.1,
        num_layers: int = 6,
        return_intermediate: bool = True,
        num_feature_levels: int = 4,
        num_points: int = 4,
    ) -> None:
        super().__init__()
        if not return_intermediate:
            raise ValueError(
                "DeformableDetrTransformerDecoder: return_intermediate=False is not supported; "
                "Deformable DETR needs every layer's output for its auxiliary losses"
            )
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            [
                DeformableDecoderLayer(
                    embed_dim,
                    num_heads,
                    feedforward_dim,
                    attn_dropout,
                    ffn_dropout,
                    num_feature_levels,
                    num_points,
                )
                for _ in range(num_layers)
            ]
        )
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(
        self,
        query: torch.Tensor,  # (N, Q, C) content queries
        query_pos: torch.Tensor,  # (N, Q, C)
        reference_points: torch.Tensor,  # (N, Q, 2) or (N, Q, 4), normalized, sigmoid space
        memory: torch.Tensor,  # (N, S, C) encoder output
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,  # (N, L, 2)
        memory_padding_mask: torch.Tensor | None,  # (N, S); None: no padding
        self_attn_mask: torch.Tensor | None = None,  # (Q, Q) bool, True: query i ignores j
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (layers, N, Q, C) states and (layers, N, Q, 2 or 4) reference points, the
        references being the ones each layer's boxes are predicted relative to *after* it."""
        states, references = [], []
        for layer_id, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ratios = torch.cat([valid_ratios, valid_ratios], -1)
            else:
                ratios = valid_ratios
            reference_input = reference_points[:, :, None] * ratios[:, None]  # (N, Q, L, 2|4)
            query = layer(
                query,
                query_pos,
                reference_input,
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
                self_attn_mask,
            )
            if self.bbox_embed is not None:
                delta = float32_forward(self.bbox_embed[layer_id], query)  # boxes in float32
                if reference_points.shape[-1] == 4:
                    new_reference = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:  # a 2-d reference refines the centre; the size comes from the head alone
                    centre = delta[..., :2] + inverse_sigmoid(reference_points)
                    new_reference = torch.cat([centre, delta[..., 2:]], -1).sigmoid()
                reference_points = new_reference.detach()
            states.append(query)
            references.append(reference_points)
        return torch.stack(states), torch.stack(references)


class DeformableDetrTransformer(nn.Module):
    """Flattens the feature pyramid, runs the encoder, builds the decoder queries (learned, or
    the top-scoring encoder proposals in two-stage mode) and runs the decoder."""

    def __init__(
        self,
        encoder: DeformableDetrTransformerEncoder,
        decoder: DeformableDetrTransformerDecoder,
        num_feature_levels: int = 4,
        as_two_stage: bool = False,
        two_stage_num_proposals: int = 300,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.num_feature_levels = num_feature_levels
        self.as_two_stage = as_two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.embed_dim = self.encoder.embed_dim

        self.level_embeds = nn.Parameter(torch.empty(num_feature_levels, self.embed_dim))
        if as_two_stage:
            self.enc_output = nn.Linear(self.embed_dim, self.embed_dim)
            self.enc_output_norm = nn.LayerNorm(self.embed_dim)
            self.pos_trans = nn.Linear(self.embed_dim * 2, self.embed_dim * 2)
            self.pos_trans_norm = nn.LayerNorm(self.embed_dim * 2)
        else:
            self.reference_points = nn.Linear(self.embed_dim, 2)
        self.init_weights()

    def init_weights(self) -> None:
        # official: xavier for every matrix, then the attention modules' own initialization
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.init_weights()
        if not self.as_two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embeds)

    @staticmethod
    def get_valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """(N, H, W) padding mask -> (N, 2) valid fraction of the map as (width, height)."""
        _, height, width = mask.shape
        valid_height = torch.sum(~mask[:, :, 0], 1)
        valid_width = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_width.float() / width, valid_height.float() / height], -1)

    def gen_encoder_output_proposals(
        self,
        memory: torch.Tensor,
        memory_padding_mask: torch.Tensor,
        spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One proposal per encoder token: centre at the pixel, size 0.05 * 2**level of the valid
        image, in logit space. Padded tokens and proposals too near the border get +inf and their
        memory is zeroed. Returns (N, S, C) projected memory and (N, S, 4) proposals.
        `spatial_shapes`: (L, 2) tensor or list of (H, W) (the list needs no read-back)."""
        batch = memory.shape[0]
        proposals = []
        start = 0
        for lvl, (height, width) in enumerate(_shape_list(spatial_shapes)):
            mask = memory_padding_mask[:, start : start + height * width].view(batch, height, width)
            valid_height = torch.sum(~mask[:, :, 0], 1)
            valid_width = torch.sum(~mask[:, 0, :], 1)
            grid_y, grid_x = torch.meshgrid(  # arange: linspace(0, size - 1, size), export-safe
                torch.arange(height, dtype=torch.float32, device=memory.device),
                torch.arange(width, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)  # (H, W, 2)
            scale = torch.stack([valid_width, valid_height], 1).view(batch, 1, 1, 2)
            centre = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
            size = torch.ones_like(centre) * 0.05 * (2.0**lvl)
            proposals.append(torch.cat((centre, size), -1).view(batch, -1, 4))
            start += height * width
        output_proposals = torch.cat(proposals, 1)
        valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        invalid = memory_padding_mask.unsqueeze(-1) | ~valid
        output_proposals = output_proposals.masked_fill(invalid, float("inf"))
        output_memory = memory.masked_fill(invalid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, output_proposals

    @staticmethod
    def get_proposal_pos_embed(
        proposals: torch.Tensor, num_pos_feats: int = 128, temperature: int = 10000
    ) -> torch.Tensor:
        """Sine embedding of (N, Q, 4) logit-space boxes: `num_pos_feats` features per
        coordinate (128 for a 256-d model) -> (N, Q, 4 * num_pos_feats)."""
        scale = 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        proposals = proposals.sigmoid() * scale
        pos = proposals[:, :, :, None] / dim_t  # (N, Q, 4, 128)
        pos = torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)
        return pos

    def pyramid_layout(
        self,
        multi_level_masks: list[torch.Tensor],  # L x (N, H_l, W_l), True on padding
        multi_level_pos_embeds: list[torch.Tensor],  # L x (N, C, H_l, W_l)
        dtype: torch.dtype | None = None,
        check_padding: bool = False,
    ) -> PyramidLayout:
        """Everything the encoder and decoder take that depends on the padding masks only (and
        the level embeddings): see `PyramidLayout`. `dtype` casts the positional embedding (the
        features' dtype under autocast, so the encoder adds it without a float32 round trip);
        `check_padding` reads the masks once to learn whether anything is padded."""
        shapes = [(m.shape[-2], m.shape[-1]) for m in multi_level_masks]
        device = multi_level_masks[0].device
        mask_flatten = torch.cat([m.flatten(1) for m in multi_level_masks], 1)  # (N, S)
        pos_flatten = torch.cat(
            [
                pos.flatten(2).transpose(1, 2) + self.level_embeds[lvl].view(1, 1, -1)
                for lvl, pos in enumerate(multi_level_pos_embeds)
            ],
            1,
        )  # (N, S, C)
        if dtype is not None:
            pos_flatten = pos_flatten.to(dtype)
        # torch.tensor (not as_tensor) keeps the sizes symbolic under torch.export
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
        )
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in multi_level_masks], 1)
        reference_points = DeformableDetrTransformerEncoder.get_reference_points(
            shapes, valid_ratios, device
        )
        padded = bool(mask_flatten.any()) if check_padding else True
        return PyramidLayout(
            shapes,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            mask_flatten,
            pos_flatten,
            reference_points,
            padded,
        )

    def forward(
        self,
        multi_level_feats: list[torch.Tensor],  # L x (N, C, H_l, W_l)
        multi_level_masks: list[torch.Tensor],  # L x (N, H_l, W_l), True on padding
        multi_level_pos_embeds: list[torch.Tensor] | None,  # L x (N, C, H_l, W_l)
        query_embed: torch.Tensor | None,  # (Q, 2C) learned queries, None in two-stage mode
        layout: PyramidLayout | None = None,  # from `pyramid_layout`, when the caller has it
        self_attn_mask: torch.Tensor | None = None,  # (Q, Q) bool for the decoder's queries
    ):
        if layout is None:
            layout = self.pyramid_layout(multi_level_masks, multi_level_pos_embeds)
        # (N, C, H, W) -> (N, H*W, C): a view when the map is channels_last
        feat_flatten = torch.cat([f.flatten(2).transpose(1, 2) for f in multi_level_feats], 1)
        spatial_shapes = layout.spatial_shapes
        level_start_index = layout.level_start_index
        valid_ratios = layout.valid_ratios
        mask_flatten = layout.mask_flatten
        attention_mask = mask_flatten if layout.padded else None

        memory = self.encoder(
            feat_flatten,
            layout.pos_flatten,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            attention_mask,
            layout.reference_points,
        )

        batch, _, channels = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.as_two_stage:
            output_memory, output_proposals = self.gen_encoder_output_proposals(
                memory, mask_flatten, layout.shapes
            )
            num_layers = self.decoder.num_layers
            class_head = self.decoder.class_embed[num_layers]
            box_head = self.decoder.bbox_embed[num_layers]
            # the proposal heads in float32 under autocast, as every box head (see
            # detrkit.layers.precision), on one float32 copy of the tokens: their boxes become
            # the decoder's references
            enc_outputs_class, enc_outputs_coord_unact = float32_forward(
                lambda tokens: (class_head(tokens), box_head(tokens)), output_memory
            )
            enc_outputs_coord_unact = enc_outputs_coord_unact + output_proposals
            # the proposals scoring highest for class 0 (the "object" logit) seed the decoder
            objectness = enc_outputs_class[..., 0]
            if not self.training:
                # Padded tokens all score alike and would outrank weak real proposals in a
                # padded batch but not alone; in eval they never become queries, so a result
                # does not depend on the batch (training keeps the official selection).
                objectness = objectness.masked_fill(mask_flatten, float("-inf"))
            topk = min(self.two_stage_num_proposals, enc_outputs_class.shape[1])
            topk_index = torch.topk(objectness, topk, dim=1)[1]
            topk_coords_unact = torch.gather(
                enc_outputs_coord_unact, 1, topk_index.unsqueeze(-1).expand(-1, -1, 4)
            ).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(
                self.pos_trans(self.get_proposal_pos_embed(topk_coords_unact, channels // 2))
            )
            query_pos, query = torch.split(pos_trans_out, channels, dim=2)
        else:
            query_pos, query = torch.split(query_embed, channels, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            query = query.unsqueeze(0).expand(batch, -1, -1)
            # float32 under autocast: a bf16 sigmoid near 1 is good to 2^-8 of the image side,
            # and every box of the decoder is refined from this point
            reference_points = float32_forward(self.reference_points, query_pos).sigmoid()
        init_reference = reference_points

        states, inter_references = self.decoder(
            query,
            query_pos,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            attention_mask,
            self_attn_mask,
        )
        return states, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact
