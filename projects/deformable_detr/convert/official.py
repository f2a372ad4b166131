"""Official Deformable-DETR checkpoints (the paper's code) -> our (detrex) key names.

An official checkpoint is `{"model", "optimizer", "lr_scheduler", "epoch", "args"}`, `args` an
`argparse.Namespace`; it is read with `torch.load(weights_only=True)` (tensors, plain containers,
numbers and strings) plus `argparse.Namespace` and numpy scalars and dtypes; any other pickled
object is refused. Only `model` and `args.dilation` are used.

Name rules (official -> ours):

- `backbone.0.body.<torchvision ResNet name>` -> `backbone.<detectron2 name>` (torchvision.py).
- `input_proj.i.0` / `input_proj.i.1` (conv / GroupNorm) -> `neck.convs.i.conv` / `.norm` for the
  backbone levels and `neck.extra_convs.j.*` for the extra (stride-2 3x3) levels after them.
- `transformer.level_embed` -> `transformer.level_embeds`; `query_embed` -> `query_embedding`.
- encoder layers: `self_attn` -> `attentions.0`, `norm1` -> `norms.0`, `norm2` -> `norms.1`,
  `linear1` / `linear2` -> `ffns.0.layers.0.0` / `ffns.0.layers.1`.
- decoder layers: the official layer names its norms by definition order (norm1 after the cross
  attention, norm2 after the self attention, norm3 after the FFN), detrex by execution order, so
  `self_attn` (an nn.MultiheadAttention: packed q/k/v `in_proj_*` and `out_proj`) ->
  `attentions.0.attn`, `norm2` -> `norms.0`, `cross_attn` -> `attentions.1`, `norm1` ->
  `norms.1`, `norm3` -> `norms.2`; linear1/linear2 as in the encoder.
- heads and two-stage layers keep their names (`class_embed.k`, `bbox_embed.k.layers.j`,
  `transformer.reference_points`, `enc_output(_norm)`, `pos_trans(_norm)`,
  `transformer.decoder.bbox_embed.k`, `transformer.decoder.class_embed.k`).

Class heads: the official COCO head has 91 outputs indexed by COCO category id (no background
logit); ours has 80 contiguous classes, so each decoder layer's class head keeps the rows of the
80 category ids in order. Two-stage's seventh (proposal-scoring) head is trained with every label
0: its row 0 is the objectness logit that selects the proposals and the only row the model reads,
so it keeps official row 0 first, then the rows of the other 79 category ids (2, 3, ..., 90).

Aliases: a state dict lists a module once per name it is registered under. Without box
refinement the six layers share one class head and one box head (`class_embed.0..5` are one
tensor); with refinement `transformer.decoder.bbox_embed.k` is `bbox_embed.k`; two-stage also
lists `transformer.decoder.class_embed.k` as `class_embed.k`. Aliases must hold identical
tensors; the output keeps every name (so `load_state_dict(strict=True)` accepts it) with one
shared tensor per module, as the official file stores it.

`DetectionCheckpointer` refuses an unconverted official checkpoint (`refuse_unconverted`), naming
the conversion command.
"""

from __future__ import annotations

import argparse
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Set
from typing import Any

import torch

from detrkit.checkpoint import CheckpointError
from detrkit.checkpoint.convert import (
    ConversionError,
    ConversionResult,
    check_aliases,
    check_layout,
    model_state,
    resnet_layout,
    strip_prefix,
    torchvision_to_detectron2_name,
)
from detrkit.data.builtin_meta import COCO_CATEGORY_IDS

from .layout import ShapeLayout
from .variants import VARIANTS, read_structure, resolve_variant

__all__ = [
    "OFFICIAL_NUM_CLASSES",
    "convert_official",
    "head_aliases",
    "is_official_checkpoint",
    "official_layout",
    "official_to_detrex_name",
    "refuse_unconverted",
]

# the official ResNet-50 Deformable-DETR (all released variants)
EMBED_DIM = 256
NUM_HEADS = 8
NUM_POINTS = 4
FFN_DIM = 1024
NUM_ENCODER_LAYERS = 6
NUM_DECODER_LAYERS = 6
BACKBONE_CHANNELS = (512, 1024, 2048)  # res3, res4, res5
OFFICIAL_NUM_CLASSES = 91  # COCO category ids 0..90, used directly as class indices
DEFAULT_NUM_QUERIES = 300


def num_backbone_levels(num_feature_levels: int) -> int:
    """Levels taken from the backbone: res5 alone for one level, else res3..res5."""
    return 1 if num_feature_levels == 1 else len(BACKBONE_CHANNELS)


def num_predictions(as_two_stage: bool) -> int:
    """Head pairs: one per decoder layer, plus the encoder-proposal head in two-stage."""
    return NUM_DECODER_LAYERS + 1 if as_two_stage else NUM_DECODER_LAYERS


