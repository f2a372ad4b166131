"""The sampling points drawn for Figure 6 are the locations and weights the deformable-attention
operator received: recomputed here from independent forward hooks on the attention module's
inputs and its offset/weight projections, with the paper's formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from detrkit.config import LazyConfig, instantiate
from detrkit.engine import DefaultPredictor
from detrkit.layers import MultiScaleDeformableAttention, ms_deform_attn_reference
from detrkit.layers.deform_attn_recorder import DeformableAttentionRecorder
from detrkit.utils.visualizer import draw_sampling_points, weight_colors
from projects.deformable_detr.sampling_points import (
    attention_module_names,
    collect_sampling_points,
    sampling_points_figure,
)
from tests.test_engine_defaults import SHAPES_TINY

pytestmark = pytest.mark.usefixtures("one_thread")


class _IndependentHooks:
    """Inputs and output of one attention module and the outputs of its two projections."""

    def __init__(self, module: MultiScaleDeformableAttention) -> None:
        self.module = module
        self.inputs: dict = {}
        self.output = None
        self.handles = [
            module.register_forward_pre_hook(self._inputs, with_kwargs=True),
            module.register_forward_hook(self._output),
        ]

    def _inputs(self, module, args, kwargs):
        self.inputs = {k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)}

    def _output(self, module, args, output):
        self.output = output.detach().clone()

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def locations_and_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Deformable DETR eq. 3 (multi-scale): p_hat + offset, in normalized coordinates."""
        m = self.module
        heads, levels, points = m.num_heads, m.num_levels, m.num_points
        query = self.inputs["query"].double()
        if "query_pos" in self.inputs:
            query = query + self.inputs["query_pos"].double()
        if not m.batch_first:
            query = query.transpose(0, 1)
        n, lq = query.shape[:2]
        # the module's two linear layers applied here, in float64, to the query it was given
        with torch.no_grad():
            offsets = F.linear(
                query, m.sampling_offsets.weight.double(), m.sampling_offsets.bias.double()
            )
            logits = F.linear(
                query, m.attention_weights.weight.double(), m.attention_weights.bias.double()
            )
        offsets = offsets.view(n, lq, heads, levels, points, 2)
        weights = logits.view(n, lq, heads, levels * points).softmax(-1)
        reference = self.inputs["reference_points"].double()
        shapes = self.inputs["spatial_shapes"].double()
        if reference.shape[-1] == 2:
            size_xy = torch.stack([shapes[:, 1], shapes[:, 0]], -1)  # (L, 2) as (W, H)
            locations = reference[:, :, None, :, None, :] + offsets / size_xy[:, None, :]
        else:
            centre = reference[:, :, None, :, None, :2]
            locations = centre + offsets / points * reference[:, :, None, :, None, 2:] * 0.5
        return locations, weights.view(n, lq, heads, levels, points)

    def output_from(self, query: int, points_xy: np.ndarray, weights: np.ndarray, size) -> Tensor:
        """The module's output row of `query` recomputed from drawn points (image pixels) and
        weights: the operator on the projected values, the output projection, the residual."""
        m = self.module
        shape = (1, 1, m.num_heads, m.num_levels, m.num_points)
        locations = torch.from_numpy(points_xy / size).float().view(*shape, 2)
        weights = torch.from_numpy(weights).float().view(shape)
        value = m.value_proj(self.inputs["value"])
        mask = self.inputs.get("key_padding_mask")
        if mask is not None:
            value = value.masked_fill(mask[..., None], 0.0)
        value = value.view(*value.shape[:2], m.num_heads, -1)
        shapes = self.inputs["spatial_shapes"]
        starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
        sampled = ms_deform_attn_reference(value, shapes, starts, locations, weights)
        return self.inputs["query"][0, query] + m.output_proj(sampled)[0, 0]


