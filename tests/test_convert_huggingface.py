"""Hugging Face transformers <-> our Deformable DETR, with transformers itself as the oracle.

transformers' DeformableDetrForObjectDetection (an implementation written by other people, a
test dependency) is built at a tiny size with its own ResNet backbone, its weights perturbed so
every tensor matters, saved with `save_pretrained`, converted, and run beside our model on the
same image: raw outputs agree to 1e-5 and the top-100 detections match. This is also the suite's
whole-model oracle. The Hub's timm layouts are checked key by key from the fixture
`hf_checkpoint_keys.json` (synthetic tensors; nothing is downloaded).

Where transformers' computation differs from the official model's (and ours), the test shows it:
- transformers' post-processing does not clip boxes to the image; ours (detectron2-style) does;
- the Hub's 91 labels include 11 "N/A" category ids (and 0) that a trained model never scores:
  the converter drops them, so the tiny COCO models here give those rows a -1e4 bias as training
  does (the proposal head, whose row 0 is objectness, is left alone);
- transformers' own ResNet has no dilation: `dilation=true` changes nothing there (DC5 exists only
  with timm, which is not installable here), so DC5 is checked by keys and values only;
- transformers 5.x builds a with-box-refine model with one class head shared by all layers
  (official and ours: one per layer); a file saved that way has only `class_embed.0`.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from detrkit.checkpoint.convert.common import ConversionError
from detrkit.config import LazyConfig, instantiate
from detrkit.data.builtin_meta import COCO_CATEGORY_IDS, COCO_THING_CLASSES
from projects.deformable_detr.convert.huggingface import (
    convert_huggingface,
    convert_state,
    export_huggingface,
    spec_from_model,
    to_huggingface,
)
from projects.deformable_detr.convert.variants import VARIANTS

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    ResNetConfig,
)
from transformers.models.deformable_detr.image_processing_pil_deformable_detr import (  # noqa: E402
    DeformableDetrImageProcessorPil,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = "hf_checkpoint_keys.json"
COCO_ID2LABEL = {i: "N/A" for i in range(91)} | dict(zip(COCO_CATEGORY_IDS, COCO_THING_CLASSES))
OWN_LABELS = {i: f"part-{i}" for i in range(7)}  # a fine-tuned model's own classes
# (levels, refine, two-stage) of the variants transformers' ResNet can express
FLAGS = {
    "single_scale": (1, False, False),
    "deformable_detr": (4, False, False),
    "refine": (4, True, False),
    "two_stage": (4, True, True),
}
TINY_HF = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    num_queries=16,
    two_stage_num_proposals=16,
)
TINY_RESNET = dict(
    embedding_size=16,
    hidden_sizes=[64, 128, 256, 512],
    depths=[3, 4, 6, 3],
    layer_type="bottleneck",
)
# the same tiny model in our config's terms (written independently of the converter's overrides)
TINY_OURS = [
    "model.num_queries=16",
    "model.embed_dim=32",
    "model.transformer.encoder.embed_dim=32",
    "model.transformer.decoder.embed_dim=32",
    "model.position_embedding.num_pos_feats=16",
    "model.neck.out_channels=32",
    "model.neck.norm_layer.num_channels=32",
    "model.transformer.encoder.num_layers=1",
    "model.transformer.encoder.num_heads=2",
    "model.transformer.encoder.feedforward_dim=64",
    "model.transformer.decoder.num_layers=2",
    "model.transformer.decoder.num_heads=2",
    "model.transformer.decoder.feedforward_dim=64",
    "model.backbone.stem.out_channels=16",
    "++model.backbone.stages.stem_out_channels=16",
    "++model.backbone.stages.res2_out_channels=64",
    "++model.backbone.stages.width_per_group=16",
]
PIXEL_MEAN = torch.tensor([123.675, 116.280, 103.530]).view(-1, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.120, 57.375]).view(-1, 1, 1)


# ---------------------------------------------------------------------------------------------
# helpers


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Noise on every parameter and buffer (zero-initialised biases and identity norms too);
    positive running variances. Shared tensors are perturbed once."""
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) in seen or not tensor.is_floating_point():
                continue
            seen.add(id(tensor))
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise.abs())
            else:
                tensor.add_(0.05 * noise)


