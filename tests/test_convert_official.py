"""Official Deformable-DETR checkpoints -> our model, checked against the key fixture.

The fixture (`checkpoint_keys.json`) is the oracle: per variant it lists the official keys and,
in the same order, the detrex name of the same tensor, plus the 80 class rows kept. Synthetic
checkpoints with the official layout (random tensors, heads shared the way the official model
shares them) go through `tools/convert_weights.py` and into the matching config's model.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import re
import uuid

import pytest
import torch

from detrkit.checkpoint import DetectionCheckpointer
from detrkit.config import LazyConfig, instantiate
from detrkit.data import DatasetCatalog, MetadataCatalog, register_coco_instances
from detrkit.data.builtin_meta import COCO_THING_CLASSES
from detrkit.evaluation import COCOEvaluator
from detrkit.structures import Boxes, Instances
from projects.deformable_detr.convert import (
    VARIANTS,
    convert_detrex,
    detrex_layout,
    official_layout,
    official_to_detrex_name,
)

CHECKPOINTER_LOGGER = "detrkit.checkpoint.checkpointer"
ALL_VARIANTS = ["single_scale", "single_scale_dc5", "deformable_detr", "refine", "two_stage"]


pytestmark = pytest.mark.usefixtures("one_thread")


def build_model(repo_root, variant: str, **overrides) -> torch.nn.Module:
    cfg = LazyConfig.load(str(repo_root / VARIANTS[variant].config))
    for key, value in overrides.items():
        cfg.model[key] = value
    return instantiate(cfg.model).eval()


def synthetic_official_state(official_shapes: dict) -> dict[str, torch.Tensor]:
    """Random tensors with the official keys and shapes. Shared modules share tensors as in the
    official model: without refinement class_embed.k / bbox_embed.k are head 0; the decoder's
    bbox_embed / class_embed are the model's. Class-head biases are tagged: entry r of head k is
    r + 1000 k, so the kept rows can be read back as category ids."""
    refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in official_shapes)

    def shared_with(key: str) -> str | None:
        if key.startswith(("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")):
            return key[len("transformer.decoder.") :]
        head = re.fullmatch(r"(class_embed|bbox_embed)\.(\d+)\.(.+)", key)
        if head and not refine and head[2] != "0":
            return f"{head[1]}.0.{head[3]}"
        return None

    state: dict[str, torch.Tensor] = {}
    for key, shape in official_shapes.items():
        if shared_with(key) is None:
            head = re.fullmatch(r"class_embed\.(\d+)\.bias", key)
            if head:
                state[key] = torch.arange(shape[0], dtype=torch.float32) + 1000 * int(head[1])
            else:
                state[key] = torch.randn(shape)
    for key in official_shapes:
        if shared_with(key) is not None:
            state[key] = state[shared_with(key)]
    return {key: state[key] for key in official_shapes}  # the official order


def expected_detrex_values(fixture_variant, official_state, coco_ids) -> dict[str, torch.Tensor]:
    """What every detrex key must hold, straight from the fixture's pairing of the two lists.
    Class heads keep the rows of the COCO ids; two-stage's proposal head (`class_embed.6`, its
    labels all 0 in training) keeps its objectness row 0 in place of the first id's row."""
    rows = torch.tensor(coco_ids)
    proposal_rows = torch.tensor([0, *coco_ids[1:]])
    expected = {}
    pairs = zip(fixture_variant["official"].items(), fixture_variant["detrex"].items())
    for (official_key, official_shape), (detrex_key, detrex_shape) in pairs:
        value = official_state[official_key]
        if official_shape[0] == 91 and detrex_shape[0] == 80:
            is_proposal_head = official_key.split("class_embed.")[-1].startswith("6.")
            value = value[proposal_rows if is_proposal_head else rows]
        assert list(value.shape) == detrex_shape
        expected[detrex_key] = value
    return expected


def save_official(path, state, dilation=None):
    args = argparse.Namespace(lr=2e-4, lr_backbone=2e-5, num_feature_levels=4, epochs=50)
    if dilation is not None:
        args.dilation = dilation
    optimizer = {
        "state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
        "param_groups": [{"lr": 2e-4, "weight_decay": 1e-4, "params": [0]}],
    }
    torch.save(
        {
            "model": state,
            "optimizer": optimizer,
            "lr_scheduler": {"step_size": 40, "gamma": 0.1, "last_epoch": 50},
            "epoch": 49,
            "args": args,
        },
        path,
    )