def _predictor(tmp_path, *overrides: str) -> DefaultPredictor:
    cfg = LazyConfig.load(str(SHAPES_TINY))
    cfg = LazyConfig.apply_overrides(cfg, ["train.device=cpu", *overrides])
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    for module in model.modules():  # spread offsets and weights away from their initialization
        if isinstance(module, MultiScaleDeformableAttention):
            torch.nn.init.normal_(module.sampling_offsets.weight, 0.0, 0.2)
            torch.nn.init.normal_(module.attention_weights.weight, 0.0, 0.5)
    for head in model.class_embed:
        torch.nn.init.normal_(head.bias, 0.0, 1.0)
    path = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    cfg.train.init_checkpoint = str(path)
    return DefaultPredictor(cfg)


@pytest.mark.parametrize("refine", [True, False], ids=["box-references", "point-references"])
def test_drawn_points_are_what_the_operator_received(tmp_path, refine):
    predictor = _predictor(tmp_path, f"model.with_box_refine={refine}")
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(150, 190, 3), dtype=np.uint8)
    height, width = image.shape[:2]
    encoder_names, decoder_names = attention_module_names(predictor.model)
    modules = dict(predictor.model.named_modules())
    decoder_hooks = _IndependentHooks(modules[decoder_names[-1]])
    encoder_hooks = _IndependentHooks(modules[encoder_names[-1]])
    try:
        result = collect_sampling_points(
            predictor, image, top_k=3, encoder_pixel=(100.0, 40.0), encoder_level=1
        )
    finally:
        decoder_hooks.remove()
        encoder_hooks.remove()

    size = np.array([width, height], dtype=np.float64)
    # fed back through the attention (pure-PyTorch reference operator), the drawn points and
    # weights give the module's output: they are the ones the operator received
    for hooks, queries in ((decoder_hooks, result.decoder), (encoder_hooks, [result.encoder])):
        for query in queries:
            with torch.no_grad():
                row = hooks.output_from(query.query_index, query.points_xy, query.weights, size)
            torch.testing.assert_close(row, hooks.output[0, query.query_index], atol=1e-4, rtol=0)

    locations, weights = decoder_hooks.locations_and_weights()
    reference_dim = decoder_hooks.inputs["reference_points"].shape[-1]
    assert reference_dim == (4 if refine else 2)
    assert len(result.decoder) == 3
    for query in result.decoder:
        q = query.query_index
        expected = locations[0, q].reshape(-1, 2).numpy() * size
        np.testing.assert_allclose(query.points_xy, expected, rtol=0, atol=1e-4)
        # weights: softmax of the float32 logits the model computed vs of float64 ones here
        np.testing.assert_allclose(query.weights, weights[0, q].reshape(-1).numpy(), atol=1e-5)
        reference = decoder_hooks.inputs["reference_points"][0, q, 0, :2].double().numpy()
        np.testing.assert_allclose(query.reference_xy, reference * size, atol=1e-6)

    # the encoder query of pixel (100, 40) on level 1
    shapes = encoder_hooks.inputs["spatial_shapes"].tolist()
    level_h, level_w = shapes[1]
    token = shapes[0][0] * shapes[0][1] + int(40 / height * level_h) * level_w
    token += int(100 / width * level_w)
    assert result.encoder.query_index == token
    locations, weights = encoder_hooks.locations_and_weights()
    expected = locations[0, token].reshape(-1, 2).numpy() * size
    np.testing.assert_allclose(result.encoder.points_xy, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.encoder.weights, weights[0, token].reshape(-1), atol=1e-5)
    # its reference point is the centre of its level-1 cell, in image pixels
    cell = np.array([(token - shapes[0][0] * shapes[0][1]) % level_w + 0.5, 0.0])
    cell[1] = (token - shapes[0][0] * shapes[0][1]) // level_w + 0.5
    np.testing.assert_allclose(result.encoder.reference_xy, cell / [level_w, level_h] * size)

    figure = sampling_points_figure(image, result)
    # 4 panels in 2 rows of images enlarged to a long side of 320 px
    assert figure.dtype == np.uint8 and figure.shape[0] >= 2 * round(150 * 320 / 190)


