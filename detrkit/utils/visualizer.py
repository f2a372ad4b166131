"""Drawing detections, ground truth and deformable-attention sampling points with Pillow.

    vis = Visualizer(image_rgb, metadata)               # HxWx3 uint8, RGB
    picture = vis.draw_instance_predictions(instances)  # -> VisImage
    picture.save("out.jpg")                             # or picture.get_image() (RGB array)

Each class has a fixed colour (`class_color(class_id)`), so a class looks the same in every
picture. Labels use Pillow's default font at a size scaled to the image (`ImageFont.load_default(
size=...)`, Pillow >= 10.1; older Pillow falls back to its small bitmap font), on a filled box in
the class colour that is kept inside the image.

`draw_sampling_points` and `draw_colorbar` draw the paper's Figure 6: a reference point (a cross)
and the sampling points around it, each coloured by its attention weight, beside a colour bar;
`tile_panels` puts several such panels in a grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from detrkit.structures import BoxMode

__all__ = [
    "VisImage",
    "Visualizer",
    "class_color",
    "draw_colorbar",
    "draw_predictions_and_ground_truth",
    "draw_sampling_points",
    "font_size_for",
    "load_font",
    "tile_panels",
    "weight_colors",
]

# Distinct, saturated colours; class i takes entry i % len (RGB).
_PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128),
    (230, 190, 255), (170, 110, 40), (255, 225, 25), (128, 0, 0), (170, 255, 195),
    (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128), (255, 105, 180),
]  # fmt: skip

# Anchors of the attention-weight colour map, low to high (dark blue -> cyan -> yellow -> red).
_WEIGHT_ANCHORS = np.array(
    [[48, 18, 140], [30, 110, 230], [40, 200, 220], [120, 240, 90], [250, 220, 40], [230, 40, 20]],
    dtype=np.float64,
)


def class_color(class_id: int) -> tuple[int, int, int]:
    """The fixed RGB colour of contiguous class `class_id`."""
    return _PALETTE[int(class_id) % len(_PALETTE)]


def _text_color(background: Sequence[int]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b = background[:3]
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def font_size_for(height: int, width: int) -> int:
    """A label font size readable at any image size: about 1/40 of the geometric mean side,
    at least 10 px."""
    return max(10, round(math.sqrt(height * width) / 40))


def load_font(size: int) -> ImageFont.ImageFont:
    """Pillow's default font at `size` px (its bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


