"""Datasets for the plugin: the embedded shapes set in COCO format, and one-line registration
of any COCO-format dataset.

COCO 2017 and LVIS v0.5 use Detectron2's built-in registration (``coco_2017_train``,
``lvis_v0.5_train``, ...), which reads ``$DETECTRON2_DATASETS`` (default ``./datasets``).

The embedded set (``shapes_coco_train`` / ``shapes_coco_val``) is drawn by
:mod:`m2_pretrain.data.embedded`: each image is a ``grid x grid`` mosaic of tiles, one shape
per tile, so an image has several instances of the 10 shape classes, each a dark shape on a
light ground or the reverse (the ``two_tone`` palette `make demo` pretrains on). Masks are
exact and stored as RLE, so configs using it set ``INPUT.MASK_FORMAT: bitmask``. Files are
generated on first use under ``$DETECTRON2_DATASETS/m2_shapes_v2`` (no download).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from m2_pretrain.data.embedded import SHAPES, render_sample

# name -> (split directory, number of images, seed); tile side 48 px, 2 x 2 tiles -> 96 px.
EMBEDDED_SPLITS = {
    "shapes_coco_train": ("train", 800, 100),
    "shapes_coco_val": ("val", 100, 101),
}
TILE, GRID = 48, 2


def datasets_root() -> Path:
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def embedded_root() -> Path:
    return datasets_root() / "m2_shapes_v2"  # v2: two-tone shapes


def _categories() -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)]


def render_mosaic(index: int, seed: int, tile: int = TILE, grid: int = GRID):
    """Image ``index`` of the detection set: (H, W, 3) uint8 and a list of
    ``(category_id, mask)`` with one instance per tile."""
    img = np.zeros((tile * grid, tile * grid, 3), np.uint8)
    instances = []
    for t in range(grid * grid):
        r, c = divmod(t, grid)
        # render_sample draws class ``i % 10`` for sample ``i``: pick a distinct sample index
        # per tile whose class is drawn at random, so classes are not tied to tile positions.
        label = int(np.random.default_rng([seed, index, t]).integers(len(SHAPES)))
        s = render_sample((index * grid * grid + t) * len(SHAPES) + label, tile,
                          num_classes=len(SHAPES), seed=seed, palette="two_tone")
        img[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = s["image"]
        full = np.zeros(img.shape[:2], bool)
        full[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = s["mask"]
        if full.any():
            instances.append((s["label"] + 1, full))
    return img, instances


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    x, y, w, h = (float(v) for v in mask_util.toBbox(rle))
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": rle,
            "area": float(mask.sum()), "bbox": [x, y, w, h], "iscrowd": 0}


def write_embedded_coco(root: str | Path, split: str, num_images: int, seed: int,
                        tile: int = TILE, grid: int = GRID) -> Path:
    """Write ``root/<split>/*.png`` and ``root/annotations/instances_<split>.json``.

    Written to a temporary directory first and moved into place, so an interrupted run never
    leaves a half-written split behind. Returns the annotation file.
    """
    root = Path(root)
    ann_file = root / "annotations" / f"instances_{split}.json"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{split}-"))
    try:
        images, anns = [], []
        for i in range(num_images):
            img, instances = render_mosaic(i, seed, tile, grid)
            name = f"{split}_{i:06d}.png"
            Image.fromarray(img).save(tmp / name)
            images.append({"id": i + 1, "file_name": name, "height": img.shape[0],
                           "width": img.shape[1]})
            for cat, mask in instances:
                anns.append(_annotation(len(anns) + 1, i + 1, cat, mask))
        payload = {"info": {"description": f"m2_teacher embedded shapes ({split}, seed {seed})"},
                   "images": images, "annotations": anns, "categories": _categories()}
        ann_file.parent.mkdir(parents=True, exist_ok=True)
        tmp_json = ann_file.with_name(f".{ann_file.name}.tmp")
        with open(tmp_json, "w") as f:
            json.dump(payload, f)
        if (root / split).exists():
            shutil.rmtree(root / split)
        tmp.rename(root / split)
        tmp_json.replace(ann_file)  # last: the annotation file marks a complete split
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ann_file


def ensure_embedded(name: str, root: str | Path | None = None) -> tuple[Path, Path]:
    """Generate the files of embedded dataset ``name`` if they are missing; returns
    ``(annotation file, image directory)``."""
    split, n, seed = EMBEDDED_SPLITS[name]
    root = Path(root) if root is not None else embedded_root()
    ann_file, image_dir = root / "annotations" / f"instances_{split}.json", root / split
    if not (ann_file.exists() and image_dir.is_dir()):
        write_embedded_coco(root, split, n, seed)
    return ann_file, image_dir


def register_embedded(root: str | Path | None = None) -> None:
    """Register ``shapes_coco_train`` / ``shapes_coco_val`` (idempotent)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    root = Path(root) if root is not None else embedded_root()
    for name, (split, _, _) in EMBEDDED_SPLITS.items():
        if name in DatasetCatalog.list():
            continue

        def load(name=name):
            ann_file, image_dir = ensure_embedded(name, root)
            return load_coco_json(str(ann_file), str(image_dir), name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            json_file=str(root / "annotations" / f"instances_{split}.json"),
            image_root=str(root / split), evaluator_type="coco",
            thing_classes=list(SHAPES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPES))})


class DatasetSpecError(ValueError):
    """A malformed ``name=annotations.json:image_dir`` registration."""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _segmentation_problem(seg) -> str | None:
    if isinstance(seg, dict):  # RLE
        return None if "counts" in seg and "size" in seg else "an RLE without counts/size"
    if isinstance(seg, list) and seg:
        for poly in seg:
            if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
                    and all(_is_number(v) for v in poly)):
                return "a polygon that is not an even list of at least 6 numbers"
        return None
    return "neither polygons nor an RLE"


def validate_coco_json(json_file: str | Path, image_root: str | Path, name: str,
                       need_masks: bool = False) -> list[str]:
    """Check a COCO-format annotation file before anything trains on it.

    Checks: valid JSON; ``images``, ``annotations`` and ``categories`` lists; every image
    has ``id``, ``file_name``, ``height``, ``width`` and its file exists under ``image_root``;
    every annotation names a listed image and category and has a ``bbox`` of 4 finite numbers
    with non-negative size, and a ``segmentation`` (polygons or RLE) when ``need_masks``.

    Returns:
        The category names ordered by id (Detectron2's ``thing_classes``).

    Raises:
        DatasetSpecError: one line naming the dataset, the file and the first problem.
    """
    where = f"dataset {name!r}: {json_file}"
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetSpecError(f"{where} is not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetSpecError(f"{where} cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise DatasetSpecError(f"{where} is not a COCO annotation file (not a JSON object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetSpecError(f"{where} has no {key!r} list (COCO format needs images, "
                                   "annotations and categories)")
    cats = data["categories"]
    if not cats:
        raise DatasetSpecError(f"{where} lists no categories")
    for i, c in enumerate(cats):
        if not (isinstance(c, dict) and isinstance(c.get("id"), int) and "name" in c):
            raise DatasetSpecError(f"{where}: categories[{i}] needs an integer 'id' and a 'name'")
    images, missing = {}, []
    root = Path(image_root)
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or any(k not in img for k in ("id", "file_name", "height",
                                                                      "width")):
            raise DatasetSpecError(f"{where}: images[{i}] needs id, file_name, height and width")
        images[img["id"]] = img
        if not (root / str(img["file_name"])).is_file():
            missing.append(str(img["file_name"]))
    if missing:
        raise DatasetSpecError(f"{where}: {len(missing)} of {len(images)} image files are missing "
                               f"under {root}, e.g. {missing[0]}")
    cat_ids = {c["id"] for c in cats}
    for i, a in enumerate(data["annotations"]):
        what = f"{where}: annotations[{i}]" + (f" (id {a.get('id')})" if isinstance(a, dict)
                                               and "id" in a else "")
        if not isinstance(a, dict):
            raise DatasetSpecError(f"{what} is not an object")
        if a.get("image_id") not in images:
            raise DatasetSpecError(f"{what} names image_id {a.get('image_id')!r}, which is not "
                                   "in 'images'")
        if a.get("category_id") not in cat_ids:
            raise DatasetSpecError(f"{what} names category_id {a.get('category_id')!r}, which is "
                                   "not in 'categories'")
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)
                and box[2] >= 0 and box[3] >= 0):
            raise DatasetSpecError(f"{what} has no valid 'bbox' ([x, y, width, height] with "
                                   f"width, height >= 0): {box!r}")
        if need_masks:
            if "segmentation" not in a:
                raise DatasetSpecError(f"{what} has no 'segmentation', which a mask model "
                                       "(MODEL.MASK_ON) needs")
            problem = _segmentation_problem(a["segmentation"])
            if problem:
                raise DatasetSpecError(f"{what} has a 'segmentation' that is {problem}")
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def register_coco_spec(spec: str, need_masks: bool = False) -> str:
    """Register a COCO-format dataset from ``"name=path/to/annotations.json:path/to/images"``,
    after validating it (:func:`validate_coco_json`); its ``thing_classes`` are set from the
    file, so class counts are checked without loading the dataset again.

    Returns the dataset name. Raises :class:`DatasetSpecError` for a malformed spec, missing
    files or a malformed annotation file, naming which.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    name, sep, rest = spec.partition("=")
    json_file, sep2, image_root = rest.partition(":")
    if not (sep and sep2 and name and json_file and image_root):
        raise DatasetSpecError(f"dataset spec {spec!r} must look like "
                               "name=path/to/annotations.json:path/to/images")
    if not Path(json_file).is_file():
        raise DatasetSpecError(f"dataset {name!r}: annotation file {json_file} does not exist")
    if not Path(image_root).is_dir():
        raise DatasetSpecError(f"dataset {name!r}: image directory {image_root} does not exist")
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("json_file") == json_file and meta.get("image_root") == image_root:
            return name  # the same spec again (validated in the parent, then set up in main)
        raise DatasetSpecError(f"dataset {name!r} is already registered; pick another name")
    classes = validate_coco_json(json_file, image_root, name, need_masks)
    register_coco_instances(name, {}, json_file, image_root)
    MetadataCatalog.get(name).set(thing_classes=classes)
    return name
