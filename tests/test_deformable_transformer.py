"""The deformable transformer's geometry against hand-computed values: valid ratios, encoder
reference points, two-stage proposals and their sine embedding, and the decoder's reference
refinement (docs/model.md)."""

from __future__ import annotations

import math
import random

import torch
from torch import nn

from projects.deformable_detr.modeling import (
    DeformableDetrTransformer,
    DeformableDetrTransformerDecoder,
    DeformableDetrTransformerEncoder,
)

Transformer = DeformableDetrTransformer


def padding_mask(height: int, width: int, valid_height: int, valid_width: int) -> torch.Tensor:
    mask = torch.ones(1, height, width, dtype=torch.bool)
    mask[:, :valid_height, :valid_width] = False
    return mask


def test_valid_ratio_is_width_then_height():
    mask = torch.cat([padding_mask(4, 5, 3, 2), padding_mask(4, 5, 4, 5)])
    ratios = Transformer.get_valid_ratio(mask)
    torch.testing.assert_close(ratios, torch.tensor([[2 / 5, 3 / 4], [1.0, 1.0]]))


def test_encoder_reference_points_are_pixel_centres_of_the_valid_image():
    # two levels: 2x4 (valid 2x2) and 1x2 (valid 1x1); one image
    spatial_shapes = torch.tensor([[2, 4], [1, 2]])
    valid_ratios = torch.tensor([[[2 / 4, 2 / 2], [1 / 2, 1 / 1]]])  # (N, L, (w, h))
    points = DeformableDetrTransformerEncoder.get_reference_points(
        spatial_shapes, valid_ratios, torch.device("cpu")
    )
    assert points.shape == (1, 8 + 2, 2, 2)
    # level-0 pixel (row 1, column 1): centre (1.5, 1.5) / valid size (2, 2) = (0.75, 0.75),
    # then in each level's padded coordinates: x * valid_ratio_w, y * valid_ratio_h
    index = 1 * 4 + 1
    expected = torch.tensor([[0.75 * 0.5, 0.75 * 1.0], [0.75 * 0.5, 0.75 * 1.0]])
    torch.testing.assert_close(points[0, index], expected)
    # level-1 pixel (0, 0): centre (0.5, 0.5) / valid (1, 1)
    torch.testing.assert_close(points[0, 8], torch.tensor([[0.25, 0.5], [0.25, 0.5]]))
    # a padded pixel of level 0 (column 3): centre 3.5 / valid width 2 -> 1.75 (outside)
    torch.testing.assert_close(points[0, 3, 0, 0], torch.tensor(1.75 * 0.5))


def two_stage_transformer(embed_dim: int = 16) -> Transformer:
    encoder = DeformableDetrTransformerEncoder(
        embed_dim=embed_dim, num_heads=2, feedforward_dim=32, num_layers=1, num_feature_levels=2
    )
    decoder = DeformableDetrTransformerDecoder(
        embed_dim=embed_dim, num_heads=2, feedforward_dim=32, num_layers=1, num_feature_levels=2
    )
    return Transformer(encoder, decoder, num_feature_levels=2, as_two_stage=True)


