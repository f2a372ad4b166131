"""Weight conversion into detrkit's state-dict names: the generic part.

- `registry.py`: how a project teaches detrkit a checkpoint layout (`register_layout`) and a
  converter (`register_converter`), and `convert_checkpoint` / `convert_file`, which run the
  converter of a `--source` name;
- `common.py`: the error and result types, reading the input, layout checks, `save_converted`;
- `torchvision.py`: ImageNet ResNets in torchvision's names (`--source torchvision`; also
  renamed on the fly by `DetectionCheckpointer`);
- `caffe2.py`: detectron2's Caffe2-named ResNets, recognized and refused.

Model-specific converters live with their project: `projects/deformable_detr/convert/` registers
`--source official` and `--source detrex` when the project is imported.
`tools/convert_weights.py` is the command line.
"""

from .caffe2 import CAFFE2_MESSAGE, is_caffe2_resnet
from .common import (
    ConversionError,
    ConversionResult,
    check_aliases,
    check_layout,
    first,
    model_state,
    read_checkpoint,
    save_converted,
    strip_prefix,
)
from .registry import (
    Converter,
    Layout,
    convert_checkpoint,
    convert_file,
    find_layout,
    register_converter,
    register_layout,
    registered_sources,
    wrong_source_message,
)
from .torchvision import (
    convert_torchvision,
    is_torchvision_resnet,
    rename_torchvision_resnet,
    resnet_layout,
    torchvision_to_detectron2_name,
)

__all__ = [
    "CAFFE2_MESSAGE",
    "ConversionError",
    "ConversionResult",
    "Converter",
    "Layout",
    "check_aliases",
    "check_layout",
    "convert_checkpoint",
    "convert_file",
    "convert_torchvision",
    "find_layout",
    "first",
    "is_caffe2_resnet",
    "is_torchvision_resnet",
    "model_state",
    "read_checkpoint",
    "register_converter",
    "register_layout",
    "registered_sources",
    "rename_torchvision_resnet",
    "resnet_layout",
    "save_converted",
    "strip_prefix",
    "torchvision_to_detectron2_name",
    "wrong_source_message",
]