# ---------------------------------------------------------------------------------------------
# the layout of an official checkpoint


def official_layout(
    num_feature_levels: int,
    with_box_refine: bool,
    as_two_stage: bool,
    num_classes: int = OFFICIAL_NUM_CLASSES,
    num_queries: int = DEFAULT_NUM_QUERIES,
) -> OrderedDict[str, tuple[int, ...]]:
    """`{key: shape}` of an official checkpoint's model, in the order the official code lists
    them (transformer, heads, query embedding, input projections, backbone)."""
    shapes = ShapeLayout()
    d = EMBED_DIM
    shapes["transformer.level_embed"] = (num_feature_levels, d)
    for i in range(NUM_ENCODER_LAYERS):
        layer = f"transformer.encoder.layers.{i}"
        shapes.deformable_attention(
            f"{layer}.self_attn", NUM_HEADS, num_feature_levels, NUM_POINTS, d
        )
        shapes.layer_norm(f"{layer}.norm1", d)
        shapes.linear(f"{layer}.linear1", FFN_DIM, d)
        shapes.linear(f"{layer}.linear2", d, FFN_DIM)
        shapes.layer_norm(f"{layer}.norm2", d)
    for i in range(NUM_DECODER_LAYERS):
        layer = f"transformer.decoder.layers.{i}"
        shapes.deformable_attention(
            f"{layer}.cross_attn", NUM_HEADS, num_feature_levels, NUM_POINTS, d
        )
        shapes.layer_norm(f"{layer}.norm1", d)
        shapes[f"{layer}.self_attn.in_proj_weight"] = (3 * d, d)  # q, k, v stacked
        shapes[f"{layer}.self_attn.in_proj_bias"] = (3 * d,)
        shapes.linear(f"{layer}.self_attn.out_proj", d, d)
        shapes.layer_norm(f"{layer}.norm2", d)
        shapes.linear(f"{layer}.linear1", FFN_DIM, d)
        shapes.linear(f"{layer}.linear2", d, FFN_DIM)
        shapes.layer_norm(f"{layer}.norm3", d)
    heads = num_predictions(as_two_stage)
    if with_box_refine:
        for k in range(heads):
            shapes.box_head(f"transformer.decoder.bbox_embed.{k}", d)
    if as_two_stage:
        for k in range(heads):
            shapes.linear(f"transformer.decoder.class_embed.{k}", num_classes, d)
        shapes.linear("transformer.enc_output", d, d)
        shapes.layer_norm("transformer.enc_output_norm", d)
        shapes.linear("transformer.pos_trans", 2 * d, 2 * d)
        shapes.layer_norm("transformer.pos_trans_norm", 2 * d)
    else:
        shapes.linear("transformer.reference_points", 2, d)
    for k in range(heads):
        shapes.linear(f"class_embed.{k}", num_classes, d)
    for k in range(heads):
        shapes.box_head(f"bbox_embed.{k}", d)
    if not as_two_stage:
        shapes["query_embed.weight"] = (num_queries, 2 * d)  # query position | content

    from_backbone = num_backbone_levels(num_feature_levels)
    in_channels = BACKBONE_CHANNELS[-from_backbone:]
    for i in range(num_feature_levels):
        if i < from_backbone:  # 1x1 projection of a backbone level
            shapes[f"input_proj.{i}.0.weight"] = (d, in_channels[i], 1, 1)
        else:  # 3x3 stride-2 conv on res5 for the first extra level, then on the previous one
            source = BACKBONE_CHANNELS[-1] if i == from_backbone else d
            shapes[f"input_proj.{i}.0.weight"] = (d, source, 3, 3)
        shapes[f"input_proj.{i}.0.bias"] = (d,)
        shapes.layer_norm(f"input_proj.{i}.1", d)  # GroupNorm(32, 256)
    shapes.update(resnet_layout(50, prefix="backbone.0.body."))
    return shapes


def head_aliases(with_box_refine: bool, as_two_stage: bool) -> OrderedDict[str, tuple[str, str]]:
    """`{alias key: (canonical key, why they are equal)}` for the head keys, which have the same
    names in the official and the detrex layouts."""

    def class_head(prefix: str) -> list[str]:
        return [f"{prefix}.weight", f"{prefix}.bias"]

    def box_head(prefix: str) -> list[str]:
        return [f"{prefix}.layers.{j}.{p}" for j in range(3) for p in ("weight", "bias")]

    aliases: OrderedDict[str, tuple[str, str]] = OrderedDict()
    heads = num_predictions(as_two_stage)
    if not with_box_refine:
        why = "without box refinement all decoder layers share one class head and one box head"
        for k in range(1, heads):
            for name, head in (("class_embed", class_head), ("bbox_embed", box_head)):
                for alias, canonical in zip(head(f"{name}.{k}"), head(f"{name}.0")):
                    aliases[alias] = (canonical, why)
    else:
        why = "with box refinement transformer.decoder.bbox_embed is the model's bbox_embed"
        for k in range(heads):
            for alias, canonical in zip(
                box_head(f"transformer.decoder.bbox_embed.{k}"), box_head(f"bbox_embed.{k}")
            ):
                aliases[alias] = (canonical, why)
    if as_two_stage:
        why = "in two-stage transformer.decoder.class_embed is the model's class_embed"
        for k in range(heads):
            for alias, canonical in zip(
                class_head(f"transformer.decoder.class_embed.{k}"), class_head(f"class_embed.{k}")
            ):
                aliases[alias] = (canonical, why)
    return aliases


