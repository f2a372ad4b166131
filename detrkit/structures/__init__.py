"""Data structures passed between the data pipeline, the model and the evaluator."""

from .boxes import Boxes, BoxMode
from .image_list import ImageList
from .instances import Instances

__all__ = ["BoxMode", "Boxes", "ImageList", "Instances"]
