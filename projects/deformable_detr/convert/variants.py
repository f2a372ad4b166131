"""The five released Deformable-DETR models (ResNet-50, 50 epochs), the configs that build them,
and telling from a state dict which one it holds.

The weights alone give (feature levels, box refinement, two-stage); single scale and single
scale DC5 have the same weights, told apart by the recorded training arguments or `--variant`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from detrkit.checkpoint.convert import ConversionError, wrong_source_message

__all__ = ["VARIANTS", "Variant", "describe_structure", "read_structure", "resolve_variant"]


@dataclass(frozen=True)
class Variant:
    """One released Deformable-DETR model: its structure and the config that builds it."""

    name: str
    title: str
    config: str  # relative to the repository root
    num_feature_levels: int
    dilated_res5: bool
    with_box_refine: bool
    as_two_stage: bool
    official_ap: float

    @property
    def structure(self) -> tuple[int, bool, bool]:
        """What the weights alone tell apart: (levels, box refinement, two-stage)."""
        return (self.num_feature_levels, self.with_box_refine, self.as_two_stage)


_CONFIGS = "projects/deformable_detr/configs"

# The five models of the official repository's results table (ResNet-50, 50 epochs).
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "single_scale", "single scale", f"{_CONFIGS}/deformable_detr_r50_single_scale_50ep.py",
            1, False, False, False, 39.4,
        ),
        Variant(
            "single_scale_dc5", "single scale DC5",
            f"{_CONFIGS}/deformable_detr_r50_single_scale_dc5_50ep.py", 1, True, False, False, 41.5,
        ),
        Variant(
            "deformable_detr", "multi-scale", f"{_CONFIGS}/deformable_detr_r50_50ep.py",
            4, False, False, False, 44.5,
        ),
        Variant(
            "refine", "+ iterative box refinement",
            f"{_CONFIGS}/deformable_detr_r50_with_box_refinement_50ep.py",
            4, False, True, False, 46.2,
        ),
        Variant(
            "two_stage", "++ two-stage", f"{_CONFIGS}/deformable_detr_r50_two_stage_50ep.py",
            4, False, True, True, 46.9,
        ),
    )
}  # fmt: skip


def describe_structure(structure: tuple[int, bool, bool]) -> str:
    levels, refine, two_stage = structure
    return (
        f"{levels} feature level{'s' if levels != 1 else ''}, "
        f"box refinement {'on' if refine else 'off'}, two-stage {'on' if two_stage else 'off'}"
    )


def resolve_variant(
    path: str,
    structure: tuple[int, bool, bool],
    requested: str | None,
    dilation: bool | None,
    dilation_source: str = "args.dilation",
) -> Variant:
    """The variant a file holds, from its structure, its recorded `dilation` and `--variant`.

    Single scale and single scale DC5 have identical weights; only the recorded training
    arguments (or the user) can tell them apart.
    """
    candidates = [v for v in VARIANTS.values() if v.structure == structure]
    if not candidates:
        known = "; ".join(f"{v.name}: {describe_structure(v.structure)}" for v in VARIANTS.values())
        raise ConversionError(
            f"{path}: the weights describe {describe_structure(structure)}, which is none of the "
            f"released variants ({known})"
        )
    if requested is not None and requested not in VARIANTS:
        raise ConversionError(
            f"--variant {requested!r} is unknown; accepted: {', '.join(VARIANTS)}"
        )
    if dilation is not None:
        matching = [v for v in candidates if v.dilated_res5 == bool(dilation)]
        if not matching:
            raise ConversionError(
                f"{path}: {dilation_source}={dilation} but the weights describe "
                f"{describe_structure(structure)}, and no released variant has both"
            )
        candidates = matching
    if requested is not None:
        chosen = VARIANTS[requested]
        if chosen not in candidates:
            found = " or ".join(v.name for v in candidates)
            why = f" ({dilation_source}={dilation})" if dilation is not None else ""
            raise ConversionError(
                f"--variant {requested} does not match {path}, which holds {found}{why}: "
                f"{describe_structure(structure)}"
            )
        return chosen
    if len(candidates) > 1:
        names = " or ".join(f"--variant {v.name}" for v in candidates)
        raise ConversionError(
            f"{path} holds single-scale weights but does not record {dilation_source} (single "
            f"scale and DC5 have the same weights); say which it is with {names}"
        )
    return candidates[0]


def read_structure(
    path: str,
    state: Mapping[str, torch.Tensor],
    source: str,
    level_key: str,
    known_keys: set[str],
    description: str,
) -> tuple[int, bool, bool]:
    """(feature levels, box refinement, two-stage) of a Deformable DETR state dict whose level
    embedding is named `level_key`; a file without it is refused, naming its unknown keys."""
    if level_key not in state:
        unknown = [k for k in state if k not in known_keys]
        if not unknown:
            raise ConversionError(
                f"{path} is not a complete {description} checkpoint: it lacks {level_key}"
            )
        raise ConversionError(wrong_source_message(path, source, state.keys(), unknown))
    levels = int(state[level_key].shape[0])
    with_box_refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in state)
    as_two_stage = "transformer.enc_output.weight" in state
    return levels, with_box_refine, as_two_stage