def build_hf(variant: str, labels: dict[int, str], seed: int, **extra) -> torch.nn.Module:
    levels, refine, two_stage = FLAGS[variant]
    stages = ["stage4"] if levels == 1 else ["stage2", "stage3", "stage4"]
    config = DeformableDetrConfig(
        use_timm_backbone=False,
        backbone_config=ResNetConfig(**TINY_RESNET, out_features=stages),
        num_feature_levels=levels,
        with_box_refine=refine,
        two_stage=two_stage,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        **TINY_HF,
        **extra,
    )
    torch.manual_seed(seed)
    model = DeformableDetrForObjectDetection(config).eval()
    perturb_(model, seed)
    na_rows = [i for i, name in labels.items() if name == "N/A"]
    with torch.no_grad():  # a trained COCO model never scores the N/A rows
        for head in model.class_embed[: config.decoder_layers]:
            head.bias[na_rows] = -1e4
    return model


def build_ours(repo_root, variant: str, overrides=(), device=None) -> torch.nn.Module:
    cfg = LazyConfig.load(str(repo_root / VARIANTS[variant].config))
    cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    if device is None:
        model = instantiate(cfg.model)
    else:
        with torch.device(device):
            model = instantiate(cfg.model)
    # the oracle compares the computation to 1e-5: the plain path (unfused FrozenBN, no oneDNN
    # fusions) rounds as transformers' does (the fast path is tested against the plain one in
    # test_deformable_detr_fast_path.py)
    return model.set_fast_inference(False).eval()


