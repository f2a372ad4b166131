"""Conversions of Deformable DETR weights from and to other code bases' layouts."""
