"""Hugging Face transformers' Deformable DETR <-> our (detrex) names, in both directions.

transformers is not needed: config.json is read as JSON and the weights with safetensors or
`torch.load(weights_only=True)`.

What is read (`convert_huggingface`): a model folder (config.json with `model.safetensors`,
`pytorch_model.bin`, or a sharded `*.index.json`), or one weights file plus its config.json.
Two key layouts are accepted: the one transformers 4.x writes (and that the Hub's
SenseTime/deformable-detr files carry) and the names of transformers 5.x's model object
(`backbone.model.*`, `self_attn.o_proj`, `mlp.fc1`); transformers 5.x's `save_pretrained` writes
the 4.x names. Two backbones: timm's ResNet (`use_timm_backbone`, torchvision's names; the Hub
files) and transformers' own `ResNetBackbone` (`embedder.*`, `encoder.stages.*`).

Name rules (transformers 4.x names -> ours; `key_pairs` lists every pair of a model):

- backbone `model.backbone.conv_encoder.model.*` -> `backbone.*` (timm: as torchvision's names;
  transformers' ResNet: `embedder.embedder` -> `stem.conv1`, `encoder.stages.s.layers.b.layer.j`
  -> `res{s+2}.b.conv{j+1}`, `shortcut` -> `shortcut`, `normalization` -> `norm`);
- `model.input_proj.i.{0,1}` -> `neck.convs.i.{conv,norm}` / `neck.extra_convs.j.*`;
- `model.level_embed` -> `transformer.level_embeds`, `model.query_position_embeddings` ->
  `query_embedding`; `model.{reference_points,enc_output,enc_output_norm,pos_trans,
  pos_trans_norm}` and `model.decoder.{bbox,class}_embed` -> under `transformer.`;
- encoder layer: `self_attn` -> `attentions.0`, `self_attn_layer_norm` -> `norms.0`, `fc1` /
  `fc2` -> `ffns.0.layers.0.0` / `ffns.0.layers.1`, `final_layer_norm` -> `norms.1`;
- decoder layer: `self_attn.{q,k,v}_proj` -> the three row blocks of `attentions.0.attn.in_proj_*`,
  `self_attn.out_proj` -> `attentions.0.attn.out_proj`, `self_attn_layer_norm` -> `norms.0`,
  `encoder_attn` -> `attentions.1`, `encoder_attn_layer_norm` -> `norms.1`, FFN as in the encoder,
  `final_layer_norm` -> `norms.2`; `class_embed.k` / `bbox_embed.k` keep their names.

Shared heads: transformers lists a module once per name, and a file may hold any one of the
names: without refinement all layers share `class_embed.0` / `bbox_embed.0`; with refinement
`model.decoder.bbox_embed.k` is `bbox_embed.k`; two-stage adds `model.decoder.class_embed.k` =
`class_embed.k`. transformers 5.x also builds a with-box-refine model whose class heads are one
module (`class_embed.0`), and `save_pretrained` then writes only that one; the official model (and
ours) has one class head per layer, so the missing heads get `class_embed.0`'s tensors, which is
what that model computes.

Classes: rows labelled "N/A" in `id2label` are dropped (the Hub's COCO models have 91 rows indexed
by COCO category id; the 80 others are our classes in our order); other models keep every row,
and the names go into the checkpoint's `metadata.thing_classes`. Two-stage's proposal head reads
only row 0 (objectness), which stays first.

The reverse (`export_huggingface`) writes config.json and model.safetensors in the 4.x names, with
every name of a shared head (as the Hub files do), for transformers' ResNet backbone (timm's
ResNet on request: DC5 needs it, as transformers' ResNet has no dilation).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from detrkit.checkpoint.convert.common import ConversionError, ConversionResult
from detrkit.checkpoint.convert.torchvision import resnet_layout, torchvision_to_detectron2_name

from .layout import ShapeLayout
from .variants import VARIANTS, Variant

__all__ = [
    "HFConversionResult",
    "HFSpec",
    "convert_huggingface",
    "convert_state",
    "export_checkpoint",
    "export_huggingface",
    "hf_layout",
    "key_pairs",
    "save_hf_converted",
    "spec_from_config",
    "spec_from_model",
    "to_huggingface",
]

MODEL_TYPE = "deformable_detr"
ACCEPTED_INPUT = (
    "a transformers Deformable DETR folder (config.json with model.safetensors, pytorch_model.bin "
    "or a sharded *.index.json), or a weights file with --hf-config config.json"
)
BACKBONE_PREFIX = "model.backbone.conv_encoder.model."
NA_LABEL = "N/A"

# transformers 5.x model-object names -> the 4.x names (what save_pretrained writes in both)
_V5_TO_V4 = (
    (re.compile(r"^model\.backbone\.model\."), BACKBONE_PREFIX),
    (re.compile(r"\.self_attn\.o_proj\."), ".self_attn.out_proj."),
    (re.compile(r"\.layers\.(\d+)\.mlp\.(fc[12])\."), r".layers.\1.\2."),
)
_TIMM_DEPTHS = {"resnet50": 50, "resnet101": 101}
_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_NORM_FIELDS = ("weight", "bias", "running_mean", "running_var")
# the official R50 model, which the bundled configs build
_DEFAULT_SIZES = {
    "d_model": 256,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "encoder_heads": 8,
    "decoder_heads": 8,
    "encoder_points": 4,
    "decoder_points": 4,
    "encoder_ffn": 1024,
    "decoder_ffn": 1024,
    "num_queries": 300,
    "depth": 50,
    "stem_channels": 64,
    "res2_channels": 256,
    "stride_in_1x1": False,
}


@dataclass(frozen=True)
class HFSpec:
    """A Deformable DETR's structure in both code bases' terms."""

    num_labels: int
    num_feature_levels: int = 4
    with_box_refine: bool = False
    two_stage: bool = False
    dilation: bool = False  # DC5: res5 at stride 16 (timm backbone only)
    backbone: str = "transformers"  # "timm" or "transformers" (its ResNetBackbone)
    d_model: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_heads: int = 8
    decoder_heads: int = 8
    encoder_points: int = 4
    decoder_points: int = 4
    encoder_ffn: int = 1024
    decoder_ffn: int = 1024
    num_queries: int = 300  # decoder queries (two-stage: the proposals kept)
    depth: int = 50
    stem_channels: int = 64
    res2_channels: int = 256  # output channels of res2; doubled by every later stage
    stride_in_1x1: bool = False

    @property
    def num_predictions(self) -> int:
        """Class / box head pairs: one per decoder layer, plus the proposal head in two-stage."""
        return self.decoder_layers + 1 if self.two_stage else self.decoder_layers

    @property
    def stage_channels(self) -> tuple[int, int, int, int]:
        """Output channels of res2..res5."""
        return tuple(self.res2_channels * 2**s for s in range(4))  # type: ignore[return-value]

    @property
    def backbone_levels(self) -> int:
        """Levels taken from the backbone: res5 alone for one level, else res3..res5."""
        return 1 if self.num_feature_levels == 1 else 3


@dataclass
class HFConversionResult(ConversionResult):
    """A conversion plus the class names and the config overrides the model needs."""

    thing_classes: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# reading config.json and the weights


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ConversionError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); expected {what}") from None


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        raise ConversionError(
            f"{path} is not a readable safetensors file ({reason}; {size} bytes): it may be "
            f"truncated or an unfinished download; accepted: {ACCEPTED_INPUT}"
        ) from None


def _load_torch(path: str) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(
            f"{path} is not a readable PyTorch weights file ({reason}); accepted: {ACCEPTED_INPUT}"
        ) from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConversionError(
            f"{path} does not hold a state dict of tensors; accepted: {ACCEPTED_INPUT}"
        )
    return dict(data)


def _load_weights_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".index.json"):
        index = _read_json(path, "a sharded-checkpoint index")
        weight_map = index.get("weight_map") if isinstance(index, Mapping) else None
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise ConversionError(
                f"{path} has no 'weight_map'; expected a sharded-checkpoint index"
            )
        folder = os.path.dirname(path)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_load_weights_file(os.path.join(folder, shard)))
        missing = [k for k in weight_map if k not in state]
        if missing:
            raise ConversionError(
                f"{path} lists {len(missing)} tensors its shards do not hold, first: {missing[0]}"
            )
        return state
    if not os.path.isfile(path):
        raise ConversionError(f"{path} does not exist; accepted: {ACCEPTED_INPUT}")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    return _load_torch(path)


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def locate_files(path: str, hf_config: str | None = None) -> tuple[str, str]:
    """(config.json, weights file or index) for a model folder or a weights file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        config = hf_config or os.path.join(path, "config.json")
        if not os.path.isfile(config):
            raise ConversionError(f"{path} has no config.json; accepted: {ACCEPTED_INPUT}")
        for name in _WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return config, os.path.join(path, name)
        raise ConversionError(
            f"{path} has config.json but no weights ({', '.join(_WEIGHT_FILES)}); accepted: "
            f"{ACCEPTED_INPUT}"
        )
    if not os.path.isfile(path):
        raise ConversionError(f"input {path} does not exist; accepted: {ACCEPTED_INPUT}")
    config = hf_config or os.path.join(os.path.dirname(path), "config.json")
    if not os.path.isfile(config):
        raise ConversionError(
            f"{path} is a weights file without a config.json beside it; pass --hf-config "
            "config.json (the model's transformers config)"
        )
    return config, path