# ---------------------------------------------------------------------------------------------
# the rules alone against the fixture (no model)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_rules_reproduce_the_fixture(checkpoint_keys, variant):
    fixture = checkpoint_keys["variants"][variant]
    structure = VARIANTS[variant].structure
    official = {k: tuple(v) for k, v in fixture["official"].items()}
    detrex = {k: tuple(v) for k, v in fixture["detrex"].items()}
    # the generated official layout is the fixture's, key for key and shape for shape
    assert official_layout(*structure) == official
    # every official key maps to the detrex key listed at the same position
    levels = structure[0]
    mapped = [official_to_detrex_name(k, levels) for k in fixture["official"]]
    assert mapped == list(fixture["detrex"])
    # and the detrex layout (80 classes) is the fixture's
    assert detrex_layout(*structure) == detrex


def test_fixture_class_ids_are_cocos_80(checkpoint_keys):
    ids = checkpoint_keys["coco_category_ids"]
    assert len(ids) == 80 and ids == sorted(ids) and ids[0] == 1 and ids[-1] == 90
    assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(ids)  # COCO's unused ids


# ---------------------------------------------------------------------------------------------
# synthetic official checkpoints through the command line and into the model


def _attention_by_hand(x, in_weight, in_bias, out_weight, out_bias, heads=8):
    """Multi-head self attention from the packed (q; k; v) projection, written out."""
    d = x.shape[-1]
    q, k, v = (x @ w.T + b for w, b in zip(in_weight.split(d), in_bias.split(d)))

    def split(t):  # (N, S, d) -> (N, heads, S, d / heads)
        return t.view(t.shape[0], t.shape[1], heads, d // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(x.shape)
    return out @ out_weight.T + out_bias


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_official_checkpoint_converts_and_loads_exactly(
    tmp_path, repo_root, checkpoint_keys, convert_weights, capsys, caplog, variant
):
    fixture = checkpoint_keys["variants"][variant]
    coco_ids = checkpoint_keys["coco_category_ids"]
    official = synthetic_official_state(fixture["official"])
    source, output = tmp_path / "checkpoint0049.pth", tmp_path / "converted.pth"
    dilation = {"single_scale": False, "single_scale_dc5": True}.get(variant, False)
    save_official(source, official, dilation=dilation)

    argv = ["--source", "official", "--input", str(source), "--output", str(output)]
    assert convert_weights.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"({variant})" in printed and VARIANTS[variant].config in printed  # detected

    converted = torch.load(output, map_location="cpu", weights_only=True)
    assert list(converted) == ["model"]
    model = build_model(repo_root, variant)
    # exactly the model's keys and shapes: what load_state_dict(strict=True) demands
    model_shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in converted["model"].items()} == model_shapes

    # through the checkpointer (as --eval-only loads it): nothing missing, unexpected or skipped
    with caplog.at_level(logging.INFO, logger=CHECKPOINTER_LOGGER):
        DetectionCheckpointer(model).resume_or_load(str(output), resume=False)
    assert "not in the checkpoint" not in caplog.text
    assert "not used by the model" not in caplog.text
    assert "Skip loading" not in caplog.text

    # every tensor lands where the fixture says (by value), class heads cut to the COCO rows
    expected = expected_detrex_values(fixture, official, coco_ids)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key

    # spot checks through the modules themselves
    layer = model.transformer.decoder.layers[2]
    prefix = "transformer.decoder.layers.2."
    # the official decoder's norm2 follows the self attention, norm1 the cross attention
    assert torch.equal(layer.norms[0].weight, official[prefix + "norm2.weight"])
    assert torch.equal(layer.norms[1].weight, official[prefix + "norm1.weight"])
    assert torch.equal(layer.norms[2].bias, official[prefix + "norm3.bias"])
    assert torch.equal(
        layer.attentions[1].sampling_offsets.weight,
        official[prefix + "cross_attn.sampling_offsets.weight"],
    )
    # the packed q/k/v projection computes the same self attention as written out by hand
    # (in float64: random weights make sharp softmaxes)
    x = torch.randn(2, 7, 256, dtype=torch.float64)
    with torch.no_grad():
        got = copy.deepcopy(layer.attentions[0].attn).double()(x, x, x, need_weights=False)[0]
    want = _attention_by_hand(
        x,
        *(
            official[prefix + f"self_attn.{name}"].double()
            for name in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
        ),
    )
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    encoder = model.transformer.encoder.layers[5]
    assert torch.equal(
        encoder.ffns[0].layers[0][0].weight,
        official["transformer.encoder.layers.5.linear1.weight"],
    )
    assert torch.equal(encoder.norms[1].bias, official["transformer.encoder.layers.5.norm2.bias"])
    assert torch.equal(model.backbone.stem.conv1.weight, official["backbone.0.body.conv1.weight"])
    assert torch.equal(
        model.backbone.res5[0].shortcut.norm.running_var,
        official["backbone.0.body.layer4.0.downsample.1.running_var"],
    )
    levels = VARIANTS[variant].num_feature_levels
    assert torch.equal(model.transformer.level_embeds, official["transformer.level_embed"])
    if levels == 4:
        assert torch.equal(model.neck.convs[1].conv.weight, official["input_proj.1.0.weight"])
        assert torch.equal(model.neck.extra_convs[0].conv.weight, official["input_proj.3.0.weight"])
        assert torch.equal(model.neck.extra_convs[0].norm.bias, official["input_proj.3.1.bias"])
    else:
        assert torch.equal(model.neck.convs[0].conv.weight, official["input_proj.0.0.weight"])

    # class rows: head k's bias was r + 1000 k at official row r, so the kept entries read back
    # the fixture's category ids, in order
    ids = torch.tensor(coco_ids, dtype=torch.float32)
    refine = VARIANTS[variant].with_box_refine
    detection_heads = model.class_embed[:6]
    for k, head in enumerate(detection_heads):
        assert torch.equal(head.bias, ids + (1000 * k if refine else 0)), k
        assert torch.equal(head.weight, official[f"class_embed.{k}.weight"][coco_ids])
    if VARIANTS[variant].as_two_stage:
        # the proposal head: official row 0 (objectness: every label is 0 in its loss) must
        # stay row 0, which the model's top-k reads; the category rows follow it
        assert len(model.class_embed) == 7
        proposal_rows = [0, *coco_ids[1:]]
        expected = torch.tensor(proposal_rows, dtype=torch.float32) + 6000
        for head in (model.class_embed[6], model.transformer.decoder.class_embed[6]):
            assert torch.equal(head.bias, expected)
            assert torch.equal(head.weight, official["class_embed.6.weight"][proposal_rows])
    output.unlink()
    source.unlink()


