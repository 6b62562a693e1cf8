"""Two-view augmentation split between the loader and the training device.

``data.augment_device: cuda`` moves the colour part of the two-view pipeline
(``augment.build_view_transform``) off the loader workers:

* Loader workers (:class:`GeometricTwoView`): decode, then each view's random resized crop and
  horizontal flip straight to uint8 at the training resolution (OpenCV resize of the crop box,
  no float conversion, no PIL round trip). Output: two ``(res, res, 3)`` uint8 tensors.
* The device (:class:`BatchTwoViewAugment`): colour jitter with a random op order per sample,
  grayscale, Gaussian blur, solarisation and normalisation, batched over the whole batch with
  **per-sample** random parameters drawn from the distributions of the CPU pipeline.

Parameters are drawn on the CPU from a ``torch.Generator`` seeded by
``(seed, rank, micro-batch index)`` (:func:`batch_generator`), so they do not depend on the
number of loader workers, CPU and GPU runs see the same parameters, and a resumed run is exact.
Which samples get which op is therefore known on the host: the device only runs
``index_select`` / ``index_copy_`` with index tensors sent once per view, never a host sync.

Colour ops work on float32 images in [0, 1] (torchvision's tensor conventions, fractional
values kept between ops) and follow the PIL ops of ``torchvision.transforms.ColorJitter``:
grayscale is ITU-R 601-2 luma (0.299, 0.587, 0.114), contrast blends with the mean luma, hue
rotates the HSV hue. The tests compare each op with torchvision's PIL op on the same
parameter (mean absolute difference within 2/255).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .augment import ViewAugConfig, _blur_kernel

cv2.setNumThreads(1)  # one small image at a time inside DataLoader workers

_LUMA = (0.299, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


# ----------------------------------------------------------------------------- loader side
def random_resized_crop_box(height: int, width: int, scale: Sequence[float],
                            ratio: Sequence[float], u: Sequence[float],
                            ) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop, with torchvision's distribution.

    As ``T.RandomResizedCrop.get_params``: up to 10 attempts of an area fraction
    ``U(scale)`` and a log-uniform aspect ratio; a position uniform over the valid ones; if
    no attempt fits, the largest centre crop within ``ratio``.

    Args:
        height, width: image size.
        scale, ratio: as ``T.RandomResizedCrop``.
        u: 40 uniform [0, 1) numbers (4 per attempt).
    """
    area = height * width
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    for a in range(10):
        ua, ur, ui, uj = u[4 * a : 4 * a + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * ua)
        aspect = math.exp(log_r0 + (log_r1 - log_r0) * ur)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(ui * (height - h + 1)), int(uj * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_crop(img: np.ndarray, box: tuple[int, int, int, int], res: int,
                flip: bool) -> np.ndarray:
    """Crop ``box = (top, left, h, w)`` of an (H, W, 3) uint8 array, resize it to
    ``res x res`` (bicubic when enlarging, area averaging when shrinking both sides, like an
    antialiased resize) and optionally mirror it. Returns a contiguous (res, res, 3) array."""
    i, j, h, w = box
    crop = img[i : i + h, j : j + w]
    if not crop.flags.c_contiguous and crop.strides[-1] != crop.itemsize:
        crop = np.ascontiguousarray(crop)  # e.g. STL10's column-major memory map
    interp = cv2.INTER_AREA if (h >= res and w >= res) else cv2.INTER_CUBIC
    out = cv2.resize(crop, (res, res), interpolation=interp)
    if flip:
        out = cv2.flip(out, 1)
    return out


class GeometricTwoView:
    """Loader-side half of the device pipeline: two independent random resized crops (and
    flips) of one image, as uint8 ``(res, res, 3)`` tensors.

    Randomness comes from torch's global generator, which ``SeededSample`` seeds per
    ``(seed, epoch, index)``. Accepts a PIL image or an (H, W, 3) uint8 array
    (``accepts_array``: datasets may skip building a PIL image).
    """

    accepts_array = True

    def __init__(self, res: int, crop_scale_min: float = 0.08, flip_p: float = 0.5,
                 ratio: Sequence[float] = (3 / 4, 4 / 3)) -> None:
        self.res, self.scale, self.ratio, self.flip_p = res, (crop_scale_min, 1.0), ratio, flip_p

    def view(self, arr: np.ndarray, u: Sequence[float]) -> torch.Tensor:
        box = random_resized_crop_box(arr.shape[0], arr.shape[1], self.scale, self.ratio, u[:40])
        return torch.from_numpy(resize_crop(arr, box, self.res, u[40] < self.flip_p))

    def __call__(self, img) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(img, np.ndarray):
            img = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
        arr = img
        u = torch.rand(82, dtype=torch.float64).tolist()
        return self.view(arr, u[:41]), self.view(arr, u[41:])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(res={self.res}, scale={self.scale}, "
                f"flip_p={self.flip_p})")


# ----------------------------------------------------------------------------- parameters
def batch_generator(seed: int, rank: int, micro: int) -> torch.Generator:
    """CPU generator for the device-side parameters of micro-batch ``micro`` on ``rank``."""
    h = hashlib.blake2b(f"batch-aug/{seed}/{rank}/{micro}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))


@dataclass
class ViewParams:
    """Per-sample parameters of one view (CPU tensors of length B)."""

    jitter: torch.Tensor  # bool: colour jitter applied
    order: torch.Tensor  # (B, 4) long: op order (0 brightness, 1 contrast, 2 saturation, 3 hue)
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor  # fraction of the hue circle
    gray: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor
    solarize: torch.Tensor  # bool

    def __len__(self) -> int:
        return len(self.jitter)

    def select(self, index) -> "ViewParams":
        """Parameters of the samples ``index`` (an int, slice or index tensor)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return ViewParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def draw_view_params(cfg: ViewAugConfig, n: int, generator: torch.Generator) -> ViewParams:
    """Draw per-sample parameters with the distributions of ``build_view_transform(cfg)``:
    ``T.ColorJitter(*cfg.jitter)`` (each factor uniform, a uniformly random order) applied
    with ``cfg.jitter_p``, grayscale with ``cfg.gray_p``, blur with ``cfg.blur_p`` and
    sigma ``U(cfg.blur_sigma)``, solarisation with ``cfg.solarize_p``."""
    g = generator
    b, c, s, h = cfg.jitter
    return ViewParams(
        jitter=torch.rand(n, generator=g) < cfg.jitter_p,
        order=torch.rand(n, 4, generator=g).argsort(dim=1),
        brightness=_uniform(n, max(0.0, 1 - b), 1 + b, g).float(),
        contrast=_uniform(n, max(0.0, 1 - c), 1 + c, g).float(),
        saturation=_uniform(n, max(0.0, 1 - s), 1 + s, g).float(),
        hue=_uniform(n, -h, h, g).float(),
        gray=torch.rand(n, generator=g) < cfg.gray_p,
        blur=torch.rand(n, generator=g) < cfg.blur_p,
        sigma=_uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], g).float(),
        solarize=torch.rand(n, generator=g) < cfg.solarize_p,
    )


# ----------------------------------------------------------------------------- ops
def _bcast(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return f.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) ITU-R 601-2 luma (PIL's ``convert("L")``)."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with black: ``x * f`` (per-sample ``f``), clamped to [0, 1]."""
    return (x * _bcast(f, x)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma."""
    m = luma(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _bcast(f, x)
    return (f * x + (1 - f) * m).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the per-pixel luma."""
    f = _bcast(f, x)
    return (f * x + (1 - f) * luma(x)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` (fraction of the circle, per sample), as torchvision's
    PIL ``adjust_hue`` does it.

    That op works in PIL's uint8 HSV: hue ``trunc(h * 255)`` on a circle of 255 levels,
    saturation ``trunc(s * 255)``, and it adds ``trunc(shift * 255)`` to the hue byte modulo
    256 (so a shift of 0.05 moves the hue by 12/255 of the circle). The same quantisation is
    applied here, elementwise in float, so both pipelines draw the same hue distribution;
    the value (max of R, G, B) is kept exactly.
    """
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = x.unbind(1)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h_byte = torch.floor(torch.remainder(h / 6.0, 1.0) * 255.0)
    s_byte = torch.floor(delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)) * 255.0)
    step = torch.trunc(shift.to(torch.float64) * 255.0).to(x.dtype).view(-1, 1, 1)
    h6 = torch.remainder(h_byte + step, 256.0) * (6.0 / 255.0)
    chroma = maxc * (s_byte / 255.0)
    # back to RGB: each channel is v - chroma * clamp(min(k, 4 - k), 0, 1) with
    # k = (n + h6) mod 6 (n = 5, 3, 1 for R, G, B); grey pixels (chroma 0) stay grey.
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + h6.unsqueeze(1), 6.0)
    w = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * w


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma replicated on 3 channels."""
    return luma(x).expand_as(x).contiguous(memory_format=_format_of(x))


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, k) normalised 1-D Gaussian kernels on ``linspace(-(k-1)/2, (k-1)/2, k)``, as
    torchvision's ``GaussianBlur``."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, dtype=torch.float32, device=sigma.device)
    pdf = torch.exp(-0.5 * (t / sigma.float().view(-1, 1)) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable blur of each sample with its own (k,) kernel, reflect padding (B, 3, H, W)."""
    bsz, ch, hgt, wid = x.shape
    k = kernels.shape[1]
    p = k // 2
    wt = kernels.to(x.dtype).repeat_interleave(ch, dim=0)  # (B*C, k)
    y = F.pad(x.reshape(1, bsz * ch, hgt, wid), (p, p, p, p), mode="reflect")
    y = F.conv2d(y, wt.view(bsz * ch, 1, 1, k), groups=bsz * ch)
    y = F.conv2d(y, wt.view(bsz * ch, 1, k, 1), groups=bsz * ch)
    return y.view(bsz, ch, hgt, wid)


def solarize(x: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert pixels at or above ``threshold`` (PIL ``ImageOps.solarize(img, 128)``)."""
    return torch.where(x >= threshold, 1.0 - x, x)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _format_of(x: torch.Tensor) -> torch.memory_format:
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    if cl and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# ----------------------------------------------------------------------------- batched view
def _plan(p: ViewParams) -> tuple[torch.Tensor, list[tuple[str, int, int, int]]]:
    """Host-side plan: one long tensor of concatenated sample indices, and for each step
    ``(kind, op, start, stop)`` into it. Kinds: ``jitter`` (op = 0..3, in position order),
    ``gray``, ``blur``, ``solarize``."""
    chunks, steps, pos = [], [], 0

    def add(kind: str, op: int, mask: torch.Tensor) -> None:
        nonlocal pos
        idx = mask.nonzero().flatten()
        if len(idx):
            chunks.append(idx)
            steps.append((kind, op, pos, pos + len(idx)))
            pos += len(idx)

    for j in range(4):
        for op in range(4):
            add("jitter", op, p.jitter & (p.order[:, j] == op))
    add("gray", 0, p.gray)
    add("blur", 0, p.blur)
    add("solarize", 0, p.solarize)
    idx = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
    return idx, steps


def apply_view(x: torch.Tensor, p: ViewParams, kernel_size: int) -> torch.Tensor:
    """Colour jitter (per-sample order), grayscale, blur, solarisation of float images.

    Args:
        x: (B, 3, H, W) float in [0, 1], on any device; not modified.
        p: per-sample parameters (CPU), ``len(p) == B``.
        kernel_size: odd blur kernel size.

    Returns:
        The augmented (B, 3, H, W) float batch in [0, 1].
    """
    if len(p) != x.shape[0]:
        raise ValueError(f"{len(p)} parameter sets for a batch of {x.shape[0]}")
    idx_all, steps = _plan(p)
    dev = x.device
    idx_all = idx_all.to(dev, non_blocking=True)
    factors = torch.stack([p.brightness, p.contrast, p.saturation, p.hue, p.sigma]).to(
        dev, non_blocking=True)
    x = x.clone()
    for kind, op, a, b in steps:
        idx = idx_all[a:b]
        sub = x.index_select(0, idx)
        if kind == "jitter":
            sub = _JITTER_OPS[op](sub, factors[op].index_select(0, idx))
        elif kind == "gray":
            sub = grayscale(sub)
        elif kind == "blur":
            sub = gaussian_blur(sub, gaussian_kernels(factors[4].index_select(0, idx), kernel_size))
        else:
            sub = solarize(sub)
        x.index_copy_(0, idx, sub.to(x.dtype))
    return x


class BatchTwoViewAugment(torch.nn.Module):
    """Device-side half of the two-view pipeline: uint8 crops -> augmented, normalised floats.

    Args:
        student, teacher: the views' settings (``TwoViewTransform.student_cfg`` /
            ``teacher_cfg``; only the colour, blur and solarisation fields are used here).
        mean, std: normalisation (0..1 scale), as ``Normalizer``.
    """

    def __init__(self, student: ViewAugConfig, teacher: ViewAugConfig, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__()
        self.student_cfg, self.teacher_cfg = student, teacher
        self.kernel_size = _blur_kernel(student.res)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def draw(self, n: int, generator: torch.Generator) -> tuple[ViewParams, ViewParams]:
        """Student and teacher parameters for a batch of ``n``."""
        return (draw_view_params(self.student_cfg, n, generator),
                draw_view_params(self.teacher_cfg, n, generator))

    def augment(self, x: torch.Tensor, p: ViewParams,
                memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """One view: uint8 (B, 3, H, W) (any layout) -> normalised float32 (B, 3, H, W)."""
        y = apply_view(x.float().div_(255.0), p, self.kernel_size)
        return ((y - self.mean) / self.std).contiguous(memory_format=memory_format)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, generator: torch.Generator,
                memory_format: torch.memory_format = torch.contiguous_format,
                params: Optional[tuple[ViewParams, ViewParams]] = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch of view pairs with per-sample parameters drawn from ``generator``
        (or given as ``params``)."""
        p1, p2 = params if params is not None else self.draw(v1.shape[0], generator)
        return self.augment(v1, p1, memory_format), self.augment(v2, p2, memory_format)