def random_image(seed: int, height: int = 96, width: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def normalized(image: torch.Tensor) -> torch.Tensor:
    return ((image.float() - PIXEL_MEAN) / PIXEL_STD)[None]


@torch.no_grad()
def ours_raw(model, image) -> dict:
    images = model.preprocess_image([{"image": image}])
    return model.predict(*model._features_and_masks(images))


def assert_same_detections(ours_instances, hf_result, class_ids, height, width) -> None:
    """Top-100 detections: scores within 1e-4, same classes (ours mapped to the HF label ids
    `class_ids`), boxes within 1e-2 px after clipping HF's to the image as ours are."""
    scores = ours_instances.scores[:100]
    labels = torch.as_tensor(class_ids)[ours_instances.pred_classes[:100]]
    boxes = ours_instances.pred_boxes.tensor[:100]
    hf_boxes = hf_result["boxes"].clone()
    hf_boxes[:, 0::2] = hf_boxes[:, 0::2].clamp(0, width)  # transformers does not clip
    hf_boxes[:, 1::2] = hf_boxes[:, 1::2].clamp(0, height)
    assert len(scores) == len(hf_result["scores"]) == 100
    torch.testing.assert_close(scores, hf_result["scores"], atol=1e-4, rtol=0)
    assert labels.tolist() == hf_result["labels"].tolist()
    torch.testing.assert_close(boxes, hf_boxes, atol=1e-2, rtol=0)


def compare_with_transformers(hf_model, ours, image, class_ids) -> None:
    """Raw outputs to 1e-5 (class logits at `class_ids`), then the top-100 detections."""
    with torch.no_grad():
        hf_out = hf_model(pixel_values=normalized(image))
    raw = ours_raw(ours, image)
    torch.testing.assert_close(raw["pred_logits"], hf_out.logits[..., class_ids], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw["pred_boxes"], hf_out.pred_boxes, atol=1e-5, rtol=0)
    height, width = image.shape[1:]
    hf_result = DeformableDetrImageProcessorPil().post_process_object_detection(
        hf_out, threshold=0.0, target_sizes=[(height, width)], top_k=100
    )[0]
    with torch.no_grad():
        (result,) = ours([{"image": image}])
    assert_same_detections(result["instances"], hf_result, class_ids, height, width)


# ---------------------------------------------------------------------------------------------
# transformers -> ours: the oracle


@pytest.mark.parametrize("variant", list(FLAGS))
def test_transformers_model_converts_and_predicts_the_same(repo_root, tmp_path, variant):
    labels = COCO_ID2LABEL if variant in ("single_scale", "two_stage") else OWN_LABELS
    hf_model = build_hf(variant, labels, seed=len(variant))
    hf_model.save_pretrained(tmp_path)

    result = convert_huggingface(str(tmp_path))

    assert result.variant.name == variant
    kept = [i for i, name in labels.items() if name != "N/A"]
    assert result.thing_classes == [labels[i] for i in kept]
    if labels is COCO_ID2LABEL:
        assert kept == COCO_CATEGORY_IDS and result.thing_classes == COCO_THING_CLASSES
    classes = [] if len(kept) == 80 else [f"model.num_classes={len(kept)}"]
    overrides = [*TINY_OURS, *classes, *neck_channels(variant)]
    assert sorted(result.overrides) == sorted(overrides)
    ours = build_ours(repo_root, variant, overrides)
    ours.load_state_dict(result.model, strict=True)
    compare_with_transformers(hf_model, ours, random_image(7), kept)


def neck_channels(variant: str) -> list[str]:
    if FLAGS[variant][0] == 1:
        return ["model.neck.input_shapes.res5.channels=512"]
    return [
        f"model.neck.input_shapes.res{s}.channels={c}" for s, c in ((3, 128), (4, 256), (5, 512))
    ]


def test_refine_keeps_one_class_head_per_layer(repo_root, tmp_path):
    """transformers 5.x builds (and saves) a with-box-refine model with one class head; the Hub
    files and the official model have one per layer. Both kinds of file convert: the missing
    heads are head 0 (what that model computes), distinct heads stay distinct."""
    hf_model = build_hf("refine", OWN_LABELS, seed=3)
    assert hf_model.class_embed[1].weight is hf_model.class_embed[0].weight  # 5.x ties them
    hf_model.save_pretrained(tmp_path / "tied")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "tied" / "model.safetensors")
    assert "class_embed.1.weight" not in state
    tied = convert_huggingface(str(tmp_path / "tied"))
    assert torch.equal(tied.model["class_embed.1.weight"], state["class_embed.0.weight"])

    # a Hub-style file: its own class head for layer 1
    state["class_embed.1.weight"] = torch.randn(7, 32)
    state["class_embed.1.bias"] = torch.randn(7)
    (tmp_path / "hub").mkdir()
    save_file(state, tmp_path / "hub" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "hub" / "config.json").write_text((tmp_path / "tied" / "config.json").read_text())
    hub_model = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "hub").eval()
    assert torch.equal(hub_model.class_embed[1].weight, state["class_embed.1.weight"])

    result = convert_huggingface(str(tmp_path / "hub"))
    assert torch.equal(result.model["class_embed.1.weight"], state["class_embed.1.weight"])
    ours = build_ours(repo_root, "refine", result.overrides)
    ours.load_state_dict(result.model, strict=True)
    compare_with_transformers(hub_model, ours, random_image(11), list(range(7)))


def test_dilation_does_nothing_with_transformers_resnet(repo_root, tmp_path):
    """transformers applies `dilation` (DC5) only to timm backbones: with its own ResNet the
    model is single scale, and the converter says so instead of picking DC5."""
    hf_model = build_hf("single_scale", OWN_LABELS, seed=5, dilation=True)
    assert hf_model.model.backbone.model.encoder.stages[3].layers[1].layer[
        1
    ].convolution.dilation == (
        1,
        1,
    )
    hf_model.save_pretrained(tmp_path)
    result = convert_huggingface(str(tmp_path))
    assert result.variant.name == "single_scale"
    assert any("dilation=true" in note for note in result.notes)
    ours = build_ours(repo_root, "single_scale", result.overrides)
    ours.load_state_dict(result.model, strict=True)
    compare_with_transformers(hf_model, ours, random_image(5), list(range(7)))


