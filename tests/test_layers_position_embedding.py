"""PositionEmbeddingSine against a hand-written per-pixel loop."""

from __future__ import annotations

import math

import pytest
import torch

from detrkit.layers import PositionEmbeddingSine


def _reference_loop(
    mask: torch.Tensor,
    num_pos_feats: int,
    temperature: float,
    normalize: bool,
    scale: float,
    eps: float,
    offset: float,
) -> torch.Tensor:
    """Pixel by pixel, channel by channel, in Python floats."""
    batch, height, width = mask.shape
    out = torch.zeros(batch, 2 * num_pos_feats, height, width, dtype=torch.float64)
    valid = (~mask).tolist()
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                y = sum(valid[b][r][j] for r in range(i + 1))
                x = sum(valid[b][i][c] for c in range(j + 1))
                if normalize:
                    y_total = sum(valid[b][r][j] for r in range(height))
                    x_total = sum(valid[b][i][c] for c in range(width))
                    y = (y + offset) / (y_total + eps) * scale
                    x = (x + offset) / (x_total + eps) * scale
                for k in range(num_pos_feats):
                    freq = temperature ** (2 * (k // 2) / num_pos_feats)
                    trig = math.sin if k % 2 == 0 else math.cos
                    out[b, k, i, j] = trig(y / freq)
                    out[b, num_pos_feats + k, i, j] = trig(x / freq)
    return out


def _assert_close_where_defined(
    got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor
) -> None:
    """Compare y channels where the pixel's column has a valid pixel, x channels where its row
    has one. On a fully padded line with an offset the normalized position is offset / eps, a
    huge number whose sine float32 cannot reproduce; such positions are only required finite."""
    assert torch.isfinite(got).all()
    num_feats = got.shape[1] // 2
    valid = ~mask
    y_defined = valid.any(dim=1, keepdim=True).expand_as(mask)  # (B, H, W)
    x_defined = valid.any(dim=2, keepdim=True).expand_as(mask)
    for channels, defined in (
        (slice(0, num_feats), y_defined),
        (slice(num_feats, None), x_defined),
    ):
        g = got[:, channels].permute(0, 2, 3, 1)[defined]  # (P, F)
        e = expected[:, channels].permute(0, 2, 3, 1)[defined]
        torch.testing.assert_close(g.double(), e, atol=2e-5, rtol=0)


def _padding_mask(batch: int, height: int, width: int) -> torch.Tensor:
    """Bottom/right padding of random valid sizes, as ImageList makes it."""
    mask = torch.ones(batch, height, width, dtype=torch.bool)
    for b in range(batch):
        h = int(torch.randint(1, height + 1, ()).item())
        w = int(torch.randint(1, width + 1, ()).item())
        mask[b, :h, :w] = False
    return mask


@pytest.mark.parametrize("offset", [0.0, -0.5])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_loop_on_padded_masks(offset: float, normalize: bool) -> None:
    mask = _padding_mask(3, 5, 7)
    mask[0] = False  # one image without padding
    module = PositionEmbeddingSine(
        num_pos_feats=8, temperature=20, normalize=normalize, offset=offset
    )
    got = module(mask)
    expected = _reference_loop(mask, 8, 20, normalize, 2 * math.pi, 1e-6, offset)
    assert got.shape == (3, 16, 5, 7)
    assert got.dtype == torch.float32
    _assert_close_where_defined(got, expected, mask)


def test_matches_loop_on_arbitrary_mask() -> None:
    # positions count valid pixels, whatever the pattern of the mask
    mask = torch.rand(2, 4, 6) < 0.3
    module = PositionEmbeddingSine(num_pos_feats=6, temperature=100, offset=-0.5, scale=3.0)
    expected = _reference_loop(mask, 6, 100, True, 3.0, 1e-6, -0.5)
    _assert_close_where_defined(module(mask), expected, mask)


def test_hand_computed_values_deformable_detr_setting() -> None:
    # 4 x 4 unpadded map, offset -0.5: row 0 sits at (0.5 / 4) * 2*pi = pi/4
    module = PositionEmbeddingSine(num_pos_feats=128, temperature=10000, offset=-0.5)
    pos = module(torch.zeros(1, 4, 4, dtype=torch.bool))
    assert pos.shape == (1, 256, 4, 4)
    # channel 0 is sin(y / 1), channel 1 cos(y / 1); channel 128 is sin(x / 1)
    assert pos[0, 0, 0, 3].item() == pytest.approx(math.sin(math.pi / 4), abs=1e-5)
    assert pos[0, 1, 0, 3].item() == pytest.approx(math.cos(math.pi / 4), abs=1e-5)
    assert pos[0, 128, 3, 2].item() == pytest.approx(math.sin(2.5 / 4 * 2 * math.pi), abs=1e-5)
    # channel 2 divides by 10000 ** (2 / 128)
    y_row2 = 2.5 / 4 * 2 * math.pi
    assert pos[0, 2, 2, 0].item() == pytest.approx(math.sin(y_row2 / 10000 ** (2 / 128)), abs=1e-5)


def test_padding_does_not_change_valid_positions() -> None:
    # the embedding of an image's valid region does not depend on how much it is padded
    module = PositionEmbeddingSine(num_pos_feats=16, offset=-0.5)
    small = module(torch.zeros(1, 3, 4, dtype=torch.bool))
    padded_mask = torch.ones(1, 6, 9, dtype=torch.bool)
    padded_mask[0, :3, :4] = False
    padded = module(padded_mask)
    torch.testing.assert_close(padded[..., :3, :4], small)


def test_invalid_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"num_pos_feats.*7"):
        PositionEmbeddingSine(num_pos_feats=7)
    with pytest.raises(ValueError, match="bool mask"):
        PositionEmbeddingSine()(torch.zeros(1, 3, 3))
