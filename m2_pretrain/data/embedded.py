"""The embedded default dataset: deterministic procedurally drawn shapes with labels.

No download, any resolution (32–96 px is the intended range). Image ``i`` depends only on
``(seed, i)``: class ``i % num_classes`` is the shape kind, colours, size, position and
background vary. Each image also has an instance mask and a box, so the same data serves as a
tiny COCO-format detection set.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

SHAPES = (
    "disk",
    "square",
    "triangle",
    "ring",
    "cross",
    "hstripes",
    "vstripes",
    "checker",
    "diamond",
    "ellipse",
)

PALETTES = {
    # six saturated colours shared by all classes: the colours say nothing about the class
    "colour": np.array([[230, 60, 50], [40, 160, 70], [50, 90, 220], [240, 210, 60],
                        [30, 30, 40], [235, 235, 230]], dtype=np.float64),
    # dark and light: a dark shape on a light ground or the reverse. The colours say nothing
    # about the class *or* the image, so the only things two crops of one image share, and
    # self-supervision can latch on to, are the shape, its size and orientation. (With the six
    # colours, a ResNet-18 pretrained for a few hundred steps matched crops by their colour
    # pair and its kNN fell below chance.) `make demo` uses this one.
    "two_tone": np.array([[40, 40, 50], [220, 220, 210]], dtype=np.float64),
}


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a shape in normalised coordinates (centre 0, half-size 1)."""
    ay, ax = np.abs(yy), np.abs(xx)
    if kind == "disk":
        return yy**2 + xx**2 <= 1.0
    if kind == "square":
        return (ay <= 0.85) & (ax <= 0.85)
    if kind == "triangle":
        return (yy <= 0.9) & (ax <= (yy + 0.9) / 1.8 * 0.95)
    if kind == "ring":
        r2 = yy**2 + xx**2
        return (r2 <= 1.0) & (r2 >= 0.36)
    if kind == "cross":
        return ((ay <= 0.3) & (ax <= 1.0)) | ((ax <= 0.3) & (ay <= 1.0))
    if kind == "diamond":
        return ay + ax <= 1.0
    if kind == "ellipse":
        return (yy / 0.55) ** 2 + (xx / 1.0) ** 2 <= 1.0
    box = (ay <= 0.9) & (ax <= 0.9)
    period = rng.uniform(0.4, 0.55)
    if kind == "hstripes":
        return box & (np.floor((yy + 1) / period) % 2 == 0)
    if kind == "vstripes":
        return box & (np.floor((xx + 1) / period) % 2 == 0)
    if kind == "checker":
        return box & ((np.floor((yy + 1) / period) + np.floor((xx + 1) / period)) % 2 == 0)
    raise ValueError(kind)


def render_sample(index: int, res: int, num_classes: int = 10, seed: int = 0,
                  palette: str = "colour") -> dict:
    """Draw image ``index`` with the colours of ``PALETTES[palette]``.

    Returns:
        dict with ``image`` (H, W, 3) uint8, ``label`` int, ``mask`` (H, W) bool and ``bbox``
        [x0, y0, w, h] (float, pixels, COCO convention).
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in [1, {len(SHAPES)}], got {num_classes}")
    if palette not in PALETTES:
        raise ValueError(f"palette must be one of {sorted(PALETTES)}, got {palette!r}")
    colours = PALETTES[palette]
    rng = np.random.default_rng([seed, index])
    label = index % num_classes
    kind = SHAPES[label]
    ys, xs = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
    # Colours come from a palette shared by all classes (see PALETTES).
    bg, fg = rng.choice(len(colours), size=2, replace=False)
    c0 = colours[bg] + rng.normal(0, 10, 3)
    c1 = np.clip(c0 + rng.normal(0, 20, 3), 0, 255)
    t = (np.cos(rng.uniform(0, 2 * np.pi)) * xs + np.sin(rng.uniform(0, 2 * np.pi)) * ys) / res
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img += rng.normal(0, 5, img.shape)
    # the object
    half = rng.uniform(0.28, 0.42) * res
    cy, cx = rng.uniform(half, res - half, 2)
    angle = rng.uniform(-0.4, 0.4)
    ca, sa = np.cos(angle), np.sin(angle)
    dy, dx = (ys - cy) / half, (xs - cx) / half
    yy, xx = ca * dy - sa * dx, sa * dy + ca * dx
    mask = _shape_mask(kind, yy, xx, rng)
    colour = colours[fg] + rng.normal(0, 10, 3)
    img[mask] = colour + rng.normal(0, 6, (int(mask.sum()), 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    if mask.any():
        rows, cols = np.where(mask)
        bbox = [float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1),
                float(rows.max() - rows.min() + 1)]
    else:
        bbox = [0.0, 0.0, 0.0, 0.0]
    return {"image": img, "label": label, "mask": mask, "bbox": bbox}


class EmbeddedShapes(Dataset):
    """``(PIL image, label)`` pairs drawn on the fly, deterministic in ``(seed, index)``.

    Args:
        num_images: dataset length.
        res: image side in pixels.
        num_classes: number of shape classes (<= 10).
        seed: dataset seed; use different seeds for train and test splits.
        transform: applied to the PIL image.
        palette: ``"colour"`` or ``"two_tone"`` (see ``PALETTES``).
    """

    def __init__(self, num_images: int = 2000, res: int = 64, num_classes: int = 10,
                 seed: int = 0, transform=None, palette: str = "colour") -> None:
        if num_images <= 0:
            raise ValueError(f"num_images must be positive, got {num_images}")
        if not 1 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in [1, {len(SHAPES)}], got {num_classes}")
        self.num_images, self.res, self.num_classes, self.seed = num_images, res, num_classes, seed
        if palette not in PALETTES:
            raise ValueError(f"palette must be one of {sorted(PALETTES)}, got {palette!r}")
        self.transform, self.palette = transform, palette
        self.targets = [i % num_classes for i in range(num_images)]
        self.classes = list(SHAPES[:num_classes])

    def __len__(self) -> int:
        return self.num_images

    def image_name(self, index: int) -> str:
        return f"shape_{self.seed}_{index:06d}.png"

    def __getitem__(self, index: int):
        s = render_sample(index, self.res, self.num_classes, self.seed, self.palette)
        if getattr(self.transform, "accepts_array", False):
            return self.transform(s["image"]), s["label"]
        img = Image.fromarray(s["image"])
        if self.transform is not None:
            img = self.transform(img)
        return img, s["label"]