def is_official_checkpoint(keys: Iterable[str]) -> bool:
    """True for a state dict in the official code's names (its level embedding's name)."""
    return "transformer.level_embed" in set(keys)


def refuse_unconverted(checkpoint: dict[str, Any], path: str, model_keys: Set[str]) -> None:
    """`DetectionCheckpointer`'s hook for official files: their names and 91-way class heads
    differ from the model's, so loading one without conversion fails at once."""
    if is_official_checkpoint(model_keys):  # a model that itself uses the official names
        return
    raise CheckpointError(
        f"checkpoint {path} is an official Deformable-DETR checkpoint, whose names and "
        "91-way class heads differ from this model's; convert it first: python "
        f"tools/convert_weights.py --source official --input {path} --output "
        "converted.pth, then load converted.pth"
    )


# ---------------------------------------------------------------------------------------------
# names

_LAYER_NAME = re.compile(
    r"transformer\.(encoder|decoder)\.layers\.(\d+)\.([a-z]+_?[a-z]*\d?)\.(.+)"
)
_LAYER_PARTS = {
    "encoder": {
        "self_attn": "attentions.0",
        "norm1": "norms.0",
        "linear1": "ffns.0.layers.0.0",
        "linear2": "ffns.0.layers.1",
        "norm2": "norms.1",
    },
    "decoder": {
        "self_attn": "attentions.0.attn",
        "norm2": "norms.0",
        "cross_attn": "attentions.1",
        "norm1": "norms.1",
        "linear1": "ffns.0.layers.0.0",
        "linear2": "ffns.0.layers.1",
        "norm3": "norms.2",
    },
}
_INPUT_PROJ = re.compile(r"input_proj\.(\d+)\.([01])\.(\w+)")
_RENAMED = {"transformer.level_embed": "transformer.level_embeds"}
_RENAMED_PREFIXES = {"query_embed.": "query_embedding."}
_UNCHANGED_PREFIXES = (
    "transformer.reference_points.",
    "transformer.enc_output.",
    "transformer.enc_output_norm.",
    "transformer.pos_trans.",
    "transformer.pos_trans_norm.",
    "transformer.decoder.bbox_embed.",
    "transformer.decoder.class_embed.",
    "class_embed.",
    "bbox_embed.",
)
_BACKBONE = "backbone.0.body."


def official_to_detrex_name(key: str, num_feature_levels: int) -> str:
    """The detrex name of an official checkpoint key (KeyError for a name no rule covers)."""
    if key in _RENAMED:
        return _RENAMED[key]
    layer = _LAYER_NAME.fullmatch(key)
    if layer:
        stack, index, part, rest = layer.groups()
        if part in _LAYER_PARTS[stack]:
            return f"transformer.{stack}.layers.{index}.{_LAYER_PARTS[stack][part]}.{rest}"
    proj = _INPUT_PROJ.fullmatch(key)
    if proj:
        level, which, field = int(proj[1]), proj[2], proj[3]
        part = "conv" if which == "0" else "norm"
        from_backbone = num_backbone_levels(num_feature_levels)
        if level < from_backbone:
            return f"neck.convs.{level}.{part}.{field}"
        return f"neck.extra_convs.{level - from_backbone}.{part}.{field}"
    if key.startswith(_BACKBONE):
        resnet_name = torchvision_to_detectron2_name(key[len(_BACKBONE) :])
        if resnet_name is not None:
            return f"backbone.{resnet_name}"
    for old, new in _RENAMED_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if key.startswith(_UNCHANGED_PREFIXES):
        return key
    raise KeyError(f"no rule maps the official key {key!r} to a detrex name")


# ---------------------------------------------------------------------------------------------
# conversion

_CLASS_HEAD = re.compile(r"(transformer\.decoder\.)?class_embed\.\d+\.(weight|bias)")


def _all_official_keys() -> set[str]:
    keys: set[str] = set()
    for variant in VARIANTS.values():
        keys.update(official_layout(*variant.structure))
    return keys


