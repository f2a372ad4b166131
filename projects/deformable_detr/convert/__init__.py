"""Deformable-DETR checkpoints of other codebases -> this project's state-dict names.

- `official.py`: checkpoints of the official Deformable-DETR code (renamed, 91-way class heads
  cut to the 80 COCO rows, variant detected);
- `detrex.py`: detrex checkpoints, already in our names (checked, written as `{"model": ...}`);
- `variants.py`: the five released models and the configs that build them.

Importing this package (`import projects.deformable_detr` does) registers both layouts and
converters with `detrkit.checkpoint.convert`: `tools/convert_weights.py --source official` and
`--source detrex` run them, and `DetectionCheckpointer` refuses an unconverted official
checkpoint with the conversion command.
"""

from detrkit.checkpoint.convert import register_converter, register_layout

from .detrex import convert_detrex, detrex_layout, is_detrex_checkpoint
from .official import (
    OFFICIAL_NUM_CLASSES,
    convert_official,
    head_aliases,
    is_official_checkpoint,
    official_layout,
    official_to_detrex_name,
    refuse_unconverted,
)
from .variants import VARIANTS, Variant, describe_structure, read_structure, resolve_variant

__all__ = [
    "OFFICIAL_NUM_CLASSES",
    "VARIANTS",
    "Variant",
    "convert_detrex",
    "convert_official",
    "describe_structure",
    "detrex_layout",
    "head_aliases",
    "is_detrex_checkpoint",
    "is_official_checkpoint",
    "official_layout",
    "official_to_detrex_name",
    "read_structure",
    "resolve_variant",
]

register_layout(
    "official",
    is_official_checkpoint,
    hint="{path} is an official Deformable-DETR checkpoint (transformer.level_embed, "
    "input_proj.*, backbone.0.body.*; class heads indexed by COCO category id), not "
    "{expected}: convert it with --source official",
    on_load=refuse_unconverted,
)
register_layout(
    "detrex",
    is_detrex_checkpoint,
    hint="{path} already uses detrex names (transformer.level_embeds, neck.*), not {expected}: "
    "it loads without conversion (--source detrex checks it)",
)
register_converter(
    "official",
    convert_official,
    description="an official Deformable-DETR checkpoint",
    options=("variant", "keep_all_classes"),
)
register_converter(
    "detrex",
    convert_detrex,
    description="a detrex Deformable DETR checkpoint",
    options=("variant", "use_ema", "keep_all_classes"),
)