# ---------------------------------------------------------------------------------------------
# config.json -> HFSpec


def _timm_backbone(name: Any, config_path: str) -> int:
    base = str(name).removeprefix("timm/").split(".")[0]
    if base not in _TIMM_DEPTHS:
        raise ConversionError(
            f"{config_path}: backbone {name!r} is not supported; accepted: timm's "
            f"{' or '.join(_TIMM_DEPTHS)}, or transformers' ResNet-50/101 (bottleneck)"
        )
    return _TIMM_DEPTHS[base]


def _expect(config_path: str, what: str, value: Any, accepted: Any) -> None:
    if value != accepted:
        raise ConversionError(
            f"{config_path}: {what}={value!r} is not supported; accepted: {accepted!r}"
        )


def _resnet_spec(backbone: Mapping, config_path: str, levels: int) -> dict[str, Any]:
    """The fields of a transformers ResNetConfig (backbone_config) that the model uses."""
    depths = tuple(backbone.get("depths", (3, 4, 6, 3)))
    layer_type = backbone.get("layer_type", "bottleneck")
    depth = {blocks: d for d, blocks in _BLOCKS.items()}.get(depths)
    if layer_type != "bottleneck" or depth is None:
        raise ConversionError(
            f"{config_path}: backbone_config is a ResNet with {layer_type} blocks {list(depths)}; "
            "accepted: ResNet-50 (bottleneck, depths [3, 4, 6, 3]) or ResNet-101 ([3, 4, 23, 3])"
        )
    hidden = list(backbone.get("hidden_sizes", (256, 512, 1024, 2048)))
    if (
        len(hidden) != 4
        or any(h != hidden[0] * 2**s for s, h in enumerate(hidden))
        or hidden[0] % 4
    ):
        raise ConversionError(
            f"{config_path}: backbone_config.hidden_sizes={hidden} is not supported; accepted: "
            "four sizes, each twice the previous, the first a multiple of 4 (e.g. [256, 512, "
            "1024, 2048])"
        )
    _expect(config_path, "backbone_config.hidden_act", backbone.get("hidden_act", "relu"), "relu")
    _expect(
        config_path,
        "backbone_config.downsample_in_first_stage",
        backbone.get("downsample_in_first_stage", False),
        False,
    )
    _expect(config_path, "backbone_config.num_channels", backbone.get("num_channels", 3), 3)
    wanted = ["stage4"] if levels == 1 else ["stage2", "stage3", "stage4"]
    out_features = backbone.get("out_features")
    if out_features is None and backbone.get("out_indices") is not None:
        out_features = [f"stage{i}" for i in backbone["out_indices"]]
    if out_features is None:
        out_features = ["stage4"]  # transformers' default for this model
    _expect(config_path, "backbone_config.out_features", list(out_features), wanted)
    return {
        "backbone": "transformers",
        "depth": depth,
        "stem_channels": int(backbone.get("embedding_size", 64)),
        "res2_channels": int(hidden[0]),
        "stride_in_1x1": bool(backbone.get("downsample_in_bottleneck", False)),
        "dilation": False,
    }