def test_encoder_output_proposals():
    torch.manual_seed(random.randrange(2**31))
    transformer = two_stage_transformer()
    # level 0: 3x4 map with a valid 2x3 region; level 1: 1x2, valid 1x2
    spatial_shapes = torch.tensor([[3, 4], [1, 2]])
    mask = torch.cat([padding_mask(3, 4, 2, 3).flatten(1), padding_mask(1, 2, 1, 2).flatten(1)], 1)
    memory = torch.randn(1, 14, 16)
    output_memory, proposals = transformer.gen_encoder_output_proposals(
        memory, mask, spatial_shapes
    )

    def logit(x: float) -> float:
        return math.log(x / (1 - x))

    # level 0, row 1, column 2: centre ((2 + 0.5) / 3, (1 + 0.5) / 2), size 0.05
    expected = torch.tensor([logit(2.5 / 3), logit(1.5 / 2), logit(0.05), logit(0.05)])
    torch.testing.assert_close(proposals[0, 1 * 4 + 2], expected)
    # level 1, column 1: centre (1.5 / 2, 0.5 / 1), size 0.05 * 2
    expected = torch.tensor([logit(0.75), logit(0.5), logit(0.1), logit(0.1)])
    torch.testing.assert_close(proposals[0, 12 + 1], expected)
    # padded tokens (level 0, column 3 and row 2) are +inf and read zero memory
    padded = mask[0]
    assert torch.isinf(proposals[0, padded]).all() and (proposals[0, padded] > 0).all()
    projected_zero = transformer.enc_output_norm(transformer.enc_output(torch.zeros(16)))
    torch.testing.assert_close(
        output_memory[0, padded], projected_zero.expand(int(padded.sum()), -1)
    )
    # a valid token's memory goes through enc_output + enc_output_norm
    torch.testing.assert_close(
        output_memory[0, 0], transformer.enc_output_norm(transformer.enc_output(memory[0, 0]))
    )


def test_proposal_sine_embedding():
    proposals = torch.randn(2, 3, 4)
    embedding = Transformer.get_proposal_pos_embed(proposals, num_pos_feats=8)
    assert embedding.shape == (2, 3, 32)
    scaled = proposals.sigmoid() * 2 * math.pi
    for coordinate in range(4):
        for i in range(8):
            value = scaled[..., coordinate] / 10000 ** (2 * (i // 2) / 8)
            expected = value.sin() if i % 2 == 0 else value.cos()
            # per coordinate (x, y, w, h), features interleaved: sine of the even ones,
            # cosine of the odd ones
            torch.testing.assert_close(embedding[..., coordinate * 8 + i], expected)


class ConstantHead(nn.Module):
    """A box head predicting the same (trainable) delta for every query."""

    def __init__(self, delta: torch.Tensor) -> None:
        super().__init__()
        self.delta = nn.Parameter(delta.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.delta.expand(*x.shape[:-1], 4)


def test_decoder_refines_references_from_2d_to_4d():
    torch.manual_seed(random.randrange(2**31))
    decoder = DeformableDetrTransformerDecoder(
        embed_dim=16, num_heads=2, feedforward_dim=32, num_layers=2, num_feature_levels=1
    )
    delta = torch.tensor([0.3, -0.2, -1.0, 0.5])
    decoder.bbox_embed = nn.ModuleList([ConstantHead(delta), ConstantHead(delta)])
    reference = torch.tensor([[[0.4, 0.7]]])  # (N=1, Q=1, 2)
    memory = torch.randn(1, 6, 16, requires_grad=True)
    states, references = decoder(
        torch.randn(1, 1, 16),
        torch.randn(1, 1, 16),
        reference,
        memory,
        torch.tensor([[2, 3]]),
        torch.tensor([0]),
        torch.ones(1, 1, 2),
        torch.zeros(1, 6, dtype=torch.bool),
    )
    assert states.shape == (2, 1, 1, 16)

    def logit(x: torch.Tensor) -> torch.Tensor:
        return torch.log(x / (1 - x))

    # layer 0: a 2-d reference moves the centre; the size comes from the head alone
    first = torch.cat([(delta[:2] + logit(reference[0, 0])).sigmoid(), delta[2:].sigmoid()])
    torch.testing.assert_close(references[0, 0, 0], first)
    # layer 1: a 4-d reference is refined as a whole, in logit space
    torch.testing.assert_close(references[1, 0, 0], (delta + logit(first)).sigmoid())

    # detached between layers: layer 1 samples at the box layer 0's head predicted, but no
    # gradient of layer 1's output flows back into that head through the reference
    assert not references.requires_grad
    # (a random projection: the plain sum of a LayerNorm's output has no gradient at all)
    (states[1] * torch.randn_like(states[1])).sum().backward()
    assert memory.grad is not None and memory.grad.abs().sum() > 0  # the graph itself is live
    first_head = decoder.bbox_embed[0].delta
    assert first_head.grad is None or torch.count_nonzero(first_head.grad) == 0