# ---------------------------------------------------------------------------------------------
# ours -> transformers -> ours


@pytest.mark.parametrize("variant", list(FLAGS))
def test_ours_to_transformers_and_back(repo_root, tmp_path, variant):
    overrides = [*TINY_OURS, "model.num_classes=7", *neck_channels(variant)]
    ours = build_ours(repo_root, variant, overrides)
    perturb_(ours, seed=20 + len(variant))
    names = [f"thing-{i}" for i in range(7)]
    export_huggingface(ours, ours.state_dict(), str(tmp_path), names)

    hf_model, info = DeformableDetrForObjectDetection.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert hf_model.config.id2label == dict(enumerate(names))
    compare_with_transformers(hf_model.eval(), ours, random_image(13), list(range(7)))

    back = convert_huggingface(str(tmp_path))
    assert back.thing_classes == names
    state = ours.state_dict()
    assert list(back.model) == list(state) or set(back.model) == set(state)
    for key, value in state.items():
        assert torch.equal(back.model[key], value), key


def test_hybrid_matching_model_writes_its_one_to_one_queries(repo_root, tmp_path):
    """A model trained with hybrid matching predicts with its first num_queries queries; the
    transformers model written from it (those rows only) predicts the same."""
    overrides = [
        *TINY_OURS,
        "model.num_classes=7",
        "model.num_queries_one2many=9",
        *neck_channels("refine"),
    ]
    ours = build_ours(repo_root, "refine", overrides)
    perturb_(ours, seed=31)
    num_queries = ours.num_queries
    assert ours.query_embedding.weight.shape[0] == num_queries + 9
    export_huggingface(ours, ours.state_dict(), str(tmp_path), [f"c{i}" for i in range(7)])

    hf_model = DeformableDetrForObjectDetection.from_pretrained(tmp_path).eval()
    assert torch.equal(
        hf_model.model.query_position_embeddings.weight,
        ours.query_embedding.weight[:num_queries],
    )
    compare_with_transformers(hf_model, ours, random_image(17), list(range(7)))


def test_dc5_writes_a_timm_model_and_reads_it_back(repo_root, tmp_path):
    """DC5 needs timm's dilated ResNet (transformers' has none): written with
    `--hf-backbone timm`, refused without it."""
    ours = build_ours(repo_root, "single_scale_dc5", device="meta")
    tensors: dict[int, torch.Tensor] = {}  # shared modules keep one tensor
    state = {
        k: tensors.setdefault(id(v), torch.randn(v.shape))
        for k, v in ours.state_dict(keep_vars=True).items()
    }
    with pytest.raises(ConversionError, match="hf-backbone timm"):
        export_huggingface(ours, state, str(tmp_path / "refused"))
    export_huggingface(ours, state, str(tmp_path), backbone="timm")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["use_timm_backbone"] and config["dilation"] and config["backbone"] == "resnet50"
    back = convert_huggingface(str(tmp_path))
    assert back.variant.name == "single_scale_dc5" and not back.overrides
    for key, value in state.items():
        assert torch.equal(back.model[key], value), key


# ---------------------------------------------------------------------------------------------
# the Hub's timm layouts (fixture keys, synthetic tensors)


def fixture_keys(fixtures_dir, layout: str, variant: str) -> tuple[dict, dict]:
    """(config fields, {key: shape}) of a Hub variant, expanded from the compact fixture."""
    data = json.loads((fixtures_dir / FIXTURE).read_text())
    entry = data["layouts"][layout]
    spec = entry["variants"][variant]
    keys = {entry["backbone_prefix"] + k: s for k, s in data["backbone"].items()}
    for stack in ("encoder", "decoder"):
        for i in range(spec["num_layers"]):
            for k, s in spec[f"{stack}_layer"].items():
                keys[f"model.{stack}.layers.{i}.{k}"] = s
    keys.update(spec["other"])
    return spec["config"], keys