def _backbone_spec(config: Mapping, config_path: str, levels: int) -> tuple[dict, list[str]]:
    notes: list[str] = []
    backbone = config.get("backbone_config")
    wanted_indices = [4] if levels == 1 else [2, 3, 4]
    if isinstance(backbone, Mapping) and backbone.get("model_type") == "resnet":
        spec = _resnet_spec(backbone, config_path, levels)
        if config.get("dilation"):
            notes.append(
                "config.json sets dilation=true, which transformers applies only to timm "
                "backbones: its ResNet (and so this model) is not dilated"
            )
        return spec, notes
    if isinstance(backbone, Mapping) and backbone.get("model_type") == "timm_backbone":
        name = backbone.get("backbone", "resnet50")
        out_indices = backbone.get("out_indices")
        dilation = bool(config.get("dilation")) or backbone.get("output_stride") == 16
    elif backbone is None and config.get("use_timm_backbone", True):
        name = config.get("backbone") or "resnet50"
        out_indices = (config.get("backbone_kwargs") or {}).get("out_indices")
        dilation = bool(config.get("dilation"))
    elif backbone is None:  # transformers' default backbone_config: ResNet-50, stage4 only
        return _resnet_spec({}, config_path, levels), notes
    else:
        kind = backbone.get("model_type") if isinstance(backbone, Mapping) else backbone
        raise ConversionError(
            f"{config_path}: backbone_config of type {kind!r} is not supported; accepted: timm's "
            "resnet50/resnet101 or transformers' ResNet (model_type 'resnet')"
        )
    if out_indices is not None:
        _expect(config_path, "the timm backbone's out_indices", list(out_indices), wanted_indices)
    return {
        "backbone": "timm",
        "depth": _timm_backbone(name, config_path),
        "stem_channels": 64,
        "res2_channels": 256,
        "stride_in_1x1": False,
        "dilation": dilation,
    }, notes


def spec_from_config(
    config: Mapping[str, Any], config_path: str, num_labels: int
) -> tuple[HFSpec, list[str]]:
    """The structure config.json describes (`num_labels` from the weights), and notes."""
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ConversionError(
            f"{config_path} describes model_type {model_type!r}; accepted: {MODEL_TYPE!r} "
            "(transformers' DeformableDetrForObjectDetection)"
        )
    levels = int(config.get("num_feature_levels", 4))
    if levels not in (1, 4):
        raise ConversionError(
            f"{config_path}: num_feature_levels={levels} is not supported; accepted: 1 (single "
            "scale) or 4 (multi-scale), the official models' levels"
        )
    refine = bool(config.get("with_box_refine", False))
    two_stage = bool(config.get("two_stage", False))
    if two_stage and not refine:
        raise ConversionError(
            f"{config_path}: two_stage=true without with_box_refine is not supported (the "
            "proposal head is one of the refinement heads); accepted: two_stage with "
            "with_box_refine=true"
        )
    _expect(
        config_path,
        "position_embedding_type",
        config.get("position_embedding_type", "sine"),
        "sine",
    )
    _expect(config_path, "activation_function", config.get("activation_function", "relu"), "relu")
    _expect(config_path, "num_channels", config.get("num_channels", 3), 3)
    backbone, notes = _backbone_spec(config, config_path, levels)
    d_model = int(config.get("d_model", 256))
    if d_model % 32 or d_model % 2:
        raise ConversionError(
            f"{config_path}: d_model={d_model} is not supported; accepted: a multiple of 32 "
            "(the input projections use GroupNorm with 32 groups)"
        )
    queries = (
        config.get("two_stage_num_proposals", 300) if two_stage else config.get("num_queries", 300)
    )
    spec = HFSpec(
        num_labels=num_labels,
        num_feature_levels=levels,
        with_box_refine=refine,
        two_stage=two_stage,
        d_model=d_model,
        encoder_layers=int(config.get("encoder_layers", 6)),
        decoder_layers=int(config.get("decoder_layers", 6)),
        encoder_heads=int(config.get("encoder_attention_heads", 8)),
        decoder_heads=int(config.get("decoder_attention_heads", 8)),
        encoder_points=int(config.get("encoder_n_points", 4)),
        decoder_points=int(config.get("decoder_n_points", 4)),
        encoder_ffn=int(config.get("encoder_ffn_dim", 1024)),
        decoder_ffn=int(config.get("decoder_ffn_dim", 1024)),
        num_queries=int(queries),
        **backbone,
    )
    return spec, notes


def labels_from_config(config: Mapping[str, Any], config_path: str, num_labels: int) -> list[str]:
    """Class names by class index from `id2label` (string or int keys)."""
    id2label = config.get("id2label")
    if not isinstance(id2label, Mapping) or not id2label:
        return [f"LABEL_{i}" for i in range(num_labels)]
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ConversionError(f"{config_path}: id2label keys must be class indices") from None
    if sorted(labels) != list(range(num_labels)):
        raise ConversionError(
            f"{config_path}: id2label has {len(labels)} entries (indices {min(labels)}.."
            f"{max(labels)}) but the class heads have {num_labels} rows; expected indices "
            f"0..{num_labels - 1}"
        )
    return [labels[i] for i in range(num_labels)]


# ---------------------------------------------------------------------------------------------
# layouts and names