def test_other_layers(tmp_path):
    predictor = _predictor(tmp_path)
    image = np.random.default_rng(3).integers(0, 256, size=(120, 140, 3), dtype=np.uint8)
    encoder_names, decoder_names = attention_module_names(predictor.model)
    modules = dict(predictor.model.named_modules())
    decoder_hooks = _IndependentHooks(modules[decoder_names[0]])
    encoder_hooks = _IndependentHooks(modules[encoder_names[1]])
    try:
        result = collect_sampling_points(
            predictor, image, top_k=2, encoder_pixel=(10, 100), decoder_layer=0, encoder_layer=1
        )
    finally:
        decoder_hooks.remove()
        encoder_hooks.remove()
    size = np.array([140.0, 120.0])
    locations, _ = decoder_hooks.locations_and_weights()
    for query in result.decoder:
        expected = locations[0, query.query_index].reshape(-1, 2).numpy() * size
        np.testing.assert_allclose(query.points_xy, expected, rtol=0, atol=1e-4)
        assert "decoder layer 0" in query.label
    locations, _ = encoder_hooks.locations_and_weights()
    expected = locations[0, result.encoder.query_index].reshape(-1, 2).numpy() * size
    np.testing.assert_allclose(result.encoder.points_xy, expected, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"decoder layer 3 does not exist; accepted: 0\.\.2"):
        collect_sampling_points(predictor, image, decoder_layer=3)


def test_detection_panels_follow_the_predictions(tmp_path):
    predictor = _predictor(tmp_path)
    image = np.random.default_rng(2).integers(0, 256, size=(128, 160, 3), dtype=np.uint8)
    result = collect_sampling_points(predictor, image, top_k=4, score_threshold=0.0)
    plain = predictor(image)["instances"]
    top = torch.argsort(plain.scores, descending=True)[:4]
    for query, i in zip(result.decoder, top.tolist()):
        np.testing.assert_allclose(query.box_xyxy, plain.pred_boxes.tensor[i].double().numpy())
        assert query.class_id == int(plain.pred_classes[i])
    # recording changes nothing the model returns
    torch.testing.assert_close(result.instances.scores, plain.scores, rtol=0, atol=0)


def test_recorder_leaves_no_hooks_and_checks_names(tmp_path):
    predictor = _predictor(tmp_path)
    model = predictor.model
    before = {name: dict(m._forward_pre_hooks) for name, m in model.named_modules()}
    with DeformableAttentionRecorder(model) as recorder:
        predictor(np.zeros((96, 96, 3), np.uint8))
    encoder_names, decoder_names = attention_module_names(model)
    assert [c.name for c in recorder.calls] == encoder_names + decoder_names
    assert {name: dict(m._forward_pre_hooks) for name, m in model.named_modules()} == before
    with pytest.raises(KeyError, match=r"transformer\.nope"):
        DeformableAttentionRecorder(model, ["transformer.nope"])


def test_encoder_pixel_outside_image_is_named(tmp_path):
    predictor = _predictor(tmp_path)
    with pytest.raises(ValueError, match=r"encoder pixel \(500, 3\) is outside the 96x64 image"):
        collect_sampling_points(predictor, np.zeros((64, 96, 3), np.uint8), encoder_pixel=(500, 3))


def test_points_are_drawn_in_their_weight_colour():
    image = np.full((120, 160, 3), 128, np.uint8)
    points = np.array([[20.0, 30.0], [80.0, 60.0], [140.0, 100.0]])
    weights = np.array([0.1, 0.5, 0.25])
    panel = draw_sampling_points(image, (80.0, 20.0), points, weights, vmax=0.5)
    colors = weight_colors(weights, 0.5)
    for (x, y), color in zip(points.astype(int), colors):
        np.testing.assert_array_equal(panel[y, x], color)
    # the ends of the colour map: dark blue for 0, red for the maximum
    low, high = weight_colors(np.array([0.0, 0.5]), 0.5)
    assert low[2] > low[0] and high[0] > high[2]