def hub_config(fields: dict, layout: str) -> dict:
    """config.json of a Hub model: v4 names timm through `backbone`; 5.x through backbone_config."""
    config = {"model_type": "deformable_detr", **fields, "id2label": COCO_ID2LABEL}
    if layout == "hub_v4":
        config.update(use_timm_backbone=True, backbone="resnet50", backbone_config=None)
    else:
        backbone = {"model_type": "timm_backbone", "backbone": "resnet50", "features_only": True}
        backbone["out_indices"] = [4] if fields["num_feature_levels"] == 1 else [2, 3, 4]
        if fields["dilation"]:
            backbone["output_stride"] = 16
        config["backbone_config"] = backbone
    return config


def synthetic(keys: dict, refine: bool, two_stage: bool) -> dict[str, torch.Tensor]:
    """Random tensors; names of one module hold one tensor, as in the model."""
    state: dict[str, torch.Tensor] = {}
    for key, shape in keys.items():
        alias = re.fullmatch(r"(class_embed|bbox_embed)\.(\d+)\.(.+)", key)
        decoder_copy = re.fullmatch(r"model\.decoder\.(class_embed|bbox_embed)\.(.+)", key)
        if alias and not refine and alias[2] != "0":
            state[key] = state[f"{alias[1]}.0.{alias[3]}"]
        elif decoder_copy and f"{decoder_copy[1]}.{decoder_copy[2]}" in state:
            state[key] = state[f"{decoder_copy[1]}.{decoder_copy[2]}"]
        else:
            state[key] = torch.randn(shape)
    # decoder copies listed before the model's heads: make the heads the same tensors
    for key in keys:
        decoder_copy = re.fullmatch(r"model\.decoder\.(class_embed|bbox_embed)\.(.+)", key)
        if decoder_copy:
            state[f"{decoder_copy[1]}.{decoder_copy[2]}"] = state[key]
    return state


# hand-written: transformers 4.x key -> our key, for one tensor of each kind
SPOT_CHECKS = {
    "model.level_embed": "transformer.level_embeds",
    "model.backbone.conv_encoder.model.conv1.weight": "backbone.stem.conv1.weight",
    "model.backbone.conv_encoder.model.bn1.running_var": "backbone.stem.conv1.norm.running_var",
    "model.backbone.conv_encoder.model.layer3.0.downsample.1.weight": (
        "backbone.res4.0.shortcut.norm.weight"
    ),
    "model.backbone.conv_encoder.model.layer4.2.conv2.weight": "backbone.res5.2.conv2.weight",
    "model.input_proj.0.1.bias": "neck.convs.0.norm.bias",
    "model.encoder.layers.5.self_attn.sampling_offsets.bias": (
        "transformer.encoder.layers.5.attentions.0.sampling_offsets.bias"
    ),
    "model.encoder.layers.1.fc1.weight": "transformer.encoder.layers.1.ffns.0.layers.0.0.weight",
    "model.encoder.layers.1.fc2.bias": "transformer.encoder.layers.1.ffns.0.layers.1.bias",
    "model.encoder.layers.2.self_attn_layer_norm.weight": (
        "transformer.encoder.layers.2.norms.0.weight"
    ),
    "model.encoder.layers.2.final_layer_norm.bias": "transformer.encoder.layers.2.norms.1.bias",
    "model.decoder.layers.3.self_attn.out_proj.weight": (
        "transformer.decoder.layers.3.attentions.0.attn.out_proj.weight"
    ),
    "model.decoder.layers.3.self_attn_layer_norm.bias": "transformer.decoder.layers.3.norms.0.bias",
    "model.decoder.layers.4.encoder_attn.value_proj.weight": (
        "transformer.decoder.layers.4.attentions.1.value_proj.weight"
    ),
    "model.decoder.layers.4.encoder_attn_layer_norm.weight": (
        "transformer.decoder.layers.4.norms.1.weight"
    ),
    "model.decoder.layers.0.final_layer_norm.weight": "transformer.decoder.layers.0.norms.2.weight",
    "bbox_embed.0.layers.2.bias": "bbox_embed.0.layers.2.bias",
}
SPOT_CHECKS_MULTI = {
    "model.input_proj.2.0.weight": "neck.convs.2.conv.weight",
    "model.input_proj.3.0.weight": "neck.extra_convs.0.conv.weight",
}
V5_NAMES = (  # the fixture's difference between the two layouts
    ("model.backbone.conv_encoder.model.", "model.backbone.model."),
    (".self_attn.out_proj.", ".self_attn.o_proj."),
    (".fc1.", ".mlp.fc1."),
    (".fc2.", ".mlp.fc2."),
)


