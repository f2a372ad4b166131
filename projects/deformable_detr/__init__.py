"""Deformable DETR (Zhu et al., ICLR 2021): all five variants of the paper.

`modeling/` is the model, `configs/` the lazy configs, `convert/` the converters of official and
detrex checkpoints (imported here, so that any use of the project registers them).
"""

from . import convert  # noqa: F401  (registers --source official / detrex and the load hook)
