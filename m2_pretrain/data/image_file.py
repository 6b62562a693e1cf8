"""Reading one image file: refuse what is not a regular file (a FIFO would block ``open``
forever), and decode every bit depth to 8-bit RGB by scaling, never by clipping.

Pillow's ``convert("RGB")`` clips 16-bit and 32-bit integer images at 255, so a 16-bit PNG
(mode ``I;16``, or ``I`` in some Pillow versions) comes out almost white. :func:`to_rgb8`
scales such images to 0..255 first (``value * 255 / 65535``, rounded); float images and 32-bit
values beyond 16 bits are refused, since their range is not known. The pretraining datasets
and the Detectron2 plugin's image reader both decode through here.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

# Pillow modes holding more than 8 bits per value; they are scaled to 8 bits.
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageFileError(ValueError):
    """An image file that cannot be read as an 8-bit image; one line naming the file."""


def open_regular(path: str | Path) -> BinaryIO:
    """Open ``path`` for binary reading only if it is a regular file.

    The file is opened non-blocking and checked with ``fstat`` before any read, so a FIFO,
    socket or device named like an image is refused at once instead of blocking in ``open``.

    Raises:
        ImageFileError: the file is missing or not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ImageFileError(f"cannot open {path}: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "not a regular file")
            raise ImageFileError(f"{path} is {kind}, not an image file: remove it from the "
                                 "dataset folder")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def to_8bit(img: Image.Image, path: str | Path = "<image>") -> Image.Image:
    """``img`` with 8-bit values: an image of a wide integer mode becomes an 8-bit grayscale
    (``L``) image scaled by ``255 / 65535``; images of other modes are returned unchanged.

    Raises:
        ImageFileError: a float image, or 32-bit integer values outside 0..65535.
    """
    mode = img.mode
    if mode in _WIDE_INT_MODES:
        arr = np.asarray(img)
        if mode == "I" and arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise ImageFileError(f"{path}: 32-bit integer image with values "
                                 f"{int(arr.min())}..{int(arr.max())}; convert it to an 8-bit or "
                                 "16-bit image")
        scaled = (arr.astype(np.float64) * (255.0 / 65535.0)).round().astype(np.uint8)
        return Image.fromarray(scaled, "L")
    if mode == "F":
        raise ImageFileError(f"{path}: floating-point image (mode F) has no known value range; "
                             "convert it to an 8-bit or 16-bit image")
    return img


def to_rgb8(img: Image.Image, path: str | Path = "<image>") -> Image.Image:
    """``img`` as an 8-bit RGB image; wide integer modes are scaled, not clipped
    (:func:`to_8bit`)."""
    return to_8bit(img, path).convert("RGB")


def load_rgb8(path: str | Path) -> Image.Image:
    """The image at ``path`` decoded to 8-bit RGB (see :func:`to_rgb8`), read only if it is a
    regular file (:func:`open_regular`)."""
    with open_regular(path) as f:
        img = Image.open(f)
        img.load()
        return to_rgb8(img, path)