def v5_name(key: str) -> str:
    for old, new in V5_NAMES:
        key = key.replace(old, new)
    return key


@pytest.mark.parametrize("layout", ["hub_v4", "v5"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hub_layouts_convert_key_by_key(repo_root, layout, variant):
    fields, keys = fixture_keys(repo_root / "tests" / "fixtures", layout, variant)
    refine, two_stage = fields["with_box_refine"], fields["two_stage"]
    state = synthetic(keys, refine, two_stage)

    result = convert_state(dict(state), hub_config(fields, layout))

    assert result.variant.name == variant and not result.overrides
    ours = build_ours(repo_root, variant, device="meta")
    assert set(result.model) == set(ours.state_dict())
    ours.load_state_dict(result.model, strict=True, assign=True)  # keys and shapes

    rename = (lambda k: k) if layout == "hub_v4" else v5_name
    spots = {**SPOT_CHECKS, **(SPOT_CHECKS_MULTI if fields["num_feature_levels"] > 1 else {})}
    for hf_key, ours_key in spots.items():
        assert torch.equal(result.model[ours_key], state[rename(hf_key)]), hf_key
    d = 256
    q, k, v = (state[rename(f"model.decoder.layers.2.self_attn.{p}_proj.weight")] for p in "qkv")
    packed = result.model["transformer.decoder.layers.2.attentions.0.attn.in_proj_weight"]
    assert torch.equal(packed[:d], q) and torch.equal(packed[d : 2 * d], k)
    assert torch.equal(packed[2 * d :], v)
    last = 6 if two_stage else 5
    rows = torch.tensor(COCO_CATEGORY_IDS)
    assert torch.equal(
        result.model[f"class_embed.{last - 1}.bias"], state[f"class_embed.{last - 1}.bias"][rows]
    )
    if two_stage:  # the proposal head keeps objectness (row 0) first
        proposal = torch.cat((rows.new_zeros(1), rows[1:]))
        assert torch.equal(
            result.model["class_embed.6.weight"], state["class_embed.6.weight"][proposal]
        )
    if not two_stage:
        assert torch.equal(
            result.model["query_embedding.weight"], state["model.query_position_embeddings.weight"]
        )

    # back to the Hub layout: every tensor at its place (class heads: the 80 kept rows)
    spec = spec_from_model(ours, backbone="timm")
    back = to_huggingface(result.model, spec)
    assert {rename(k) for k in back} == set(keys)
    for key, value in back.items():
        original = state[rename(key)]
        if re.fullmatch(r"(model\.decoder\.)?class_embed\.\d+\.\w+", key):
            index = proposal if two_stage and ".6." in key else rows
            original = original[index]
        assert torch.equal(value, original), key


# ---------------------------------------------------------------------------------------------
# command line and bad input


def error_line(capsys) -> str:
    """The one error line (transformers' progress bars, written earlier, left aside)."""
    lines = [x for x in capsys.readouterr().err.splitlines() if "convert_weights.py" in x]
    assert len(lines) == 1 and lines[0].startswith("convert_weights.py: error:")
    return lines[0]


def test_cli_both_directions(repo_root, tmp_path, convert_weights, capsys):
    hf_model = build_hf("two_stage", COCO_ID2LABEL, seed=9)
    hf_model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "ours.pth"
    argv = ["--source", "huggingface", "--input", str(tmp_path / "hf"), "--output", str(out)]
    assert convert_weights.main(argv) == 0
    printed = capsys.readouterr().out
    assert "deformable_detr_r50_two_stage_50ep.py" in printed and "model.num_queries=16" in printed
    saved = torch.load(out, weights_only=True)
    assert saved["metadata"]["thing_classes"] == COCO_THING_CLASSES

    overrides = TINY_OURS + neck_channels("two_stage")
    config = str(repo_root / VARIANTS["two_stage"].config)
    argv = ["--to", "huggingface", "--input", str(out), "--config-file", config]
    assert convert_weights.main([*argv, "--output", str(tmp_path / "back"), *overrides]) == 0
    back = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "back").eval()
    assert back.config.id2label == dict(enumerate(COCO_THING_CLASSES))
    ours = build_ours(repo_root, "two_stage", overrides)
    ours.load_state_dict(saved["model"], strict=True)
    compare_with_transformers(back, ours, random_image(3), list(range(80)))

    assert convert_weights.main([*argv, "--output", str(tmp_path / "x")]) == 2  # no overrides
    assert "does not fit the config's model" in error_line(capsys)


def write_folder(path, config: dict | None, weights: bytes | None = None):
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights)
    return path