def _transformers_resnet_layout(spec: HFSpec) -> OrderedDict[str, tuple[int, ...]]:
    """`{name: shape}` of transformers' ResNetBackbone (bottleneck), as its state dict lists it."""
    shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def conv_norm(name: str, out_channels: int, in_channels: int, kernel: int) -> None:
        shapes[f"{name}.convolution.weight"] = (out_channels, in_channels, kernel, kernel)
        for part in _NORM_FIELDS:
            shapes[f"{name}.normalization.{part}"] = (out_channels,)

    conv_norm("embedder.embedder", spec.stem_channels, 3, 7)
    in_channels = spec.stem_channels
    for stage, blocks in enumerate(_BLOCKS[spec.depth]):
        out_channels = spec.stage_channels[stage]
        width = out_channels // 4
        for block in range(blocks):
            prefix = f"encoder.stages.{stage}.layers.{block}"
            if in_channels != out_channels or (block == 0 and stage > 0):
                conv_norm(f"{prefix}.shortcut", out_channels, in_channels, 1)
            conv_norm(f"{prefix}.layer.0", width, in_channels, 1)
            conv_norm(f"{prefix}.layer.1", width, width, 3)
            conv_norm(f"{prefix}.layer.2", out_channels, width, 1)
            in_channels = out_channels
    return shapes


def _backbone_layout(spec: HFSpec) -> OrderedDict[str, tuple[int, ...]]:
    if spec.backbone == "timm":
        return resnet_layout(spec.depth)  # timm's ResNet has torchvision's names and shapes
    return _transformers_resnet_layout(spec)


def hf_layout(spec: HFSpec) -> OrderedDict[str, tuple[int, ...]]:
    """`{key: shape}` of the model in transformers 4.x names, every name of a shared head
    included (as the Hub files list them)."""
    shapes = ShapeLayout()
    d = spec.d_model

    def attention_and_ffn(layer: str, attention: str, heads: int, points: int, ffn: int) -> None:
        """The part transformers' encoder and decoder layers share: a deformable attention and
        its norm, then the FFN and `final_layer_norm`."""
        shapes.deformable_attention(
            f"{layer}.{attention}", heads, spec.num_feature_levels, points, d
        )
        shapes.layer_norm(f"{layer}.{attention}_layer_norm", d)
        shapes.linear(f"{layer}.fc1", ffn, d)
        shapes.linear(f"{layer}.fc2", d, ffn)
        shapes.layer_norm(f"{layer}.final_layer_norm", d)

    shapes["model.level_embed"] = (spec.num_feature_levels, d)
    for key, shape in _backbone_layout(spec).items():
        shapes[BACKBONE_PREFIX + key] = shape
    res5 = spec.stage_channels[-1]
    in_channels = spec.stage_channels[-spec.backbone_levels :]
    for i in range(spec.num_feature_levels):
        if i < spec.backbone_levels:
            shapes[f"model.input_proj.{i}.0.weight"] = (d, in_channels[i], 1, 1)
        else:  # 3x3 stride 2 on res5 for the first extra level, then on the previous level
            source = res5 if i == spec.backbone_levels else d
            shapes[f"model.input_proj.{i}.0.weight"] = (d, source, 3, 3)
        shapes[f"model.input_proj.{i}.0.bias"] = (d,)
        shapes.layer_norm(f"model.input_proj.{i}.1", d)  # GroupNorm(32, d)
    if not spec.two_stage:
        shapes["model.query_position_embeddings.weight"] = (spec.num_queries, 2 * d)
    for i in range(spec.encoder_layers):
        layer = f"model.encoder.layers.{i}"
        attention_and_ffn(
            layer, "self_attn", spec.encoder_heads, spec.encoder_points, spec.encoder_ffn
        )
    for i in range(spec.decoder_layers):
        layer = f"model.decoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes.linear(f"{layer}.self_attn.{proj}", d, d)
        shapes.layer_norm(f"{layer}.self_attn_layer_norm", d)
        attention_and_ffn(
            layer, "encoder_attn", spec.decoder_heads, spec.decoder_points, spec.decoder_ffn
        )
    heads = spec.num_predictions
    if spec.with_box_refine:
        for k in range(heads):
            shapes.box_head(f"model.decoder.bbox_embed.{k}", d)
    if spec.two_stage:
        for k in range(heads):
            shapes.linear(f"model.decoder.class_embed.{k}", spec.num_labels, d)
        shapes.linear("model.enc_output", d, d)
        shapes.layer_norm("model.enc_output_norm", d)
        shapes.linear("model.pos_trans", 2 * d, 2 * d)
        shapes.layer_norm("model.pos_trans_norm", 2 * d)
    else:
        shapes.linear("model.reference_points", 2, d)
    for k in range(heads):
        shapes.linear(f"class_embed.{k}", spec.num_labels, d)
    for k in range(heads):
        shapes.box_head(f"bbox_embed.{k}", d)
    return shapes


_LAYER = re.compile(
    r"model\.(encoder|decoder)\.layers\.(\d+)\."
    r"(self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm|self_attn\.out_proj|"
    r"self_attn\.[qkv]_proj|self_attn|encoder_attn|fc1|fc2)\.(.+)"
)
_LAYER_PARTS = {
    "encoder": {
        "self_attn": "attentions.0",
        "self_attn_layer_norm": "norms.0",
        "fc1": "ffns.0.layers.0.0",
        "fc2": "ffns.0.layers.1",
        "final_layer_norm": "norms.1",
    },
    "decoder": {
        "self_attn.out_proj": "attentions.0.attn.out_proj",
        "self_attn_layer_norm": "norms.0",
        "encoder_attn": "attentions.1",
        "encoder_attn_layer_norm": "norms.1",
        "fc1": "ffns.0.layers.0.0",
        "fc2": "ffns.0.layers.1",
        "final_layer_norm": "norms.2",
    },
}
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
_INPUT_PROJ = re.compile(r"model\.input_proj\.(\d+)\.([01])\.(\w+)")
_RENAMED_PREFIXES = (
    ("model.level_embed", "transformer.level_embeds"),
    ("model.query_position_embeddings.", "query_embedding."),
    ("model.reference_points.", "transformer.reference_points."),
    ("model.enc_output.", "transformer.enc_output."),
    ("model.enc_output_norm.", "transformer.enc_output_norm."),
    ("model.pos_trans.", "transformer.pos_trans."),
    ("model.pos_trans_norm.", "transformer.pos_trans_norm."),
    ("model.decoder.bbox_embed.", "transformer.decoder.bbox_embed."),
    ("model.decoder.class_embed.", "transformer.decoder.class_embed."),
    ("class_embed.", "class_embed."),
    ("bbox_embed.", "bbox_embed."),
)
_HF_RESNET = re.compile(
    r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.[012])\.(convolution|normalization)\.(\w+)"
)