class VisImage:
    """A picture being drawn on: `get_image()` returns it as an HxWx3 uint8 RGB array."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def width(self) -> int:
        return self.image.width

    def get_image(self) -> np.ndarray:
        return np.asarray(self.image.convert("RGB")).copy()

    def save(self, path: str) -> None:
        """Write the picture; the format follows the file extension (jpg at quality 95)."""
        self.image.convert("RGB").save(path, quality=95)


def _as_pil(image: np.ndarray | Image.Image, scale: float = 1.0) -> Image.Image:
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(
                f"Visualizer: image must be an (H, W, 3) uint8 RGB array, got "
                f"{array.dtype} {tuple(array.shape)}"
            )
        pil = Image.fromarray(np.ascontiguousarray(array), "RGB")
    if scale != 1.0:
        size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        pil = pil.resize(size, Image.BILINEAR)
    return pil


class Visualizer:
    """Boxes with class names and scores on an RGB image (detectron2's Visualizer interface).

    Args:
        img_rgb: HxWx3 uint8 image in RGB order.
        metadata: anything with `thing_classes` (a MetadataCatalog entry); without it labels
            show the class index.
        scale: draw on the image resized by this factor (boxes are scaled with it).
    """

    def __init__(self, img_rgb: np.ndarray, metadata: Any = None, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ValueError(f"Visualizer: scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.output = VisImage(_as_pil(img_rgb, self.scale))
        self.class_names = list(getattr(metadata, "thing_classes", None) or [])
        self.font_size = font_size_for(self.output.height, self.output.width)
        self.font = load_font(self.font_size)
        self.line_width = max(1, round(self.font_size / 8))
        self._draw = ImageDraw.Draw(self.output.image)

    def class_name(self, class_id: int) -> str:
        if 0 <= class_id < len(self.class_names):
            return str(self.class_names[class_id])
        return f"class {class_id}"

    # ------------------------------------------------------------------ primitives
    def draw_box(
        self,
        box_xyxy: Sequence[float],
        color: Sequence[int],
        label: str | None = None,
        dashed: bool = False,
    ) -> VisImage:
        """An (x0, y0, x1, y1) box in original-image pixels, with an optional label on top."""
        x0, y0, x1, y1 = (float(v) * self.scale for v in box_xyxy)
        color = tuple(int(c) for c in color[:3])
        if dashed:
            self._dashed_rectangle((x0, y0, x1, y1), color)
        else:
            self._draw.rectangle((x0, y0, x1, y1), outline=color, width=self.line_width)
        if label:
            self.draw_label(label, (x0, y0), color)
        return self.output

    def _dashed_rectangle(self, box: tuple[float, float, float, float], color: tuple) -> None:
        x0, y0, x1, y1 = box
        dash = max(3, 3 * self.line_width)
        for a, b, fixed, horizontal in (
            (x0, x1, y0, True),
            (x0, x1, y1, True),
            (y0, y1, x0, False),
            (y0, y1, x1, False),
        ):
            start = a
            while start < b:
                end = min(start + dash, b)
                line = (start, fixed, end, fixed) if horizontal else (fixed, start, fixed, end)
                self._draw.line(line, fill=color, width=self.line_width)
                start += 2 * dash

    def draw_label(self, text: str, anchor_xy: tuple[float, float], color: Sequence[int]) -> None:
        """`text` on a filled box in `color`, just above `anchor_xy` (the box's top-left
        corner), or just below it when there is no room above; always inside the image."""
        left, top, right, bottom = self._draw.textbbox((0, 0), text, font=self.font)
        pad = max(1, self.font_size // 6)
        text_w, text_h = right - left + 2 * pad, bottom - top + 2 * pad
        img_w, img_h = self.output.width, self.output.height
        x, y = anchor_xy
        y = y - text_h if y - text_h >= 0 else y
        x = min(max(0.0, x), max(0.0, img_w - text_w))
        y = min(max(0.0, y), max(0.0, img_h - text_h))
        background = tuple(int(c) for c in color[:3])
        self._draw.rectangle((x, y, x + text_w - 1, y + text_h - 1), fill=background)
        self._draw.text(
            (x + pad - left, y + pad - top), text, font=self.font, fill=_text_color(background)
        )

    # ------------------------------------------------------------------ detections
    def draw_instance_predictions(self, predictions: Any, score_threshold: float = 0.0) -> VisImage:
        """Predicted boxes with "name score%" labels, lowest score drawn first (so the most
        confident labels stay on top). `predictions`: Instances with pred_boxes, scores,
        pred_classes (on any device)."""
        if len(predictions) == 0:
            return self.output
        boxes = _to_numpy(predictions.pred_boxes)
        scores = _to_numpy(predictions.scores) if predictions.has("scores") else None
        classes = _to_numpy(predictions.pred_classes).astype(int)
        order = np.argsort(scores) if scores is not None else np.arange(len(boxes))
        for i in order:
            if scores is not None and scores[i] < score_threshold:
                continue
            label = self.class_name(classes[i])
            if scores is not None:
                label = f"{label} {scores[i] * 100:.0f}%"
            self.draw_box(boxes[i], class_color(classes[i]), label)
        return self.output

    def draw_dataset_dict(self, record: dict) -> VisImage:
        """The ground-truth boxes of a dataset record (any supported `bbox_mode`), dashed, with
        their class names."""
        for annotation in record.get("annotations", []):
            box = BoxMode.convert(
                list(annotation["bbox"]),
                annotation.get("bbox_mode", BoxMode.XYWH_ABS),
                BoxMode.XYXY_ABS,
            )
            class_id = int(annotation["category_id"])
            self.draw_box(box, class_color(class_id), self.class_name(class_id), dashed=True)
        return self.output

    def get_output(self) -> VisImage:
        return self.output


def _to_numpy(values: Any) -> np.ndarray:
    tensor = getattr(values, "tensor", values)  # Boxes -> its (N, 4) tensor
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().float().cpu().numpy()
    return np.asarray(tensor)


# ---------------------------------------------------------------------- sampling points
def weight_colors(weights: np.ndarray, vmax: float) -> np.ndarray:
    """Colours (N, 3) uint8 of attention weights on the scale 0..vmax (piecewise-linear map
    from dark blue through cyan and yellow to red)."""
    t = np.clip(np.asarray(weights, dtype=np.float64) / max(float(vmax), 1e-12), 0.0, 1.0)
    position = t * (len(_WEIGHT_ANCHORS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_WEIGHT_ANCHORS) - 2)
    frac = (position - low)[..., None]
    colors = _WEIGHT_ANCHORS[low] * (1 - frac) + _WEIGHT_ANCHORS[low + 1] * frac
    return np.rint(colors).astype(np.uint8)


def draw_colorbar(height: int, vmax: float, label: str = "attention weight") -> np.ndarray:
    """A vertical colour bar (HxWx3 uint8) for weights 0..vmax, with ticks at 0, vmax/2 and
    vmax and a label at the top."""
    font_size = max(10, min(height // 30, 20))
    font = load_font(font_size)
    bar_width = max(12, font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    ticks = [f"{v:.3g}" for v in (vmax, vmax / 2, 0.0)]
    text_width = max(probe.textbbox((0, 0), t, font=font)[2] for t in ticks)
    label_width = probe.textbbox((0, 0), label, font=font)[2]
    width = max(bar_width + 8 + text_width + 6, label_width + 6)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    top = font_size + 8
    bottom = height - font_size // 2 - 4
    span = max(bottom - top, 1)
    rows = np.linspace(1.0, 0.0, span)  # top of the bar = vmax
    colors = weight_colors(rows * vmax, vmax)
    bar = np.repeat(colors[:, None, :], bar_width, axis=1)
    canvas.paste(Image.fromarray(bar, "RGB"), (3, top))
    draw.rectangle((3, top, 3 + bar_width - 1, top + span - 1), outline=(0, 0, 0))
    draw.text((3, 2), label, font=font, fill=(0, 0, 0))
    for text, frac in zip(ticks, (0.0, 0.5, 1.0)):
        y = top + frac * (span - 1)
        draw.line((3 + bar_width, y, 3 + bar_width + 4, y), fill=(0, 0, 0))
        box = draw.textbbox((0, 0), text, font=font)
        draw.text((3 + bar_width + 7, y - (box[1] + box[3]) / 2), text, font=font, fill=(0, 0, 0))
    return np.asarray(canvas)


def draw_sampling_points(
    image_rgb: np.ndarray,
    reference_xy: Sequence[float],
    points_xy: np.ndarray,
    weights: np.ndarray,
    vmax: float | None = None,
    box_xyxy: Sequence[float] | None = None,
    box_color: Sequence[int] = (255, 255, 255),
    title: str | None = None,
    scale: float = 1.0,
) -> np.ndarray:
    """One panel of the paper's Figure 6: the image (dimmed), an optional box, the sampling
    points `points_xy` (K, 2) in image pixels as filled circles coloured by `weights` (K,)
    on 0..vmax (default: the largest weight), the lowest weights drawn first, and the
    reference point as a cross. Returns an HxWx3 uint8 RGB array."""
    points = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2) * scale
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(points) != len(weights):
        raise ValueError(
            f"draw_sampling_points: {len(points)} points but {len(weights)} weights; one weight "
            "per point"
        )
    vmax = float(weights.max()) if vmax is None and len(weights) else float(vmax or 1.0)
    base = _as_pil(image_rgb, scale)
    panel = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), 0.45)
    draw = ImageDraw.Draw(panel)
    size = font_size_for(panel.height, panel.width)
    radius = max(2.0, size / 5)
    if box_xyxy is not None:
        x0, y0, x1, y1 = (float(v) * scale for v in box_xyxy)
        draw.rectangle((x0, y0, x1, y1), outline=tuple(box_color), width=max(1, size // 8))
    colors = weight_colors(weights, vmax)
    for i in np.argsort(weights, kind="stable"):
        x, y = points[i]
        draw.ellipse(
            (x - radius, y - radius, x + radius, y + radius),
            fill=tuple(int(c) for c in colors[i]),
            outline=(0, 0, 0),
        )
    cx, cy = (float(v) * scale for v in reference_xy)
    arm, width = 2.2 * radius, max(2, size // 5)
    for color, w in (((0, 0, 0), width + 2), ((255, 255, 255), width)):
        draw.line((cx - arm, cy - arm, cx + arm, cy + arm), fill=color, width=w)
        draw.line((cx - arm, cy + arm, cx + arm, cy - arm), fill=color, width=w)
    if title:
        vis = Visualizer(np.asarray(panel))
        vis.draw_label(title, (0, 0), (255, 255, 255))
        return vis.get_output().get_image()
    return np.asarray(panel).copy()


def tile_panels(
    panels: Sequence[np.ndarray],
    columns: int | None = None,
    colorbar_vmax: float | None = None,
    gap: int = 4,
) -> np.ndarray:
    """Panels (HxWx3 uint8, any sizes) in a grid on white, `columns` per row (default: about
    square), with a colour bar for weights 0..colorbar_vmax on the right when it is given."""
    if not panels:
        raise ValueError("tile_panels: no panels to tile")
    columns = columns or math.ceil(math.sqrt(len(panels)))
    rows = math.ceil(len(panels) / columns)
    cell_h = max(p.shape[0] for p in panels)
    cell_w = max(p.shape[1] for p in panels)
    grid_w = columns * cell_w + (columns - 1) * gap
    grid_h = rows * cell_h + (rows - 1) * gap
    colorbar = None
    if colorbar_vmax is not None:
        colorbar = draw_colorbar(max(grid_h, 120), colorbar_vmax)
    bar_w = 0 if colorbar is None else colorbar.shape[1] + gap
    height = grid_h if colorbar is None else max(grid_h, colorbar.shape[0])
    canvas = Image.new("RGB", (grid_w + bar_w, height), (255, 255, 255))
    for i, panel in enumerate(panels):
        r, c = divmod(i, columns)
        canvas.paste(Image.fromarray(panel, "RGB"), (c * (cell_w + gap), r * (cell_h + gap)))
    if colorbar is not None:
        canvas.paste(Image.fromarray(colorbar, "RGB"), (grid_w + gap, 0))
    return np.asarray(canvas).copy()


def draw_predictions_and_ground_truth(
    image_rgb: np.ndarray,
    predictions: Any,
    gt_boxes_xyxy: np.ndarray,
    gt_classes: Sequence[int],
    metadata: Any = None,
    score_threshold: float = 0.5,
) -> np.ndarray:
    """Two panels side by side: the predictions scoring >= score_threshold, and the ground-truth
    boxes (dashed), each titled; an HxWx3 uint8 RGB picture."""
    left = Visualizer(image_rgb, metadata)
    left.draw_instance_predictions(predictions, score_threshold)
    left.draw_label(f"predictions >= {score_threshold:g}", (0, 0), (255, 255, 255))
    right = Visualizer(image_rgb, metadata)
    for box, class_id in zip(np.asarray(gt_boxes_xyxy).reshape(-1, 4), gt_classes):
        right.draw_box(box, class_color(class_id), right.class_name(int(class_id)), dashed=True)
    right.draw_label("ground truth", (0, 0), (255, 255, 255))
    return tile_panels([left.get_output().get_image(), right.get_output().get_image()], columns=2)
