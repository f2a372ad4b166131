"""`ShapeLayout`: a state dict's `{key: shape}` built module by module, so that the official and
the transformers layouts describe Deformable DETR's modules with one set of shape rules."""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["ShapeLayout"]


class ShapeLayout(OrderedDict[str, tuple[int, ...]]):
    """`{key: shape}` in insertion order; each method adds one module's parameters in the order
    its state dict lists them."""

    def linear(self, name: str, out_features: int, in_features: int) -> None:
        """nn.Linear: weight (out, in) and bias (out,)."""
        self[f"{name}.weight"] = (out_features, in_features)
        self[f"{name}.bias"] = (out_features,)

    def layer_norm(self, name: str, channels: int) -> None:
        """An affine norm over `channels` (LayerNorm, GroupNorm): weight and bias."""
        self[f"{name}.weight"] = (channels,)
        self[f"{name}.bias"] = (channels,)

    def deformable_attention(
        self, name: str, heads: int, levels: int, points: int, dim: int
    ) -> None:
        """Multi-scale deformable attention: an (x, y) offset and a weight per sampling point
        (`heads * levels * points` of them), then the value and output projections."""
        samples = heads * levels * points
        self.linear(f"{name}.sampling_offsets", samples * 2, dim)
        self.linear(f"{name}.attention_weights", samples, dim)
        self.linear(f"{name}.value_proj", dim, dim)
        self.linear(f"{name}.output_proj", dim, dim)

    def box_head(self, name: str, dim: int) -> None:
        """The box MLP dim -> dim -> dim -> 4 (`layers.0..2`)."""
        self.linear(f"{name}.layers.0", dim, dim)
        self.linear(f"{name}.layers.1", dim, dim)
        self.linear(f"{name}.layers.2", 4, dim)
