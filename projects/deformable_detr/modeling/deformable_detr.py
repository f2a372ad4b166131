"""Deformable DETR: backbone -> neck -> deformable transformer -> class and box heads.

`DeformableDETR.forward` takes detectron2-style inputs (a list of dicts with a uint8 CHW RGB
`image`, optional `height`/`width`, and `instances` in training) and returns a dict of weighted
losses in training, or `[{"instances": Instances(pred_boxes, scores, pred_classes)}]` in eval.

Variants: single scale (one level), single scale DC5, multi-scale, + iterative box refinement
(`with_box_refine`), ++ two-stage (`as_two_stage`); see docs/model.md.
"""

from __future__ import annotations

import copy
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from detrkit.layers import (
    MLP,
    MultiScaleDeformableAttention,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    float32_forward,
    inverse_sigmoid,
)
from detrkit.layers.mlp import set_ffn_fusion
from detrkit.modeling import set_frozen_norm_folding
from detrkit.structures import Boxes, ImageList, Instances

from .deformable_transformer import PyramidLayout, SelfAttention


class DeformableDETR(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        position_embedding: nn.Module,
        neck: nn.Module,
        transformer: nn.Module,
        embed_dim: int,
        num_classes: int,
        num_queries: int,
        criterion: nn.Module,
        pixel_mean: tuple[float, float, float] = (123.675, 116.280, 103.530),
        pixel_std: tuple[float, float, float] = (58.395, 57.120, 57.375),
        aux_loss: bool = True,
        with_box_refine: bool = False,
        as_two_stage: bool = False,
        select_box_nums_for_evaluation: int = 300,
        batch_invariant_eval: bool = True,
        fast_inference: bool = True,
        num_queries_one2many: int = 0,
    ) -> None:
        """
        Args:
            backbone: returns a dict of feature maps (e.g. res3..res5).
            position_embedding: sine embedding of a padding mask, (N, H, W) -> (N, C, H, W).
            neck: maps the backbone dict to a list of `transformer.num_feature_levels` maps.
            num_classes: foreground classes; the class heads have this many sigmoid outputs.
            num_queries: decoder queries (two-stage: the number of encoder proposals kept).
            select_box_nums_for_evaluation: detections per image in eval (top-k over
                queries x classes; clamped to that product).
            batch_invariant_eval: in eval, run images of different sizes through the model
                one by one, and images of one size through backbone and neck one by one, so a
                result never depends on which other images share the batch (padding would
                otherwise leak into convolutions and GroupNorm statistics, and change how
                float32 rounds the sampling locations).
            fast_inference: the eval-time fast path (see `set_fast_inference`); False runs the
                plain computation.
            num_queries_one2many: extra training-only queries matched one-to-many (hybrid
                matching, Jia et al. 2023, "DETRs with Hybrid Matching"): each target is
                repeated `criterion.one2many_repeats` times for them, so many queries per object
                get box and class gradients early in training. The two query groups do not see
                each other in the decoder's self-attention; eval uses the first `num_queries`
                only, so a model trained with them predicts exactly like one without. 0: off.

        The caller places the model (`tools/train_net.py`: on `train.device`).
        """
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"DeformableDETR: num_classes must be >= 1, got {num_classes}")
        if num_queries_one2many < 0 or (num_queries_one2many and as_two_stage):
            raise ValueError(
                f"DeformableDETR: num_queries_one2many must be >= 0 and is for learned queries "
                f"(as_two_stage=False); got {num_queries_one2many} with "
                f"as_two_stage={as_two_stage}"
            )
        if as_two_stage and not with_box_refine:
            # the encoder's proposal head is the extra head box refinement builds (the official
            # code fails at the first forward without it)
            raise ValueError(
                "DeformableDETR: as_two_stage=True needs with_box_refine=True (the paper's "
                "'++ two-stage' variant); set model.with_box_refine=True or "
                "model.as_two_stage=False"
            )
        self.backbone = backbone
        self.position_embedding = position_embedding
        self.neck = neck
        self.transformer = transformer
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_queries_one2many = num_queries_one2many
        self.criterion = criterion
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.as_two_stage = as_two_stage
        self.select_box_nums_for_evaluation = select_box_nums_for_evaluation
        self.batch_invariant_eval = batch_invariant_eval
        self._layout_cache: tuple[tuple, list[torch.Tensor], PyramidLayout] | None = None
        self.set_fast_inference(fast_inference)

        if as_two_stage != transformer.as_two_stage:
            raise ValueError(
                f"DeformableDETR: as_two_stage={as_two_stage} but the transformer has "
                f"as_two_stage={transformer.as_two_stage}; set both (the bundled configs "
                "interpolate model.transformer.as_two_stage from model.as_two_stage)"
            )
        if not as_two_stage:
            # rows [0, num_queries): the one-to-one queries; the rest: one-to-many (training)
            self.query_embedding = nn.Embedding(num_queries + num_queries_one2many, embed_dim * 2)

        # pixel statistics are not part of the state dict (detrex checkpoints do not carry them)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

        self._build_heads(num_classes, embed_dim)

    def _build_heads(self, num_classes: int, embed_dim: int) -> None:
        """One class head and one box head per decoder layer (+1 for two-stage proposals).

        Without refinement all layers share one head pair; with it each layer has its own copy,
        and the decoder uses the box heads to refine its reference boxes.
        """
        class_embed = nn.Linear(embed_dim, num_classes)
        bbox_embed = MLP(embed_dim, embed_dim, 4, 3)
        prior_prob = 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)

        decoder = self.transformer.decoder
        num_pred = decoder.num_layers + 1 if self.as_two_stage else decoder.num_layers
        if self.with_box_refine:
            self.class_embed = nn.ModuleList([copy.deepcopy(class_embed) for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([copy.deepcopy(bbox_embed) for _ in range(num_pred)])
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([bbox_embed for _ in range(num_pred)])
            decoder.bbox_embed = None
        if self.as_two_stage:
            decoder.class_embed = self.class_embed
            for box_head in self.bbox_embed:
                nn.init.constant_(box_head.layers[-1].bias[2:], 0.0)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ fast path
    def set_fast_inference(self, enabled: bool) -> DeformableDETR:
        """Turn the eval-time fast path on (the default) or off; returns the model.

        On: FrozenBatchNorm2d folded into the convolutions before it, backbone and neck in
        channels-last memory format; on the CPU, oneDNN calls with the bias, ReLU and residual
        sum fused in (ResNet blocks, bfloat16 FFNs), float32 FFNs over blocks of rows that stay
        in cache, the deformable attention's output projection accumulated onto its residual;
        the attention's offsets and attention logits from one matmul with the level sizes
        folded in, the decoder's self-attention projected batch-first, and the pyramid layout
        (positional embeddings, valid ratios, reference points, `PyramidLayout`) computed once
        per feature size and padding mask and reused while neither they nor the level
        embeddings change; unpadded batches skip the attention's masking, and under autocast the
        positional embedding is kept in the features' dtype. Training never uses it. Off: the plain
        computation, bit for bit what the model computes without these rewrites.
        """
        self.fast_inference = bool(enabled)
        self._layout_cache = None
        set_frozen_norm_folding(self, self.fast_inference)
        set_ffn_fusion(self, self.fast_inference)
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.fast_inference = self.fast_inference
            elif isinstance(module, MultiScaleDeformableAttention):
                module.fuse_inference = self.fast_inference
        return self

    def train(self, mode: bool = True) -> DeformableDETR:
        self._layout_cache = None  # a training step may change the level embeddings in place
        return super().train(mode)

    def _fast_eval(self) -> bool:
        return self.fast_inference and not self.training

    def _pyramid_layout(
        self, features: list[torch.Tensor], masks: list[torch.Tensor]
    ) -> PyramidLayout:
        """The transformer's `PyramidLayout` for these masks: from the cache on the fast path."""
        level_embeds = self.transformer.level_embeds
        cacheable = (
            self.fast_inference
            and not self.training
            and not (torch.is_grad_enabled() and level_embeds.requires_grad)
            and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
        )
        if not cacheable:
            pos_embeds = [self.position_embedding(m).to(f.dtype) for f, m in zip(features, masks)]
            dtype = features[0].dtype if self.fast_inference and not self.training else None
            return self.transformer.pyramid_layout(masks, pos_embeds, dtype)

        # keyed on the sizes and dtype, the level embeddings (a new tensor or an in-place
        # change), and the masks' values, compared below
        key = (
            tuple(tuple(m.shape) for m in masks),
            features[0].dtype,
            features[0].device,
            level_embeds.data_ptr(),
            level_embeds._version,
            level_embeds.dtype,
        )
        cached = self._layout_cache
        if (
            cached is not None
            and cached[0] == key
            and all(torch.equal(a, b) for a, b in zip(cached[1], masks))
        ):
            return cached[2]
        pos_embeds = [self.position_embedding(m).to(f.dtype) for f, m in zip(features, masks)]
        layout = self.transformer.pyramid_layout(
            masks, pos_embeds, features[0].dtype, check_padding=True
        )
        self._layout_cache = (key, [m.clone() for m in masks], layout)
        return layout

    # ------------------------------------------------------------------ inputs
    def preprocess_image(self, batched_inputs: list[dict]) -> ImageList:
        """Normalize each image, then pad them into one batch with a padding mask."""
        images = []
        for i, record in enumerate(batched_inputs):
            image = record.get("image") if isinstance(record, dict) else record
            if not isinstance(image, torch.Tensor):
                raise TypeError(
                    f"DeformableDETR: input {i} must be a dict with an 'image' tensor "
                    f"(uint8, 3 x H x W, RGB); got {type(image).__name__}"
                )
            if image.dim() != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
                raise ValueError(
                    f"DeformableDETR: input {i} 'image' must have shape (3, H, W) with RGB "
                    f"channels first; got {tuple(image.shape)}"
                )
            if image.dtype != torch.uint8 and not image.is_floating_point():
                raise TypeError(
                    f"DeformableDETR: input {i} 'image' must be uint8 (0..255) or a float tensor "
                    f"on the same 0..255 scale; got {image.dtype}"
                )
            image = image.to(self.device, non_blocking=True).float()
            images.append((image - self.pixel_mean) / self.pixel_std)
        return ImageList.from_tensors(images)

    def prepare_targets(self, batched_inputs: list[dict]) -> list[dict[str, torch.Tensor]]:
        """Ground truth as the criterion wants it: labels and normalized cxcywh boxes.

        The values are not checked here: on a GPU every check would be a host sync per step.
        The data pipeline checks them where they enter (category ids when a dataset is loaded,
        boxes in the mapper, which also clips them to the image; the class count against
        `model.num_classes` at start-up).
        """
        targets = []
        for i, record in enumerate(batched_inputs):
            if "instances" not in record:
                raise KeyError(
                    f"DeformableDETR: training input {i} has no 'instances' "
                    "(Instances with gt_boxes and gt_classes); an image without objects needs an "
                    "empty Instances, not a missing key"
                )
            instances = record["instances"]
            height, width = instances.image_size
            if len(instances.get_fields()) == 0:  # empty Instances: a valid negative image
                boxes = torch.zeros((0, 4), device=self.device)
                labels = torch.zeros((0,), dtype=torch.long, device=self.device)
            else:
                boxes = instances.gt_boxes.tensor.to(self.device, torch.float32)
                labels = instances.gt_classes.to(self.device, torch.long)
            scale = boxes.new_tensor([width, height, width, height])
            targets.append({"labels": labels, "boxes": box_xyxy_to_cxcywh(boxes / scale)})
        return targets

    # ------------------------------------------------------------------ features
    def _features_and_masks(
        self, images: ImageList
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Feature maps of every level and their padding masks (True on padding)."""
        # Channels-last convolutions (oneDNN's faster layout) on the eval fast path and in CPU
        # training (backbone + neck forward and backward about 1.2-1.4x faster at the
        # quickstart's size); the neck's maps then flatten to (N, H*W, C) tokens without a copy.
        channels_last = self._fast_eval() or (self.training and images.tensor.device.type == "cpu")
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if self.training or not self.batch_invariant_eval or len(images) == 1:
            features = self.neck(
                self.backbone(images.tensor.contiguous(memory_format=memory_format))
            )
            # official: nearest-neighbour resize of the image padding mask to each level
            masks = [
                F.interpolate(images.mask[None].float(), size=f.shape[-2:]).to(torch.bool)[0]
                for f in features
            ]
            return features, masks

        # Batch-invariant eval of images of one size (`forward` sends mixed sizes one by one):
        # each image alone through backbone and neck, as it goes when it comes alone, then
        # stacked per level. Nothing is padded, so every mask is all False.
        per_image = [
            self.neck(self.backbone(images[i][None].contiguous(memory_format=memory_format)))
            for i in range(len(images))
        ]
        features = [
            torch.cat(maps).contiguous(memory_format=memory_format) for maps in zip(*per_image)
        ]
        masks = [f.new_zeros((f.shape[0], *f.shape[-2:]), dtype=torch.bool) for f in features]
        return features, masks

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: list[dict]):
        images = self.preprocess_image(batched_inputs)
        if self.training:
            output = self.predict(*self._features_and_masks(images))
            targets = self.prepare_targets(batched_inputs)
            loss_dict = self.criterion(output, targets)
            return weight_losses(loss_dict, self.criterion.weight_dict)

        if self.batch_invariant_eval and len(set(images.image_sizes)) > 1:
            # Images of different sizes go one by one, each on its own unpadded features: in a
            # padded batch the sampling locations are normalized by the padded sizes and scaled
            # by valid ratios, which float32 rounds differently than for the image alone (and
            # in two-stage, a small image's padded tokens would become proposals).
            results = []
            for i, image_size in enumerate(images.image_sizes):
                single = ImageList(images[i][None], [image_size])
                output = self.predict(*self._features_and_masks(single))
                results += self.inference(output["pred_logits"], output["pred_boxes"], [image_size])
        else:
            output = self.predict(*self._features_and_masks(images))
            results = self.inference(
                output["pred_logits"], output["pred_boxes"], images.image_sizes
            )

        processed = []
        for result, record, image_size in zip(results, batched_inputs, images.image_sizes):
            height = record.get("height", image_size[0])
            width = record.get("width", image_size[1])
            processed.append({"instances": rescale_instances(result, height, width)})
        return processed

    def detect(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detections of a batch of equal-size images as plain tensors (the exported graph).

        images: (N, 3, H, W) float RGB on the 0..255 scale, not normalized; no padding, so the
        batched backbone computes each image exactly as it would alone. Returns boxes (N, K, 4)
        xyxy in the pixels of `images`, scores (N, K) and labels (N, K) int64, K the config's
        `select_box_nums_for_evaluation`, best first: the same detections as `forward` gives for
        each image at this size (boxes clipped to the image).
        """
        images = (images - self.pixel_mean) / self.pixel_std
        features = self.neck(self.backbone(images))
        masks = [
            f.new_zeros((f.shape[0], f.shape[2], f.shape[3]), dtype=torch.bool) for f in features
        ]
        output = self.predict(features, masks)
        scores, labels, boxes = self.select_top_detections(
            output["pred_logits"], output["pred_boxes"]
        )
        height, width = images.shape[-2:]
        # torch.tensor (not new_tensor) keeps the sizes symbolic under torch.export
        scale = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
        boxes = torch.minimum((boxes * scale).clamp(min=0), scale)  # clipped as forward clips
        return boxes, scores, labels

    def predict(self, features: list[torch.Tensor], masks: list[torch.Tensor]) -> dict:
        """Transformer and heads: class logits and normalized cxcywh boxes of the last decoder
        layer, plus `aux_outputs` (earlier layers) and `enc_outputs` (two-stage proposals)."""
        layout = self._pyramid_layout(features, masks)
        query_embed = self_attn_mask = None
        hybrid = self.training and self.num_queries_one2many > 0
        if not self.as_two_stage:
            query_embed = self.query_embedding.weight
            if hybrid:
                self_attn_mask = self._group_mask(query_embed.device)
            else:
                query_embed = query_embed[: self.num_queries]
        states, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            features, masks, None, query_embed, layout, self_attn_mask
        )

        # predictions of every decoder layer, each relative to the reference it started from;
        # the heads in float32 under autocast (detrkit.layers.precision): they are ~0.2% of the
        # multiply-adds, and the references they refine are float32 already
        outputs_classes, outputs_coords = [], []
        for lvl in range(states.shape[0]):
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            outputs_class = float32_forward(self.class_embed[lvl], states[lvl])
            delta = float32_forward(self.bbox_embed[lvl], states[lvl])
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            outputs_classes.append(outputs_class)
            outputs_coords.append(coord.sigmoid())
        outputs_class = torch.stack(outputs_classes)  # (layers, N, Q, num_classes)
        outputs_coord = torch.stack(outputs_coords)  # (layers, N, Q, 4) normalized cxcywh

        if hybrid:
            one2many = self._layer_outputs(
                outputs_class[:, :, self.num_queries :], outputs_coord[:, :, self.num_queries :]
            )
            output = self._layer_outputs(
                outputs_class[:, :, : self.num_queries], outputs_coord[:, :, : self.num_queries]
            )
            output["one2many_outputs"] = one2many
        else:
            output = self._layer_outputs(outputs_class, outputs_coord)
        if self.as_two_stage:
            output["enc_outputs"] = {
                "pred_logits": enc_class,
                "pred_boxes": enc_coord_unact.sigmoid(),
            }
        return output

    def _layer_outputs(self, outputs_class: torch.Tensor, outputs_coord: torch.Tensor) -> dict:
        """The last layer's logits and boxes, and the earlier layers' as `aux_outputs`."""
        output = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            output["aux_outputs"] = [
                {"pred_logits": c, "pred_boxes": b}
                for c, b in zip(outputs_class[:-1], outputs_coord[:-1])
            ]
        return output

    def _group_mask(self, device: torch.device) -> torch.Tensor:
        """(Q + Q_one2many)^2 bool self-attention mask, True where a one-to-one query and a
        one-to-many query would see each other: the groups stay independent."""
        is_one2many = torch.arange(self.num_queries + self.num_queries_one2many, device=device)
        is_one2many = is_one2many >= self.num_queries
        return is_one2many[:, None] != is_one2many[None, :]

    def select_top_detections(
        self,
        logits: torch.Tensor,  # (N, Q, num_classes)
        boxes: torch.Tensor,  # (N, Q, 4) normalized cxcywh
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The k best (query, class) pairs per image, k = select_box_nums_for_evaluation
        (clamped to Q * num_classes): scores (N, k) sigmoid probabilities in decreasing order,
        labels (N, k) int64 and boxes (N, k, 4) normalized xyxy."""
        batch, num_queries, num_classes = logits.shape
        k = min(self.select_box_nums_for_evaluation, num_queries * num_classes)
        prob = logits.sigmoid()
        scores, topk_index = torch.topk(prob.view(batch, -1), k, dim=1)
        query_index = torch.div(topk_index, num_classes, rounding_mode="floor")
        labels = topk_index % num_classes
        boxes = torch.gather(boxes, 1, query_index.unsqueeze(-1).expand(-1, -1, 4))
        return scores, labels, box_cxcywh_to_xyxy(boxes)

    def inference(
        self,
        logits: torch.Tensor,  # (N, Q, num_classes)
        boxes: torch.Tensor,  # (N, Q, 4) normalized cxcywh
        image_sizes: list[tuple[int, int]],
    ) -> list[Instances]:
        """Top-k (query, class) pairs per image; boxes in the network-input pixels."""
        scores, labels, boxes = self.select_top_detections(logits, boxes)
        results = []
        for i, (height, width) in enumerate(image_sizes):
            scale = boxes.new_tensor([width, height, width, height])
            result = Instances((height, width))
            result.pred_boxes = Boxes(boxes[i] * scale)
            result.scores = scores[i]
            result.pred_classes = labels[i]
            results.append(result)
        return results


def weight_losses(
    loss_dict: dict[str, torch.Tensor], weight_dict: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Multiply each loss by its weight. A per-layer loss (`loss_bbox_3`, `loss_class_enc`)
    takes its own entry when `weight_dict` has one, else the weight of its base name (the
    one-to-many losses, `loss_giou_one2many`, `loss_bbox_2_one2many`, likewise); losses with
    neither are left out of the total."""
    weighted = {}
    for name, value in loss_dict.items():
        weight = weight_dict.get(name)
        if weight is None:
            weight = weight_dict.get(re.sub(r"(_(\d+|enc))?(_one2many)?$", "", name))
        if weight is not None:
            weighted[name] = value * weight
    return weighted


def rescale_instances(result: Instances, output_height: int, output_width: int) -> Instances:
    """Scale predicted boxes from the network input size to the original image size and clip."""
    input_height, input_width = result.image_size
    scaled = Instances((int(output_height), int(output_width)), **result.get_fields())
    boxes = scaled.pred_boxes.clone()
    boxes.scale(output_width / input_width, output_height / input_height)
    boxes.clip(scaled.image_size)
    scaled.pred_boxes = boxes
    return scaled
