"""Where Deformable DETR looks: the paper's Figure 6 for one image.

For each of the top detections, the last decoder layer's cross-attention query that produced it:
its reference point and its M x L x P sampling points (all heads, all levels) with their
attention weights, in the original image's pixels. For the encoder, the same for the query of one
chosen pixel (the last encoder layer's self-attention). The locations and weights are the ones
the deformable-attention operator received (recorded by `DeformableAttentionRecorder`); the
model's outputs are unchanged.

Coordinates: with one image there is no padding, so the normalized (x, y) the model uses
(sampling locations and reference points alike) are fractions of the image's width and height;
multiplying by the original size gives original pixels, the same convention as the boxes.

    predictor = DefaultPredictor(cfg)
    result = collect_sampling_points(predictor, image_rgb, top_k=4, encoder_pixel=(120, 80))
    picture = sampling_points_figure(image_rgb, result)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from detrkit.layers import MultiScaleDeformableAttention
from detrkit.layers.deform_attn_recorder import DeformableAttentionCall, DeformableAttentionRecorder
from detrkit.utils.visualizer import class_color, draw_sampling_points, tile_panels

__all__ = [
    "QuerySamplingPoints",
    "SamplingPointsResult",
    "attention_module_names",
    "collect_sampling_points",
    "sampling_points_figure",
]


@dataclass
class QuerySamplingPoints:
    """One attention query's sampling points (K = heads x levels x points), original pixels."""

    reference_xy: np.ndarray  # (2,) the reference point (a box's centre for 4-d references)
    points_xy: np.ndarray  # (K, 2) in (head, level, point) order
    weights: np.ndarray  # (K,) attention weights; each head's L x P weights sum to 1
    levels: np.ndarray  # (K,) feature level of each point
    query_index: int  # the query's index among the module's queries
    label: str = ""  # what the panel shows in its title
    box_xyxy: np.ndarray | None = None  # the detection's box, for decoder queries
    class_id: int | None = None


@dataclass
class SamplingPointsResult:
    instances: Any  # the predictor's Instances for the image
    decoder: list[QuerySamplingPoints] = field(default_factory=list)
    encoder: QuerySamplingPoints | None = None