def tiny_saved(tmp_path) -> tuple[dict, bytes]:
    build_hf("single_scale", OWN_LABELS, seed=1).save_pretrained(tmp_path / "good")
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    return config, (tmp_path / "good" / "model.safetensors").read_bytes()


@pytest.fixture
def saved(tmp_path):
    return tiny_saved(tmp_path)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no_config", "has no config.json; accepted: a transformers Deformable DETR folder"),
        ("other_model", "describes model_type 'detr'; accepted: 'deformable_detr'"),
        ("truncated", "is not a readable safetensors file"),
        ("two_stage_only", "two_stage=true without with_box_refine is not supported"),
        (
            "resnet18",
            "backbone 'resnet18' is not supported; accepted: timm's resnet50 or resnet101",
        ),
        ("learned_positions", "position_embedding_type='learned' is not supported"),
        ("basic_blocks", "accepted: ResNet-50 (bottleneck"),
    ],
)
def test_bad_input_one_line(tmp_path, convert_weights, capsys, saved, case, expected):
    config, weights = saved
    folder = tmp_path / case
    if case == "no_config":
        write_folder(folder, None, weights)
    elif case == "other_model":
        write_folder(folder, {**config, "model_type": "detr"}, weights)
    elif case == "truncated":
        write_folder(folder, config, weights[: len(weights) // 2])
    elif case == "two_stage_only":
        write_folder(folder, {**config, "two_stage": True, "with_box_refine": False}, weights)
    elif case == "resnet18":
        timm = {"model_type": "timm_backbone", "backbone": "resnet18", "out_indices": [4]}
        write_folder(folder, {**config, "backbone_config": timm}, weights)
    elif case == "learned_positions":
        write_folder(folder, {**config, "position_embedding_type": "learned"}, weights)
    else:
        backbone = {**config["backbone_config"], "layer_type": "basic"}
        write_folder(folder, {**config, "backbone_config": backbone}, weights)
    argv = ["--source", "huggingface", "--input", str(folder), "--output", str(tmp_path / "o.pth")]
    assert convert_weights.main(argv) == 2
    line = error_line(capsys)
    assert expected in line
    if case in ("truncated",):
        assert str(folder / "model.safetensors") in line
    elif case != "no_config":
        assert str(folder / "config.json") in line
    else:
        assert str(folder) in line