def test_single_scale_file_without_dilation_needs_and_takes_variant(
    tmp_path, checkpoint_keys, convert_weights, capsys
):
    fixture = checkpoint_keys["variants"]["single_scale"]
    official = synthetic_official_state(fixture["official"])
    source, output = tmp_path / "single_scale.pth", tmp_path / "out.pth"
    torch.save({"model": official}, source)  # no args
    argv = ["--source", "official", "--input", str(source), "--output", str(output)]
    assert convert_weights.main(argv) == 2
    err = capsys.readouterr().err
    assert str(source) in err and "--variant single_scale_dc5" in err
    assert not output.exists()

    assert convert_weights.main([*argv, "--variant", "single_scale_dc5"]) == 0
    assert "deformable_detr_r50_single_scale_dc5_50ep.py" in capsys.readouterr().out
    converted = torch.load(output, weights_only=True)["model"]
    expected = expected_detrex_values(fixture, official, checkpoint_keys["coco_category_ids"])
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], v) for k, v in expected.items())


# ---------------------------------------------------------------------------------------------
# fine-tuning to another class count; detrex checkpoints need no conversion


def test_coco_checkpoint_into_four_classes_skips_only_the_class_heads(
    tmp_path, repo_root, checkpoint_keys, convert_weights, caplog
):
    fixture = checkpoint_keys["variants"]["two_stage"]
    official = synthetic_official_state(fixture["official"])
    source, output = tmp_path / "two_stage.pth", tmp_path / "converted.pth"
    save_official(source, official, dilation=False)
    argv = ["--source", "official", "--input", str(source), "--output", str(output)]
    assert convert_weights.main(argv) == 0
    expected = expected_detrex_values(fixture, official, checkpoint_keys["coco_category_ids"])

    model = build_model(repo_root, "two_stage", num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger=CHECKPOINTER_LOGGER):
        DetectionCheckpointer(model).resume_or_load(str(output), resume=False)

    heads = {k for k in before if re.fullmatch(r"(transformer\.decoder\.)?class_embed\.\d\..*", k)}
    assert len(heads) == 28  # 7 heads x (weight, bias), listed under two names
    state = model.state_dict()
    for key in before:
        if key in heads:
            assert torch.equal(state[key], before[key]), key  # kept their initialization
            assert state[key].shape[0] == 4
        else:
            assert torch.equal(state[key], expected[key]), key
    # one clear message naming the heads and both shapes; nothing reported as missing
    text = caplog.text
    assert "Skip loading 28 tensors" in text
    assert "(80, 256) in the checkpoint, (4, 256) in the model" in text
    assert "(80,) in the checkpoint, (4,) in the model" in text
    for key in ("class_embed.0.weight", "class_embed.6.bias", "transformer.decoder.class_embed.3"):
        assert key in text
    assert "not in the checkpoint" not in text and "not used by the model" not in text


