"""Generated COCO- and LVIS-format detection sets (polygon masks) for the plugin tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _polygons(rng, w, h, n):
    """n non-overlapping-ish rectangles / triangles as COCO polygons (exact masks)."""
    out = []
    for i in range(n):
        x0 = 4 + i * (w // n)
        bw = rng.integers(w // (2 * n), w // n - 6)
        bh = rng.integers(h // 3, h - 10)
        y0 = rng.integers(2, h - bh - 2)
        x1, y1 = x0 + bw, y0 + bh
        if i % 2 == 0:
            poly = [x0, y0, x1, y0, x1, y1, x0, y1]
        else:
            poly = [x0, y1, (x0 + x1) / 2, y0, x1, y1]
        out.append([float(v) for v in poly])
    return out


def write_detection_set(root: Path, split: str, num_images: int, category_ids: list[int],
                        lvis: bool = False, size=(128, 96), seed: int = 0,
                        num_categories: int | None = None) -> tuple[Path, Path]:
    """Write images + annotation json; returns (json file, image root for Detectron2).

    Annotations use ``category_ids``; the category list is ids ``1..num_categories`` when
    given (so that a model with that many classes matches the dataset), else ``category_ids``.

    COCO format: images under ``root/split``. LVIS format: ``coco_url`` names the split
    folder and Detectron2 joins it to the image root, as for real LVIS v0.5.
    """
    rng = np.random.default_rng(seed)
    w, h = size
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 80, 3)))
        draw = ImageDraw.Draw(img)
        polys = _polygons(rng, w, h, 3)
        name = f"{i:06d}.png"
        entry = {"id": i + 1, "file_name": name, "height": h, "width": w}
        if lvis:
            entry.update(coco_url=f"http://images.example/{split}/{name}",
                         not_exhaustive_category_ids=[], neg_category_ids=[])
        images.append(entry)
        for j, poly in enumerate(polys):
            cat = category_ids[(i + j) % len(category_ids)]
            draw.polygon(poly, fill=tuple(int(c) for c in rng.integers(120, 255, 3)))
            xs, ys = poly[0::2], poly[1::2]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            area = bbox[2] * bbox[3] * (1.0 if len(poly) == 8 else 0.5)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat,
                         "segmentation": [poly], "bbox": bbox, "area": area, "iscrowd": 0})
        img.save(img_dir / name)
    listed = range(1, num_categories + 1) if num_categories else category_ids
    cats = [{"id": c, "name": f"cat{c}", "supercategory": "thing"} for c in listed]
    if lvis:
        for c in cats:
            c.update(frequency="f", synonyms=[c["name"]], image_count=num_images,
                     instance_count=num_images)
    ann_file = root / f"{split}.json"
    with open(ann_file, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return ann_file, (root if lvis else img_dir)
