"""detrex Deformable DETR checkpoints: already in our names; checked, not renamed.

Our model's state-dict keys are detrex's, so a detrex checkpoint loads as it is
(`train.init_checkpoint=model_final.pth`). `--source detrex` is a check before a long run: it
accepts `{"model": state_dict, ...}` (a training checkpoint: `trainer`, `iteration` and other
entries are dropped), a bare state dict or, with `use_ema`, the `ema_state` the EMA hook saves,
checks the keys and shapes against the layout of a released variant and that aliased heads are
identical, and writes `{"model": state_dict}`.

A 91-way class head is refused: that is the official layout (rows indexed by COCO category id),
whose 80 COCO rows `--source official` keeps.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from detrkit.checkpoint.convert import (
    ConversionError,
    ConversionResult,
    check_aliases,
    check_layout,
    model_state,
    strip_prefix,
)

from .official import (
    DEFAULT_NUM_QUERIES,
    OFFICIAL_NUM_CLASSES,
    head_aliases,
    official_layout,
    official_to_detrex_name,
)
from .variants import VARIANTS, read_structure, resolve_variant

__all__ = ["convert_detrex", "detrex_layout", "is_detrex_checkpoint"]

_TRAINING_STATE = ("trainer", "iteration", "optimizer", "scheduler", "ema_state")


def detrex_layout(
    num_feature_levels: int,
    with_box_refine: bool,
    as_two_stage: bool,
    num_classes: int = 80,
    num_queries: int = DEFAULT_NUM_QUERIES,
) -> OrderedDict[str, tuple[int, ...]]:
    """`{key: shape}` of our model's state dict for a variant: the official layout renamed."""
    official = official_layout(
        num_feature_levels, with_box_refine, as_two_stage, num_classes, num_queries
    )
    return OrderedDict(
        (official_to_detrex_name(key, num_feature_levels), shape) for key, shape in official.items()
    )


def is_detrex_checkpoint(keys: Iterable[str]) -> bool:
    """True for a state dict in detrex's Deformable DETR names (this project's own)."""
    keys = set(keys)
    return "transformer.level_embeds" in keys or any(k.startswith("neck.convs.") for k in keys)


def _all_detrex_keys() -> set[str]:
    keys: set[str] = set()
    for variant in VARIANTS.values():
        keys.update(detrex_layout(*variant.structure))
    return keys


def convert_detrex(
    data: Any,
    path: str,
    variant: str | None = None,
    use_ema: bool = False,
    keep_all_classes: bool = False,
) -> ConversionResult:
    """Check a loaded detrex checkpoint (`data`, read from `path`) and return its model weights
    (or, with `use_ema`, its EMA weights) with aliases sharing one tensor."""
    if use_ema:
        ema = data.get("ema_state") if isinstance(data, Mapping) else None
        if not isinstance(ema, Mapping):
            raise ConversionError(
                f"{path} has no 'ema_state' (it is saved when training with "
                "train.model_ema.enabled=True); drop --use-ema to take its 'model' weights"
            )
        state = model_state(ema, path, expected="EMA weights under 'ema_state'")
    else:
        state = model_state(data, path, expected="a detrex Deformable DETR checkpoint")
    state = strip_prefix(state, "module.")

    levels, with_box_refine, as_two_stage = read_structure(
        path,
        state,
        "detrex",
        "transformer.level_embeds",
        _all_detrex_keys(),
        "detrex Deformable DETR",
    )
    head = state.get("class_embed.0.weight")
    num_classes = int(head.shape[0]) if head is not None and head.dim() == 2 else 80
    if num_classes == OFFICIAL_NUM_CLASSES and not keep_all_classes:
        raise ConversionError(
            f"{path} has {OFFICIAL_NUM_CLASSES}-way class heads (class_embed.0.weight is "
            f"{tuple(head.shape)}): that is the official layout, indexed by COCO category id, "
            "while a detrex COCO model has 80 contiguous classes. Convert the official "
            "checkpoint with --source official (which keeps the 80 COCO rows), or pass "
            f"--keep-all-classes if your model really has {OFFICIAL_NUM_CLASSES} classes"
        )
    chosen = resolve_variant(
        path,
        (levels, with_box_refine, as_two_stage),
        variant,
        None,
        dilation_source="whether res5 is dilated",
    )
    queries = state.get("query_embedding.weight")
    num_queries = int(queries.shape[0]) if queries is not None else DEFAULT_NUM_QUERIES
    layout = detrex_layout(levels, with_box_refine, as_two_stage, num_classes, num_queries)
    check_layout(path, state, layout, f"the detrex Deformable DETR layout ({chosen.name})")
    aliases = head_aliases(with_box_refine, as_two_stage)
    check_aliases(path, state, aliases)

    out: OrderedDict[str, torch.Tensor] = OrderedDict(
        (key, state[aliases[key][0]] if key in aliases else value) for key, value in state.items()
    )
    what = "EMA weights" if use_ema else "weights"
    notes = [
        f"detrex {chosen.title} checkpoint ({chosen.name}, {num_classes} classes): "
        f"{len(out)} tensors of {what}, names unchanged"
    ]
    if isinstance(data, Mapping):
        dropped = [k for k in _TRAINING_STATE if k in data and not (use_ema and k == "ema_state")]
        if dropped:
            notes.append(f"dropped the training state: {', '.join(dropped)}")
        if "ema_state" in data and not use_ema:
            notes.append("the file also has EMA weights (ema_state): --use-ema exports them")
    return ConversionResult(model=out, variant=chosen, notes=notes)