def test_detrex_checkpoint_loads_without_conversion_and_checks_clean(
    tmp_path, repo_root, convert_weights, capsys, caplog
):
    model = build_model(repo_root, "refine")
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn_like(tensor))
    # copy.deepcopy'd heads are distinct modules; the decoder's bbox_embed is the model's
    assert model.transformer.decoder.bbox_embed is model.bbox_embed
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "model_0004999.pth"
    trainer = {"iteration": 4999, "optimizer": {"state": {}, "param_groups": []}}
    torch.save({"model": model.state_dict(), "trainer": trainer, "iteration": 4999}, path)

    # loads as it is: zero missing / unexpected keys, every value back
    for tensor in model.state_dict().values():
        tensor.zero_()
    with caplog.at_level(logging.INFO, logger=CHECKPOINTER_LOGGER):
        DetectionCheckpointer(model).resume_or_load(str(path), resume=False)
    assert "not in the checkpoint" not in caplog.text and "not used" not in caplog.text
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())

    # --source detrex checks it and writes {"model": ...} without the training state
    out = tmp_path / "weights.pth"
    argv = ["--source", "detrex", "--input", str(path), "--output", str(out)]
    assert convert_weights.main(argv) == 0
    printed = capsys.readouterr().out
    assert "(refine, 80 classes)" in printed and "trainer, iteration" in printed
    written = torch.load(out, weights_only=True)
    assert list(written) == ["model"] and written["model"].keys() == saved.keys()
    assert all(torch.equal(written["model"][k], v) for k, v in saved.items())

    # use_ema takes the EMA weights the EMA hook saved beside the model
    ema = {k: v + 1 for k, v in saved.items()}
    result = convert_detrex({"model": saved, "ema_state": ema}, "ckpt.pth", use_ema=True)
    assert result.model.keys() == ema.keys()
    assert all(torch.equal(result.model[k], v) for k, v in ema.items())


# ---------------------------------------------------------------------------------------------
# the evaluator maps contiguous labels back to the same COCO ids


def test_evaluator_maps_labels_to_the_kept_category_ids(tmp_path, checkpoint_keys):
    coco_ids = checkpoint_keys["coco_category_ids"]
    builtin = MetadataCatalog.get("coco_2017_val")
    assert builtin.thing_dataset_id_to_contiguous_id == {c: i for i, c in enumerate(coco_ids)}

    # one image per category, one box each; label i predicts that box
    images = [(500 + i, 200 + i, 300) for i in range(80)]
    annotations = [
        {
            "id": i + 1,
            "image_id": 500 + i,
            "category_id": cid,
            "bbox": [10.0 + i, 20.0, 60.0, 40.0 + i],
            "area": 60.0 * (40.0 + i),
            "iscrowd": 0,
        }
        for i, cid in enumerate(coco_ids)
    ]
    gt = {
        "images": [
            {"id": i, "file_name": f"{i}.jpg", "height": h, "width": w} for i, h, w in images
        ],
        "annotations": annotations,
        "categories": [{"id": c, "name": n} for c, n in zip(coco_ids, COCO_THING_CLASSES)],
    }
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt))
    name = f"test_convert_coco80_{uuid.uuid4().hex[:8]}"
    register_coco_instances(
        name,
        {
            "thing_classes": list(builtin.thing_classes),
            "thing_dataset_id_to_contiguous_id": dict(builtin.thing_dataset_id_to_contiguous_id),
        },
        str(gt_file),
        str(tmp_path),
    )
    try:
        evaluator = COCOEvaluator(name, output_dir=str(tmp_path / "eval"))
        evaluator.reset()
        for label, ((image_id, h, w), ann) in enumerate(zip(images, annotations)):
            x, y, bw, bh = ann["bbox"]
            instances = Instances((h, w))
            instances.pred_boxes = Boxes(torch.tensor([[x, y, x + bw, y + bh]]))
            instances.scores = torch.tensor([0.9])
            instances.pred_classes = torch.tensor([label])
            evaluator.process([{"image_id": image_id}], [{"instances": instances}])
        results = evaluator.evaluate()["bbox"]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert results["AP"] == pytest.approx(100.0)
    written = json.loads((tmp_path / "eval" / "coco_instances_results.json").read_text())
    by_image = {r["image_id"]: r["category_id"] for r in written}
    assert [by_image[500 + i] for i in range(80)] == coco_ids