def attention_module_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the encoder's and the decoder's MultiScaleDeformableAttention modules, in
    layer order."""
    encoder, decoder = [], []
    for name, module in model.named_modules():
        if isinstance(module, MultiScaleDeformableAttention):
            if ".encoder." in f".{name}.":
                encoder.append(name)
            elif ".decoder." in f".{name}.":
                decoder.append(name)
    if not encoder or not decoder:
        raise ValueError(
            f"{type(model).__name__} has no deformable attention under 'transformer.encoder' and "
            "'transformer.decoder'; sampling points are drawn for Deformable DETR models"
        )
    return encoder, decoder


def _query_points(
    call: DeformableAttentionCall, query: int, width: int, height: int
) -> QuerySamplingPoints:
    if call.sampling_locations is None:
        raise RuntimeError(
            f"{call.name} did not call the operator detrkit::ms_deform_attn_forward (a device "
            "other than cpu/cuda uses the Python reference); run the predictor on cpu or cuda"
        )
    size = np.array([width, height], dtype=np.float64)
    locations = call.sampling_locations[0, query].double().numpy()  # (M, L, P, 2)
    weights = call.attention_weights[0, query].double().numpy()  # (M, L, P)
    heads, levels, points, _ = locations.shape
    level_of_point = np.broadcast_to(np.arange(levels)[None, :, None], (heads, levels, points))
    reference = call.reference_points[0, query, 0, :2].double().numpy()
    return QuerySamplingPoints(
        reference_xy=reference * size,
        points_xy=locations.reshape(-1, 2) * size,
        weights=weights.reshape(-1),
        levels=level_of_point.reshape(-1).copy(),
        query_index=int(query),
    )


def _layer(module_name: str) -> str:
    """'transformer.decoder.layers.5.attentions.1' -> 'decoder layer 5'."""
    parts = module_name.split(".")
    stack = "decoder" if "decoder" in parts else "encoder"
    index = parts[parts.index("layers") + 1] if "layers" in parts else "?"
    return f"{stack} layer {index}"


def _last_decoder_class_head(model: nn.Module) -> nn.Module:
    num_layers = model.transformer.decoder.num_layers
    return model.class_embed[num_layers - 1]


def collect_sampling_points(
    predictor: Any,
    image: np.ndarray,
    top_k: int = 6,
    score_threshold: float = 0.0,
    encoder_pixel: tuple[float, float] | None = None,
    encoder_level: int = 0,
    decoder_layer: int = -1,
    encoder_layer: int = -1,
) -> SamplingPointsResult:
    """Predict on one image (in the predictor's input format) and collect the sampling points
    of the `top_k` most confident detections (score >= score_threshold) in decoder layer
    `decoder_layer` (default the last, as in the paper) and, with `encoder_pixel` = (x, y) in
    original pixels, of encoder layer `encoder_layer`'s query at that pixel on feature level
    `encoder_level`. Layers count from 0; negative values count from the end."""
    model = predictor.model
    encoder_names, decoder_names = attention_module_names(model)
    for what, index, names in (
        ("decoder", decoder_layer, decoder_names),
        ("encoder", encoder_layer, encoder_names),
    ):
        if not -len(names) <= index < len(names):
            raise ValueError(
                f"{what} layer {index} does not exist; accepted: 0..{len(names) - 1} (or "
                f"-{len(names)}..-1 from the end)"
            )
    encoder_name, decoder_name = encoder_names[encoder_layer], decoder_names[decoder_layer]
    height, width = image.shape[:2]
    if encoder_pixel is not None:
        x, y = encoder_pixel
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(
                f"encoder pixel ({x:g}, {y:g}) is outside the {width}x{height} image; accepted: "
                f"0 <= x < {width}, 0 <= y < {height}"
            )

    logits: list[torch.Tensor] = []
    handle = _last_decoder_class_head(model).register_forward_hook(
        lambda module, args, output: logits.append(output.detach())
    )
    try:
        with DeformableAttentionRecorder(model, [encoder_name, decoder_name]) as rec:
            instances = predictor(image)["instances"].to("cpu")
    finally:
        handle.remove()

    result = SamplingPointsResult(instances=instances)
    # the detection's query: the one whose last-layer probability for its class is its score
    probabilities = logits[-1][0].sigmoid().double().cpu()  # (Q, num_classes)
    decoder_call = rec.last(decoder_name)
    order = torch.argsort(instances.scores, descending=True).tolist()
    names = list(getattr(predictor.metadata, "thing_classes", None) or [])
    for i in order[:top_k]:
        score = float(instances.scores[i])
        if score < score_threshold:
            break
        label = int(instances.pred_classes[i])
        gaps = (probabilities[:, label] - score).abs()
        query = int(torch.argmin(gaps))
        if float(gaps[query]) > 1e-5:
            raise RuntimeError(
                f"no query of the last decoder layer scores {score:.6f} for class {label}; the "
                "model's class head is not the one that scored the detections"
            )
        points = _query_points(decoder_call, query, width, height)
        points.box_xyxy = instances.pred_boxes.tensor[i].double().numpy()
        points.class_id = label
        name = names[label] if label < len(names) else f"class {label}"
        points.label = f"{name} {score * 100:.0f}% (query {query}, {_layer(decoder_name)})"
        result.decoder.append(points)

    if encoder_pixel is not None:
        call = rec.last(encoder_name)
        shapes = call.spatial_shapes.tolist()
        if not 0 <= encoder_level < len(shapes):
            raise ValueError(
                f"encoder level {encoder_level} does not exist; accepted: 0..{len(shapes) - 1}"
            )
        level_h, level_w = shapes[encoder_level]
        start = sum(h * w for h, w in shapes[:encoder_level])
        row = min(int(y / height * level_h), level_h - 1)
        col = min(int(x / width * level_w), level_w - 1)
        points = _query_points(call, start + row * level_w + col, width, height)
        points.label = f"{_layer(encoder_name)} query at ({x:.0f}, {y:.0f}), level {encoder_level}"
        result.encoder = points
    return result


def sampling_points_figure(
    image_rgb: np.ndarray, result: SamplingPointsResult, columns: int | None = None
) -> np.ndarray:
    """One panel per detection (and one for the encoder query), sharing one colour bar of the
    attention weights; an HxWx3 uint8 RGB picture."""
    queries = list(result.decoder) + ([result.encoder] if result.encoder is not None else [])
    if not queries:
        raise ValueError(
            "no detection passed the score threshold and no encoder pixel was given: nothing to "
            "draw"
        )
    vmax = max(float(q.weights.max()) for q in queries)
    # small images are drawn larger so that the points stay distinguishable
    scale = max(1.0, 320.0 / max(image_rgb.shape[:2]))
    panels = [
        draw_sampling_points(
            image_rgb,
            q.reference_xy,
            q.points_xy,
            q.weights,
            vmax=vmax,
            box_xyxy=q.box_xyxy,
            box_color=class_color(q.class_id) if q.class_id is not None else (255, 255, 255),
            title=q.label,
            scale=scale,
        )
        for q in queries
    ]
    return tile_panels(panels, columns=columns, colorbar_vmax=vmax)