def _backbone_name(key: str, backbone: str) -> str | None:
    """Our ResNet name of a backbone key (relative to the backbone), None if no rule fits."""
    if backbone == "timm":
        return torchvision_to_detectron2_name(key)
    if key.startswith("embedder.embedder."):
        part, field_name = key[len("embedder.embedder.") :].split(".", 1)
        return "stem.conv1." + ("" if part == "convolution" else "norm.") + field_name
    block = _HF_RESNET.fullmatch(key)
    if block is None:
        return None
    stage, index, part, kind, field_name = block.groups()
    conv = "shortcut" if part == "shortcut" else f"conv{int(part[-1]) + 1}"
    norm = "" if kind == "convolution" else "norm."
    return f"res{int(stage) + 2}.{index}.{conv}.{norm}{field_name}"


def hf_to_ours_name(key: str, spec: HFSpec) -> tuple[str, int | None]:
    """(our name, row block of a packed q/k/v tensor or None) of a transformers 4.x key."""
    if key.startswith(BACKBONE_PREFIX):
        name = _backbone_name(key[len(BACKBONE_PREFIX) :], spec.backbone)
        if name is not None:
            return f"backbone.{name}", None
    layer = _LAYER.fullmatch(key)
    if layer:
        stack, index, part, rest = layer.groups()
        prefix = f"transformer.{stack}.layers.{index}"
        if stack == "decoder" and part in _QKV:
            return f"{prefix}.attentions.0.attn.in_proj_{rest}", _QKV[part]
        if part in _LAYER_PARTS[stack]:
            return f"{prefix}.{_LAYER_PARTS[stack][part]}.{rest}", None
    proj = _INPUT_PROJ.fullmatch(key)
    if proj:
        level, part = int(proj[1]), "conv" if proj[2] == "0" else "norm"
        if level < spec.backbone_levels:
            return f"neck.convs.{level}.{part}.{proj[3]}", None
        return f"neck.extra_convs.{level - spec.backbone_levels}.{part}.{proj[3]}", None
    for old, new in _RENAMED_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :], None
    raise KeyError(f"no rule maps the transformers key {key!r} to our names")


def key_pairs(spec: HFSpec) -> list[tuple[str, str, int | None]]:
    """(transformers 4.x key, our key, q/k/v row block) for every tensor of the model."""
    return [(key, *hf_to_ours_name(key, spec)) for key in hf_layout(spec)]


def hf_alias_groups(spec: HFSpec) -> list[list[str]]:
    """Keys (4.x names) that name one module in transformers' model, as groups."""

    def head_params(prefix: str, box: bool) -> list[str]:
        if box:
            return [f"{prefix}.layers.{j}.{p}" for j in range(3) for p in ("weight", "bias")]
        return [f"{prefix}.weight", f"{prefix}.bias"]

    heads = range(spec.num_predictions)
    groups: list[list[str]] = []
    for name, box in (("class_embed", False), ("bbox_embed", True)):
        shared = not spec.with_box_refine  # all layers share head 0
        decoder_copy = spec.two_stage if name == "class_embed" else spec.with_box_refine
        if shared:
            names = [head_params(f"{name}.{k}", box) for k in heads]
            groups.extend([list(g) for g in zip(*names)])
        elif decoder_copy:
            for k in heads:
                model_names = head_params(f"{name}.{k}", box)
                decoder_names = head_params(f"model.decoder.{name}.{k}", box)
                groups.extend([[a, b] for a, b in zip(model_names, decoder_names)])
        else:  # refinement without two-stage: one class head per layer
            for k in heads:
                groups.extend([[p] for p in head_params(f"{name}.{k}", box)])
    return groups


def _to_v4_names(state: Mapping[str, torch.Tensor]) -> tuple[OrderedDict, bool]:
    """The state dict with transformers 4.x names; True if any 5.x name was renamed."""
    renamed = False
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        new = key
        for pattern, replacement in _V5_TO_V4:
            new = pattern.sub(replacement, new)
        renamed |= new != key
        out[new] = value
    return out, renamed


# ---------------------------------------------------------------------------------------------
# transformers -> ours


def _class_rows(labels: list[str]) -> list[int] | None:
    """Rows to keep: the ones not labelled "N/A" (None: all of them)."""
    if NA_LABEL not in labels:
        return None
    return [i for i, name in enumerate(labels) if name != NA_LABEL]


def _overrides(spec: HFSpec, variant: Variant, num_classes: int) -> list[str]:
    """Config overrides that turn `variant`'s bundled config into this model."""
    out: list[str] = []
    sizes = {name: getattr(spec, name) for name in _DEFAULT_SIZES}
    changed = {k: v for k, v in sizes.items() if v != _DEFAULT_SIZES[k]}
    if num_classes != 80:
        out.append(f"model.num_classes={num_classes}")
    if "num_queries" in changed:
        out.append(f"model.num_queries={spec.num_queries}")
    if "d_model" in changed:
        d = spec.d_model
        out += [
            f"model.embed_dim={d}",
            f"model.transformer.encoder.embed_dim={d}",
            f"model.transformer.decoder.embed_dim={d}",
            f"model.position_embedding.num_pos_feats={d // 2}",
            f"model.neck.out_channels={d}",
            f"model.neck.norm_layer.num_channels={d}",
        ]
    for stack in ("encoder", "decoder"):
        node = f"model.transformer.{stack}"
        for ours, name in (
            ("num_layers", f"{stack}_layers"),
            ("num_heads", f"{stack}_heads"),
            ("feedforward_dim", f"{stack}_ffn"),
        ):
            if name in changed:
                out.append(f"{node}.{ours}={sizes[name]}")
        if f"{stack}_points" in changed:
            out.append(f"++{node}.num_points={sizes[f'{stack}_points']}")
    if "depth" in changed:
        out.append(f"model.backbone.stages.depth={spec.depth}")
    if "stride_in_1x1" in changed:
        out.append("model.backbone.stages.stride_in_1x1=True")
    if "stem_channels" in changed:
        out += [
            f"model.backbone.stem.out_channels={spec.stem_channels}",
            f"++model.backbone.stages.stem_out_channels={spec.stem_channels}",
        ]
    if "res2_channels" in changed:
        out += [
            f"++model.backbone.stages.res2_out_channels={spec.res2_channels}",
            f"++model.backbone.stages.width_per_group={spec.res2_channels // 4}",
        ]
        names = ["res5"] if spec.num_feature_levels == 1 else ["res3", "res4", "res5"]
        channels = spec.stage_channels[-len(names) :]
        out += [f"model.neck.input_shapes.{n}.channels={c}" for n, c in zip(names, channels)]
    if spec.dilation and not variant.dilated_res5:
        out.append("++model.backbone.stages.res5_dilation=2")
    return out


