"""Deformable DETR (Zhu et al., ICLR 2021): all five variants of the paper."""
