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

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetMapper
from PIL import Image

from m2_pretrain.data.embedded import SHAPES, render_sample

logger = logging.getLogger("m2_detectron2")

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


# How many images' headers the registration check opens (all of them up to this count, else
# this many spread evenly over the file): size and EXIF orientation against the json.
SIZE_CHECK_SAMPLE = 200


def _file_problem(root: Path, file_name) -> str | None:
    """Why ``file_name`` (from the json) is not a usable image file under ``root``, or None."""
    name = str(file_name)
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        return (f"file_name {name!r} points outside the image folder {root}: give paths "
                "relative to it")
    path = root / rel
    if not path.exists():
        return "missing"
    if not path.is_file():
        return f"{path} is not a regular file (a FIFO, socket, device or folder): remove it"
    return None


def _oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image at ``path`` after its EXIF rotation, as Detectron2's
    ``read_image`` returns it; reads the header only."""
    from m2_pretrain.data.image_file import open_regular

    with open_regular(path) as f, Image.open(f) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _check_sizes(where: str, root: Path, images: list[dict]) -> None:
    """Compare ``height``/``width`` with the files (after EXIF rotation) for every image, or
    :data:`SIZE_CHECK_SAMPLE` of them spread evenly over a larger set."""
    n = len(images)
    picks = (range(n) if n <= SIZE_CHECK_SAMPLE
             else sorted({round(i * (n - 1) / (SIZE_CHECK_SAMPLE - 1))
                          for i in range(SIZE_CHECK_SAMPLE)}))
    for i in picks:
        img = images[i]
        path = root / str(img["file_name"])
        try:
            w, h = _oriented_size(path)
        except Exception as e:  # noqa: BLE001 - any undecodable header
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DatasetSpecError(f"{where}: images[{i}] {path} cannot be read as an image "
                                   f"({first})") from None
        if (w, h) != (img["width"], img["height"]):
            raise DatasetSpecError(
                f"{where}: images[{i}] {img['file_name']} is {w}x{h} (width x height, after its "
                f"EXIF rotation) but the json says {img['width']}x{img['height']}: fix its "
                "width/height")


def _box_inside(box: list, img: dict) -> bool:
    """True when ``box`` ([x, y, w, h]) covers some area of its image."""
    x, y, w, h = box
    iw, ih = img["width"], img["height"]
    return w > 0 and h > 0 and x < iw and y < ih and x + w > 0 and y + h > 0


def validate_coco_json(json_file: str | Path, image_root: str | Path, name: str,
                       need_masks: bool = False, mask_format: str = "polygon") -> list[str]:
    """Check a COCO-format annotation file before anything trains on it.

    Checks: valid JSON; ``images``, ``annotations`` and ``categories`` lists; unique image and
    annotation ids; every image has ``id``, ``file_name`` (relative, inside ``image_root``),
    ``height``, ``width`` and its file is a regular file under ``image_root``; the size of
    every image (or of :data:`SIZE_CHECK_SAMPLE` spread evenly over a larger set), after its
    EXIF rotation, equals its ``width``/``height``; every annotation names a listed image and
    category and has a ``bbox`` of 4 finite numbers with non-negative size, and a
    ``segmentation`` (polygons or RLE; RLE needs ``mask_format`` ``bitmask``) when
    ``need_masks``; at least one non-crowd annotation has a box inside its image.

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
        if img["id"] in images:
            raise DatasetSpecError(f"{where}: images[{i}] repeats image id {img['id']!r}; "
                                   "Detectron2 would merge the two images: give each a unique id")
        if not all(_is_number(img[k]) and img[k] > 0 for k in ("height", "width")):
            raise DatasetSpecError(f"{where}: images[{i}] needs positive height and width")
        images[img["id"]] = img
        problem = _file_problem(root, img["file_name"])
        if problem == "missing":
            missing.append(str(img["file_name"]))
        elif problem:
            raise DatasetSpecError(f"{where}: images[{i}]: {problem}")
    if missing:
        raise DatasetSpecError(f"{where}: {len(missing)} of {len(images)} image files are missing "
                               f"under {root}, e.g. {missing[0]}")
    cat_ids = {c["id"] for c in cats}
    ann_ids: set = set()
    usable = outside = 0
    for i, a in enumerate(data["annotations"]):
        what = f"{where}: annotations[{i}]" + (f" (id {a.get('id')})" if isinstance(a, dict)
                                               and "id" in a else "")
        if not isinstance(a, dict):
            raise DatasetSpecError(f"{what} is not an object")
        if "id" in a:
            if a["id"] in ann_ids:
                raise DatasetSpecError(f"{what} repeats annotation id {a['id']!r}: give each "
                                       "annotation a unique id")
            ann_ids.add(a["id"])
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
            if (isinstance(a["segmentation"], dict) and mask_format != "bitmask"
                    and not a.get("iscrowd", 0)):  # Detectron2 drops crowd regions
                raise DatasetSpecError(f"{what} has an RLE 'segmentation', which INPUT.MASK_FORMAT "
                                       f"{mask_format!r} cannot read: set INPUT.MASK_FORMAT "
                                       "bitmask")
        if not a.get("iscrowd", 0):
            if _box_inside(box, images[a["image_id"]]):
                usable += 1
            else:
                outside += 1
    if not usable:
        crowd = len(data["annotations"]) - outside
        raise DatasetSpecError(
            f"{where} has no annotation to learn from ({len(data['annotations'])} annotations: "
            f"{crowd} iscrowd, {outside} with a box outside its image or of zero size)")
    if outside:
        logger.warning("%s: %d of %d non-crowd annotations have a box outside their image or of "
                       "zero size; Detectron2 drops them", where, outside, outside + usable)
    _check_sizes(where, root, list(images.values()))
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def register_coco_spec(spec: str, need_masks: bool = False, mask_format: str = "polygon") -> str:
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
    classes = validate_coco_json(json_file, image_root, name, need_masks, mask_format)
    register_coco_instances(name, {}, json_file, image_root)
    MetadataCatalog.get(name).set(thing_classes=classes)
    return name


# ---------------------------------------------------------------------------------------------
# Reading images: the same decoding rule as the pretraining datasets


def read_image(file_name: str, format: str | None = None) -> np.ndarray:
    """Detectron2's ``detection_utils.read_image`` with the pretraining datasets' rules
    (:mod:`m2_pretrain.data.image_file`): only a regular file is opened (a FIFO is refused
    at once), and a 16-bit image is scaled to 8 bits instead of being clipped to white.
    EXIF orientation and the conversion to ``format`` are Detectron2's own."""
    from detectron2.data.detection_utils import _apply_exif_orientation, convert_PIL_to_numpy

    from m2_pretrain.data.image_file import open_regular, to_8bit

    with open_regular(file_name) as f:
        image = Image.open(f)
        image = _apply_exif_orientation(image)
        return convert_PIL_to_numpy(to_8bit(image, file_name), format)


@contextlib.contextmanager
def _plugin_read_image():
    """Within the block, Detectron2's mappers read images with :func:`read_image`."""
    from detectron2.data import detection_utils

    previous = detection_utils.read_image
    detection_utils.read_image = read_image
    try:
        yield
    finally:
        detection_utils.read_image = previous


class M2DatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` reading images with :func:`read_image`."""

    def __call__(self, dataset_dict):
        with _plugin_read_image():
            return super().__call__(dataset_dict)


def build_mapper(cfg, is_train: bool) -> M2DatasetMapper:
    """The plugin's dataset mapper: Detectron2's ``DatasetMapper(cfg, is_train)`` whose images
    are read by :func:`read_image`."""
    return M2DatasetMapper(cfg, is_train)