def _choose_variant(spec: HFSpec) -> Variant:
    structure = (spec.num_feature_levels, spec.with_box_refine, spec.two_stage)
    for variant in VARIANTS.values():
        # multi-scale with a dilated res5 is the multi-scale config plus res5_dilation=2
        dilation_fits = variant.dilated_res5 == spec.dilation or variant.num_feature_levels > 1
        if variant.structure == structure and dilation_fits:
            return variant
    raise AssertionError(f"no bundled variant for {spec}")  # spec_from_config refused it


def _check_state(path: str, state: Mapping, spec: HFSpec) -> list[str]:
    """Unknown keys, shapes and shared heads; fills missing names of shared heads in `state`
    (in place). Returns notes."""
    layout = hf_layout(spec)
    unknown = [k for k in state if k not in layout]
    if unknown:
        other = "timm" if spec.backbone == "transformers" else "transformers"
        hint = ""
        if any(k.startswith(BACKBONE_PREFIX) for k in unknown):
            hint = f" (a {other} backbone? config.json describes {spec.backbone}'s ResNet)"
        raise ConversionError(
            f"{path} does not match its config.json: {len(unknown)} unknown keys{hint}, first: "
            f"{', '.join(unknown[:3])}"
        )
    notes: list[str] = []
    filled = 0
    for group in hf_alias_groups(spec):
        present = [k for k in group if k in state]
        if not present:
            head_zero = re.sub(r"^class_embed\.\d+\.", "class_embed.0.", group[0])
            if spec.with_box_refine and not spec.two_stage and head_zero in state:
                # transformers 5.x ties these class heads to class_embed.0
                for key in group:
                    state[key] = state[head_zero]
                filled += len(group)
                continue
            continue  # reported as missing below
        for key in present[1:]:
            if not torch.equal(state[key], state[present[0]]):
                raise ConversionError(
                    f"{path} contradicts itself: {key} and {present[0]} differ, but the model "
                    "computes with one module under both names"
                )
        for key in group:
            if key not in state:
                state[key] = state[present[0]]
                filled += 1
    missing = [k for k in layout if k not in state]
    if missing:
        raise ConversionError(
            f"{path} does not match its config.json: {len(missing)} keys are missing, first: "
            f"{', '.join(missing[:3])}"
        )
    wrong = [
        f"{k} is {tuple(state[k].shape)}, expected {shape}"
        for k, shape in layout.items()
        if tuple(state[k].shape) != shape
    ]
    if wrong:
        raise ConversionError(
            f"{path} does not match its config.json: {len(wrong)} tensors have other shapes, "
            f"first: {'; '.join(wrong[:2])}"
        )
    if filled:
        notes.append(f"{filled} tensors of shared heads taken from the name the file holds")
    return notes


def convert_huggingface(path: str, hf_config: str | None = None) -> HFConversionResult:
    """Read a transformers Deformable DETR (folder or weights file) and convert it to our names."""
    config_path, weights_path = locate_files(path, hf_config)
    config = _read_json(config_path, "a transformers config.json")
    if not isinstance(config, Mapping):
        raise ConversionError(f"{config_path} is not a JSON object; expected a transformers config")
    if config.get("model_type") != MODEL_TYPE:  # before reading weights that may not be ours
        raise ConversionError(
            f"{config_path} describes model_type {config.get('model_type')!r}; accepted: "
            f"{MODEL_TYPE!r} (transformers' DeformableDetrForObjectDetection)"
        )
    return convert_state(_load_weights_file(weights_path), config, config_path, weights_path)


def convert_state(
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    config_path: str = "config.json",
    weights_path: str = "the weights",
) -> HFConversionResult:
    """Convert a transformers state dict described by `config` (config.json's contents)."""
    state = OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    state, renamed = _to_v4_names(state)
    heads = state.get("class_embed.0.weight", state.get("model.decoder.class_embed.0.weight"))
    if heads is None or heads.dim() != 2:
        raise ConversionError(
            f"{weights_path} has no class_embed.0.weight; expected the weights of a transformers "
            "DeformableDetrForObjectDetection"
        )
    num_labels = int(heads.shape[0])
    spec, notes = spec_from_config(config, config_path, num_labels)
    labels = labels_from_config(config, config_path, num_labels)
    notes += _check_state(weights_path, state, spec)

    rows = _class_rows(labels)
    if rows is not None and not rows:
        raise ConversionError(f"{config_path}: every id2label entry is 'N/A'; no class is left")
    names = labels if rows is None else [labels[i] for i in rows]
    keep = None if rows is None else torch.tensor(rows)
    proposal_keep = None if keep is None else torch.cat((keep.new_zeros(1), keep[1:]))
    proposal_heads = (
        f"class_embed.{spec.decoder_layers}.",
        f"model.decoder.class_embed.{spec.decoder_layers}.",
    )

    by_ours: dict[str, list[tuple[str, int | None]]] = {}
    for hf_key, ours, block in key_pairs(spec):
        by_ours.setdefault(ours, []).append((hf_key, block))
    converted: dict[int, torch.Tensor] = {}  # one output tensor per input tensor (shared heads)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for ours, sources in by_ours.items():
        if sources[0][1] is not None:  # q, k, v stacked in that order
            parts = sorted(sources, key=lambda s: s[1])
            out[ours] = torch.cat([state[k] for k, _ in parts])
            continue
        (hf_key,) = [k for k, _ in sources]
        value = state[hf_key]
        if id(value) not in converted:
            if keep is not None and re.fullmatch(
                r"(model\.decoder\.)?class_embed\.\d+\.\w+", hf_key
            ):
                value = value.index_select(
                    0, proposal_keep if hf_key.startswith(proposal_heads) else keep
                )
            converted[id(state[hf_key])] = value
        out[ours] = converted[id(state[hf_key])]

    variant = _choose_variant(spec)
    overrides = _overrides(spec, variant, len(names))
    layout_name = "transformers 5.x model names" if renamed else "transformers 4.x names"
    notes.insert(
        0,
        f"transformers Deformable DETR ({layout_name}, {spec.backbone} ResNet-{spec.depth}) -> "
        f"{variant.title} ({variant.name}): {len(out)} tensors",
    )
    if rows is not None:
        notes.append(
            f"class heads: kept the {len(rows)} rows not labelled N/A (of {num_labels})"
            + ("; the proposal head keeps its objectness row 0 first" if spec.two_stage else "")
        )
    else:
        notes.append(f"class heads: all {num_labels} classes kept with their id2label names")
    if overrides:
        notes.append("build it with the overrides: " + " ".join(overrides))
    return HFConversionResult(
        model=out, variant=variant, notes=notes, thing_classes=names, overrides=overrides
    )


