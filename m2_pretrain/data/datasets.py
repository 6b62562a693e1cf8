"""Datasets: ImageFolder (ImageNet layout), STL10 binary, Fashion-MNIST idx, embedded default.

All return ``(PIL RGB image, label)`` (label -1 where there is none) and raise
``DatasetError`` with the offending path when data is missing or unreadable.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..config import choose
from .embedded import EmbeddedShapes
from .image_file import ImageFileError, load_rgb8

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(RuntimeError):
    """Missing or unreadable data; the message names the file and what to do."""


# --------------------------------------------------------------------------- ImageFolder
class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` (ImageNet layout). Classes are sorted folder names.

    Args:
        root: dataset split folder (e.g. ``imagenet/train``).
        transform: applied to the PIL image.
        skip_corrupt: on an unreadable image, log a warning (with a running count) and return
            the next readable one instead of raising.
    """

    def __init__(self, root: str | Path, transform: Optional[Callable] = None,
                 skip_corrupt: bool = False, classes: Optional[list[str]] = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(
                f"image folder not found: {self.root} (expected {self.root}/<class>/<image files>)"
            )
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not found:
            raise DatasetError(f"no class folders in {self.root} (expected <class>/<image files>)")
        self.classes = found
        self.missing_classes: list[str] = []
        if classes is not None:  # labels follow another split's class list
            extra = [c for c in found if c not in classes]
            if extra:
                raise DatasetError(
                    f"{self.root} has class folder(s) {extra[:5]} that the training split does "
                    f"not have ({len(classes)} classes): no label can be predicted for them; "
                    "remove them or add them to the training split")
            self.classes = list(classes)
            self.missing_classes = [c for c in classes if c not in found]
        self.samples: list[tuple[str, int]] = []
        for ci, c in enumerate(self.classes):
            if c in found:
                self.samples.extend((p, ci) for p in self._image_files(self.root / c))
        if not self.samples:
            raise DatasetError(f"no images with extensions {IMG_EXTENSIONS} under {self.root}")
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.num_skipped = 0

    @staticmethod
    def _image_files(folder: Path) -> list[str]:
        """Image files under ``folder`` (recursively) in sorted order. Anything named like an
        image that is not a regular file (a FIFO, a socket, a device) is a ``DatasetError``;
        the file type comes from the directory listing, so no file is opened or stat'ed."""
        out, dirs = [], []
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir():
                if not entry.is_symlink():  # as os.walk: linked folders are not entered
                    dirs.append(Path(entry.path))
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                if not entry.is_file():
                    raise DatasetError(f"{entry.path} is named like an image but is not a "
                                       "regular file (a FIFO, socket or device?): remove it")
                out.append(entry.path)
        for d in dirs:
            out.extend(ImageFolderDataset._image_files(d))
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def image_name(self, index: int) -> str:
        """File name of image ``index`` (the format of the SimCLR 1%/10% split lists)."""
        return os.path.basename(self.samples[index][0])

    def image_relpath(self, index: int) -> str:
        """Path of image ``index`` relative to the split folder, ``/``-separated
        (``<class>/<file>``): what a split file names an image by."""
        return Path(self.samples[index][0]).relative_to(self.root).as_posix()

    def _load(self, path: str) -> Image.Image:
        """The 8-bit RGB image at ``path`` (16-bit images scaled, see
        :mod:`m2_pretrain.data.image_file`); any failure to open or decode it (not a regular
        file, a truncated file, a decompression bomb beyond PIL's pixel limit, a codec error)
        is a ``DatasetError`` naming the file."""
        try:
            return load_rgb8(path)
        except ImageFileError as e:
            raise DatasetError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - PIL raises many types for undecodable files
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {reason}") from None

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self._load(path)
            except DatasetError:
                if not self.skip_corrupt:
                    raise
                self.num_skipped += 1
                logger.warning("skipping unreadable image %s (%d skipped so far in this worker)",
                               path, self.num_skipped)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, target
        raise DatasetError(f"no readable image in {self.root}")


# --------------------------------------------------------------------------- STL10 binary
def _read_stl10_images(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(
            f"STL10 file not found: {path} (expected torchvision's binary layout: "
            f"<root>/stl10_binary/{{train,test,unlabeled}}_X.bin)"
        )
    size = path.stat().st_size
    per_image = 3 * 96 * 96
    if size % per_image:
        raise DatasetError(f"{path}: size {size} is not a multiple of 3*96*96 bytes; corrupt file?")
    arr = np.memmap(path, dtype=np.uint8, mode="r", shape=(size // per_image, 3, 96, 96))
    return arr


class STL10Binary(Dataset):
    """STL10 in its binary format (as torchvision downloads it), read with a memory map.

    Args:
        root: folder holding ``stl10_binary/`` (or that folder itself).
        split: ``train``, ``test``, ``unlabeled`` or ``train+unlabeled``.
    """

    def __init__(self, root: str | Path, split: str = "train+unlabeled",
                 transform: Optional[Callable] = None) -> None:
        root = Path(root)
        if (root / "stl10_binary").is_dir():
            root = root / "stl10_binary"
        parts = split.split("+")
        bad = [p for p in parts if p not in ("train", "test", "unlabeled")]
        if bad:
            raise DatasetError(f"unknown STL10 split {split!r} (use train, test, unlabeled, train+unlabeled)")
        self.images, labels = [], []
        for p in parts:
            x = _read_stl10_images(root / f"{p}_X.bin")
            self.images.append(x)
            if p == "unlabeled":
                labels.append(np.full(len(x), -1, dtype=np.int64))
            else:
                ypath = root / f"{p}_y.bin"
                if not ypath.is_file():
                    raise DatasetError(f"STL10 labels not found: {ypath}")
                y = np.fromfile(ypath, dtype=np.uint8).astype(np.int64) - 1
                if len(y) != len(x):
                    raise DatasetError(f"{ypath}: {len(y)} labels for {len(x)} images")
                labels.append(y)
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(x) for x in self.images])
        self.targets = np.concatenate(labels).tolist()
        self.transform = transform

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def image_name(self, index: int) -> str:
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return f"{self.parts[part]}_{index - self.offsets[part]:06d}"

    def __getitem__(self, index: int):
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        arr = np.asarray(self.images[part][index - self.offsets[part]]).transpose(2, 1, 0)
        if getattr(self.transform, "accepts_array", False):  # (H, W, 3) view, no PIL image
            return self.transform(arr), self.targets[index]
        img = Image.fromarray(np.ascontiguousarray(arr))  # column-major on disk
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


# --------------------------------------------------------------------------- Fashion-MNIST
FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"


def _open_maybe_gz(path: Path):
    if path.is_file():
        return open(path, "rb")
    gz = path.with_name(path.name + ".gz")
    if gz.is_file():
        return gzip.open(gz, "rb")
    raise DatasetError(
        f"Fashion-MNIST file not found: {path}[.gz] (on Debian: apt-get install dataset-fashion-mnist, "
        f"files land in {FASHION_MNIST_DEFAULT_ROOT})"
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (``.gz`` accepted) into a numpy array."""
    f = _open_maybe_gz(path)
    try:
        data = f.read()
    except (EOFError, OSError, gzip.BadGzipFile) as e:  # a truncated or corrupt .gz
        raise DatasetError(f"{getattr(f, 'name', path)}: cannot decompress ({e}); the file is "
                           "truncated or corrupt, download it again") from None
    finally:
        f.close()
    if len(data) < 4:
        raise DatasetError(f"{path}: truncated idx file")
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte idx file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: expected {int(np.prod(dims))} values, found {body.size}")
    return body.reshape(dims)


class FashionMNIST(Dataset):
    """Fashion-MNIST from idx files (e.g. Debian's ``dataset-fashion-mnist``), as RGB images.

    Args:
        root: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
        split: ``train`` (60k) or ``test`` (10k).
    """

    def __init__(self, root: str | Path = FASHION_MNIST_DEFAULT_ROOT, split: str = "train",
                 transform: Optional[Callable] = None) -> None:
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise DatasetError(f"unknown Fashion-MNIST split {split!r} (use train or test)")
        root = Path(root or FASHION_MNIST_DEFAULT_ROOT)
        self.images = read_idx(root / f"{prefix}-images-idx3-ubyte")
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte")
        if len(labels) != len(self.images):
            raise DatasetError(f"{root}: {len(labels)} labels for {len(self.images)} images")
        self.targets = labels.astype(np.int64).tolist()
        self.transform = transform
        self.split = split

    def __len__(self) -> int:
        return len(self.images)

    def image_name(self, index: int) -> str:
        return f"{self.split}_{index:05d}"

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


# --------------------------------------------------------------------------- factory
def _embedded(data_cfg, split: str, transform: Optional[Callable], classes=None) -> Dataset:
    seeds = {"train": 0, "test": 1, "unlabeled": 0, "train+unlabeled": 0}
    if split not in seeds:
        raise DatasetError(f"unknown embedded split {split!r} (use train or test)")
    n = data_cfg.num_images if split != "test" else max(data_cfg.num_images // 4, 1)
    return EmbeddedShapes(n, res=max(data_cfg.res, 64), num_classes=data_cfg.num_classes,
                          seed=seeds[split], transform=transform,
                          palette=data_cfg.embedded_palette)


# ``data.dataset`` -> ``(data_cfg, split, transform, classes=None) -> Dataset`` (``classes``: see
# ``build_dataset``); the only place a dataset is named
DATASETS: dict[str, Callable[..., Dataset]] = {
    "embedded": _embedded,
    "imagefolder": lambda d, split, tf, classes=None: ImageFolderDataset(
        Path(d.root) / split, tf, d.skip_corrupt, classes),
    "stl10": lambda d, split, tf, classes=None: STL10Binary(d.root, split, tf),
    "fashion_mnist": lambda d, split, tf, classes=None: FashionMNIST(d.root, split, tf),
}


def build_dataset(data_cfg, split: str, transform: Optional[Callable] = None,
                  classes: Optional[list[str]] = None) -> Dataset:
    """Dataset named by ``data_cfg.dataset`` for ``split``.

    For the embedded dataset, ``train``/``unlabeled`` draw seed 0 and ``test`` seed 1.

    Args:
        classes: the class list labels are numbered by (the training split's ``classes``), for
            datasets whose classes are folder names; the split may lack some of them (listed in
            its ``missing_classes``) but may not add any. Datasets with fixed labels ignore it.
    """
    return choose("data.dataset", data_cfg.dataset, DATASETS)(data_cfg, split, transform,
                                                              classes=classes)


__all__ = [
    "DATASETS",
    "DatasetError",
    "FashionMNIST",
    "ImageFolderDataset",
    "STL10Binary",
    "build_dataset",
    "read_idx",
]