def _training_arg(args: Any, name: str) -> Any:
    if isinstance(args, argparse.Namespace):
        return getattr(args, name, None)
    if isinstance(args, Mapping):
        return args.get(name)
    return None


def convert_official(
    data: Any,
    path: str,
    variant: str | None = None,
    keep_all_classes: bool = False,
) -> ConversionResult:
    """Convert a loaded official checkpoint (`data`, read from `path`) to our names.

    `variant` (a name in VARIANTS) must agree with the file; it is required for single-scale
    files that do not record `args.dilation`. `keep_all_classes` keeps every class row (for a
    model trained with the official code on another dataset) instead of the 80 COCO rows of a
    91-way head.
    """
    state = model_state(data, path, expected="an official Deformable-DETR checkpoint")
    state = strip_prefix(state, "module.")
    args = data.get("args") if isinstance(data, Mapping) else None
    counters = [k for k in state if k.endswith(".num_batches_tracked")]
    for key in counters:  # plain BatchNorm counters; FrozenBatchNorm2d has none
        del state[key]

    levels, with_box_refine, as_two_stage = read_structure(
        path,
        state,
        "official",
        "transformer.level_embed",
        _all_official_keys(),
        "official Deformable-DETR",
    )
    dilation = _training_arg(args, "dilation")
    chosen = resolve_variant(
        path,
        (levels, with_box_refine, as_two_stage),
        variant,
        None if dilation is None else bool(dilation),
    )

    head = state.get("class_embed.0.weight")
    num_classes = int(head.shape[0]) if head is not None and head.dim() == 2 else 91
    queries = state.get("query_embed.weight")
    num_queries = int(queries.shape[0]) if queries is not None else DEFAULT_NUM_QUERIES
    layout = official_layout(levels, with_box_refine, as_two_stage, num_classes, num_queries)
    check_layout(path, state, layout, f"the official Deformable-DETR layout ({chosen.name})")
    aliases = head_aliases(with_box_refine, as_two_stage)
    check_aliases(path, state, aliases)

    if keep_all_classes:
        rows = None
    elif num_classes == OFFICIAL_NUM_CLASSES:
        rows = torch.tensor(COCO_CATEGORY_IDS, dtype=torch.long)
    else:
        raise ConversionError(
            f"{path}: the class heads have {num_classes} outputs; official COCO models have "
            f"{OFFICIAL_NUM_CLASSES} (indexed by category id), of which the 80 COCO rows are "
            f"kept. For a model trained on another dataset pass --keep-all-classes to keep all "
            f"{num_classes}"
        )

    # Two-stage's proposal head (the seventh) is trained with every label set to 0: its row 0
    # is the objectness logit that picks the proposals, the model reads no other row. Keeping
    # the category rows would put row 1 (person, only ever a negative there) in that place.
    proposal_head = f"class_embed.{NUM_DECODER_LAYERS}." if as_two_stage else None
    proposal_rows = None if rows is None else torch.cat((rows.new_zeros(1), rows[1:]))

    converted: dict[str, torch.Tensor] = {}  # canonical official key -> converted tensor

    def value_of(key: str) -> torch.Tensor:
        canonical = aliases[key][0] if key in aliases else key
        if canonical not in converted:
            value = state[canonical]
            if rows is not None and _CLASS_HEAD.fullmatch(canonical):
                is_proposal_head = proposal_head and canonical.startswith(proposal_head)
                value = value.index_select(0, proposal_rows if is_proposal_head else rows)
            converted[canonical] = value
        return converted[canonical]

    out: OrderedDict[str, torch.Tensor] = OrderedDict(
        (official_to_detrex_name(key, levels), value_of(key)) for key in state
    )

    notes = [f"official {chosen.title} checkpoint ({chosen.name}): {len(out)} tensors renamed"]
    class_keys = [k for k in state if _CLASS_HEAD.fullmatch(k)]
    if rows is not None:
        notes.append(
            f"class heads: kept the rows of the 80 COCO category ids (of {num_classes}) in "
            f"{len(class_keys)} tensors"
            + ("; the proposal head keeps its objectness row 0 first" if as_two_stage else "")
        )
    else:
        notes.append(f"class heads: kept all {num_classes} rows (--keep-all-classes)")
    notes.append(f"{len(aliases)} aliased head tensors checked identical to the ones they alias")
    if counters:
        notes.append(f"dropped {len(counters)} BatchNorm num_batches_tracked counters")
    if dilation is not None:
        notes.append(f"recorded training args: dilation={bool(dilation)}")
    if num_queries != DEFAULT_NUM_QUERIES and not as_two_stage:
        notes.append(f"the file has {num_queries} queries; set model.num_queries={num_queries}")
    return ConversionResult(model=out, variant=chosen, notes=notes)