def save_hf_converted(result: HFConversionResult, output: str) -> None:
    """Write `{"model": state_dict, "metadata": {"thing_classes": [...]}}` (torch file), or a
    .safetensors file with the class names as JSON in its header metadata."""
    output = os.fspath(output)
    tmp = f"{output}.tmp{os.getpid()}"
    try:
        if output.endswith(".safetensors"):
            from safetensors.torch import save_file

            tensors = {k: v.detach().contiguous().clone() for k, v in result.model.items()}
            save_file(tensors, tmp, metadata={"thing_classes": json.dumps(result.thing_classes)})
        else:
            payload = {"model": result.model, "metadata": {"thing_classes": result.thing_classes}}
            torch.save(payload, tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------
# ours -> transformers


def spec_from_model(model: torch.nn.Module, backbone: str = "transformers") -> HFSpec:
    """The structure of one of our DeformableDETR models (built on any device, meta included);
    ConversionError for what transformers' model cannot express."""
    from detrkit.layers import PositionEmbeddingSine
    from detrkit.modeling import ChannelMapper, ResNet

    def refuse(what: str) -> None:
        raise ConversionError(f"--to huggingface: {what}")

    transformer = model.transformer
    encoder, decoder = transformer.encoder, transformer.decoder
    resnet, neck, pos = model.backbone, model.neck, model.position_embedding
    if not isinstance(resnet, ResNet):
        refuse(f"the backbone is a {type(resnet).__name__}; accepted: detrkit's ResNet-50/101")
    blocks = tuple(len(getattr(resnet, name)) for name in resnet.stage_names)
    depth = {b: d for d, b in _BLOCKS.items()}.get(blocks)
    if depth is None or not hasattr(resnet.res2[0], "conv3"):
        refuse(f"the backbone has blocks {list(blocks)}; accepted: ResNet-50 or -101 (bottleneck)")
    levels = transformer.num_feature_levels
    wanted = ["res5"] if levels == 1 else ["res3", "res4", "res5"]
    if not isinstance(neck, ChannelMapper) or neck.in_features != wanted or levels not in (1, 4):
        refuse(
            f"the model uses {levels} levels from {getattr(neck, 'in_features', '?')}; accepted: "
            "res5 for 1 level, res3..res5 for 4 (the official layouts)"
        )
    expected_pos = (model.embed_dim // 2, 10000, True, -0.5, 2 * math.pi)
    if (
        not isinstance(pos, PositionEmbeddingSine)
        or (pos.num_pos_feats, pos.temperature, pos.normalize, pos.offset, pos.scale)
        != expected_pos
    ):
        refuse("the position embedding is not Deformable DETR's normalized sine (offset -0.5)")
    dilated = resnet.res5[-1].conv2.dilation[0] == 2
    if dilated and backbone != "timm":
        refuse(
            "the model has a dilated res5 (DC5), which transformers' ResNet cannot express; "
            "write it with --hf-backbone timm"
        )
    stem = resnet.stem.conv1.weight.shape[0]
    res2 = resnet.res2[0].conv3.weight.shape[0]
    stride_in_1x1 = resnet.res3[0].conv1.stride[0] == 2
    if backbone == "timm" and (stem, res2, stride_in_1x1) != (64, 256, False):
        refuse("timm's resnet50/101 has the standard widths; this backbone has others")
    enc_attn = encoder.layers[0].attentions[0]
    dec_attn = decoder.layers[0].attentions[1]
    return HFSpec(
        num_labels=model.num_classes,
        num_feature_levels=levels,
        with_box_refine=model.with_box_refine,
        two_stage=model.as_two_stage,
        dilation=dilated,
        backbone=backbone,
        d_model=model.embed_dim,
        encoder_layers=encoder.num_layers,
        decoder_layers=decoder.num_layers,
        encoder_heads=enc_attn.num_heads,
        decoder_heads=dec_attn.num_heads,
        encoder_points=enc_attn.num_points,
        decoder_points=dec_attn.num_points,
        encoder_ffn=encoder.layers[0].ffns[0].layers[0][0].out_features,
        decoder_ffn=decoder.layers[0].ffns[0].layers[0][0].out_features,
        num_queries=transformer.two_stage_num_proposals
        if model.as_two_stage
        else model.num_queries,
        depth=depth,
        stem_channels=stem,
        res2_channels=res2,
        stride_in_1x1=stride_in_1x1,
    )


def hf_config(spec: HFSpec, thing_classes: Sequence[str]) -> dict[str, Any]:
    """config.json for transformers' DeformableDetrForObjectDetection."""
    config: dict[str, Any] = {
        "architectures": ["DeformableDetrForObjectDetection"],
        "model_type": MODEL_TYPE,
        "d_model": spec.d_model,
        "encoder_layers": spec.encoder_layers,
        "decoder_layers": spec.decoder_layers,
        "encoder_attention_heads": spec.encoder_heads,
        "decoder_attention_heads": spec.decoder_heads,
        "encoder_n_points": spec.encoder_points,
        "decoder_n_points": spec.decoder_points,
        "encoder_ffn_dim": spec.encoder_ffn,
        "decoder_ffn_dim": spec.decoder_ffn,
        "num_queries": spec.num_queries,
        "two_stage_num_proposals": spec.num_queries,
        "num_feature_levels": spec.num_feature_levels,
        "with_box_refine": spec.with_box_refine,
        "two_stage": spec.two_stage,
        "dilation": spec.dilation,
        "position_embedding_type": "sine",
        "activation_function": "relu",
        "id2label": {str(i): name for i, name in enumerate(thing_classes)},
        "label2id": {name: i for i, name in enumerate(thing_classes)},
    }
    if spec.backbone == "timm":
        config.update(
            use_timm_backbone=True,
            backbone=f"resnet{spec.depth}",
            backbone_config=None,
            use_pretrained_backbone=False,
        )
    else:
        stages = ["stage4"] if spec.num_feature_levels == 1 else ["stage2", "stage3", "stage4"]
        config.update(
            use_timm_backbone=False,
            backbone=None,
            use_pretrained_backbone=False,
            backbone_config={
                "model_type": "resnet",
                "num_channels": 3,
                "embedding_size": spec.stem_channels,
                "hidden_sizes": list(spec.stage_channels),
                "depths": list(_BLOCKS[spec.depth]),
                "layer_type": "bottleneck",
                "hidden_act": "relu",
                "downsample_in_first_stage": False,
                "downsample_in_bottleneck": spec.stride_in_1x1,
                "out_features": stages,
            },
        )
    return config


def to_huggingface(
    state: Mapping[str, torch.Tensor], spec: HFSpec
) -> OrderedDict[str, torch.Tensor]:
    """Our state dict -> transformers 4.x names (every name of a shared head, own storage).
    A model trained with hybrid matching keeps its training-only one-to-many queries after the
    first `num_queries` rows of `query_embedding`; only those first rows predict, so only they
    are written."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for hf_key, ours, block in key_pairs(spec):
        value = state[ours]
        if block is not None:
            value = value.chunk(3)[block]
        if ours == "query_embedding.weight":
            value = value[: spec.num_queries]
        out[hf_key] = value.detach().contiguous().clone()
    return out


def _read_ours(path: str) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """Our checkpoint's state dict and its metadata.thing_classes (None if absent)."""
    if not os.path.isfile(path):
        raise ConversionError(f"input {path} does not exist; expected a detrkit checkpoint")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        state = _load_safetensors(path)
        with safe_open(path, "pt") as f:
            stored = (f.metadata() or {}).get("thing_classes")
        classes = json.loads(stored) if stored else None
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            raise ConversionError(f"{path} is not a readable checkpoint ({e})") from None
        if not isinstance(data, Mapping):
            raise ConversionError(
                f"{path} holds a {type(data).__name__}; expected a checkpoint dict"
            )
        state = data.get("model", data)
        metadata = data.get("metadata")
        classes = metadata.get("thing_classes") if isinstance(metadata, Mapping) else None
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, (list(classes) if classes else None)


def export_huggingface(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    output_dir: str,
    thing_classes: Sequence[str] | None = None,
    backbone: str = "transformers",
    source: str = "the checkpoint",
) -> list[str]:
    """Write config.json and model.safetensors for `state`, our weights of `model`'s structure
    (any device: only its structure is read). Returns notes."""
    from safetensors.torch import save_file

    spec = spec_from_model(model, backbone)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in expected]
    if missing or unknown:
        raise ConversionError(
            f"{source} does not fit the config's model: {len(missing)} keys missing (first: "
            f"{', '.join(missing[:2]) or '-'}), {len(unknown)} unknown (first: "
            f"{', '.join(unknown[:2]) or '-'})"
        )
    wrong = [k for k, shape in expected.items() if tuple(state[k].shape) != shape]
    if wrong:
        raise ConversionError(
            f"{source} does not fit the config's model: {wrong[0]} is "
            f"{tuple(state[wrong[0]].shape)}, the config builds {expected[wrong[0]]}"
        )
    notes = []
    if thing_classes is None:
        if spec.num_labels == 80:
            from detrkit.data.builtin_meta import COCO_THING_CLASSES

            thing_classes = list(COCO_THING_CLASSES)
            notes.append("class names: COCO's 80 (the checkpoint records none)")
        else:
            thing_classes = [f"LABEL_{i}" for i in range(spec.num_labels)]
            notes.append("class names: LABEL_i (the checkpoint records none)")
    if len(thing_classes) != spec.num_labels:
        raise ConversionError(
            f"{source} names {len(thing_classes)} classes but the model has {spec.num_labels}"
        )
    tensors = to_huggingface(state, spec)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config(spec, thing_classes), f, indent=2)
        f.write("\n")
    save_file(tensors, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
    notes.insert(
        0,
        f"wrote {len(tensors)} tensors ({spec.backbone}'s ResNet-{spec.depth}) "
        f"and config.json to {output_dir}",
    )
    return notes


def export_checkpoint(
    checkpoint: str,
    config_file: str,
    output_dir: str,
    overrides: Sequence[str] = (),
    backbone: str = "transformers",
) -> list[str]:
    """`export_huggingface` for a checkpoint file and the config file that trained it."""
    from detrkit.config import ConfigError, InstantiationError, LazyConfig, instantiate

    try:
        cfg = LazyConfig.load(config_file)
        cfg = LazyConfig.apply_overrides(cfg, list(overrides))
        with torch.device("meta"):  # only the structure is needed
            model = instantiate(cfg.model)
    except (ConfigError, InstantiationError) as e:
        raise ConversionError(f"--config-file {config_file}: {e}") from None
    state, classes = _read_ours(checkpoint)
    return export_huggingface(model, state, output_dir, classes, backbone, source=checkpoint)
