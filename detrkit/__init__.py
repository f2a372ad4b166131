"""detrkit: Deformable DETR with a detrex-style surface, on a laptop CPU, one GPU or many."""

__version__ = "0.1.0"
