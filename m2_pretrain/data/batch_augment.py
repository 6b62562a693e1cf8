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
They go to the device as one small per-sample table (pinned, non-blocking; never a host sync).
Every op then runs over the whole batch with fixed shapes and per-sample factors (kornia's
split of drawing and applying): colour jitter is three blend passes before the hue rotation
and three after it, in each sample's own op order, with identity factors (exact) for the
samples whose op is elsewhere; hue, grayscale, blur and solarisation are selected per sample
by exact 0/1 weights, a delta kernel or a threshold. Ops no sample of the batch needs are
skipped (decided on the host). About 90 eager ops per view.

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
    step = torch.trunc(shift.to(torch.float64) * 255.0).to(x.dtype)
    return _rotate_hue(x, step.to(x.device).view(-1, 1, 1))


def _rotate_hue(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """:func:`adjust_hue` with the hue-byte step given, (B, 1, 1) (or broadcastable)."""
    maxc, imax = x.max(dim=1)  # the first maximal channel: R before G before B, as PIL
    delta = maxc - x.amin(dim=1)
    # (max - c) / delta per channel (0 for grey pixels)
    rgbc = (maxc.unsqueeze(1) - x) / delta.clamp_min(1e-30).unsqueeze(1)
    # hue in sextants by max channel: R: bc - gc, G: 2 + rc - bc, B: 4 + gc - rc
    diff = rgbc.roll(1, dims=1) - rgbc.roll(-1, dims=1)
    h = diff.gather(1, imax.unsqueeze(1)).squeeze(1) + 2.0 * imax
    h_byte = torch.floor(torch.remainder(h, 6.0) * (255.0 / 6.0))
    s_byte = torch.floor(delta / maxc.clamp_min(1e-30) * 255.0)
    h6 = torch.remainder(h_byte + step, 256.0) * (6.0 / 255.0)
    chroma = maxc * (s_byte / 255.0)
    # back to RGB: each channel is v - chroma * clamp(min(k, 4 - k), 0, 1) with
    # k = (n + h6) mod 6 (n = 5, 3, 1 for R, G, B); grey pixels (chroma 0) stay grey.
    n = torch.arange(5.0, 0.0, -2.0, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(h6.unsqueeze(1) + n, 6.0)
    w = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    return torch.addcmul(maxc.unsqueeze(1), chroma.unsqueeze(1), w, value=-1.0)


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
_SOLARIZE_THRESHOLD = 128 / 255
_NEVER = 2.0  # a solarisation threshold no pixel reaches


@dataclass
class ViewPlan:
    """Host-side plan of one view: a (B, F) float32 table of per-sample factors and which
    passes run. Columns: for each of the 6 blend passes ``(f, a, b)`` with
    ``y = f * x + a * mean_luma + b * luma``; the hue byte step; jitter, grayscale (0/1); the
    solarisation threshold; then the blur kernel (a delta for samples without blur)."""

    table: torch.Tensor
    passes: list[tuple[int, bool]]  # (pass index, needs luma) of the blend passes that run
    hue: bool
    jitter_all: bool
    gray: bool
    blur: bool
    solarize: bool
    kernel_size: int


_HUE, _JIT, _GRAY, _SOL, _KER = 18, 19, 20, 21, 22


def plan_view(p: ViewParams, kernel_size: int) -> ViewPlan:
    """Per-sample factors of every pass (see :class:`ViewPlan`), computed on the host.

    Colour jitter applies the four ops in each sample's order; hue sits at position
    ``q`` of it. Pass ``j < 3`` (before the hue) applies the op at position ``j`` to samples
    with ``j < q``; pass ``3 + j`` (after it) applies the op at position ``j + 1`` to samples
    with ``j + 1 > q``; other samples get the identity ``(1, 0, 0)`` there, which is exact.
    """
    n = len(p)
    jit = p.jitter
    hue_pos = (p.order == HUE).float().argmax(dim=1)
    factor = torch.stack([p.brightness, p.contrast, p.saturation], dim=1).double()  # (B, 3)
    table = torch.zeros(n, _KER + kernel_size, dtype=torch.float64)
    passes = []
    for i in range(6):
        pos = i if i < 3 else i - 2
        op = p.order[:, pos]
        active = jit & ((pos < hue_pos) if i < 3 else (pos > hue_pos))
        f = torch.where(active, factor.gather(1, op.clamp(max=2).view(-1, 1)).squeeze(1), 1.0)
        table[:, 3 * i] = f
        table[:, 3 * i + 1] = torch.where(active & (op == CONTRAST), 1.0 - f, 0.0)
        table[:, 3 * i + 2] = torch.where(active & (op == SATURATION), 1.0 - f, 0.0)
        if active.any():
            passes.append((i, bool((active & (op != BRIGHTNESS)).any())))
    table[:, _HUE] = torch.trunc(p.hue.double() * 255.0)
    table[:, _JIT] = jit.double()
    table[:, _GRAY] = p.gray.double()
    table[:, _SOL] = torch.where(p.solarize, _SOLARIZE_THRESHOLD, _NEVER)
    delta = torch.zeros(kernel_size, dtype=torch.float64)
    delta[kernel_size // 2] = 1.0
    kernels = gaussian_kernels(p.sigma, kernel_size).double()
    table[:, _KER:] = torch.where(p.blur.view(-1, 1), kernels, delta)
    return ViewPlan(table.float(), passes, bool(jit.any()), bool(jit.all()), bool(p.gray.any()),
                    bool(p.blur.any()), bool(p.solarize.any()), kernel_size)


def _col(t: torch.Tensor, i: int) -> torch.Tensor:
    return t[:, i].view(-1, 1, 1, 1)


def run_plan(x: torch.Tensor, plan: ViewPlan, luma_w: torch.Tensor) -> torch.Tensor:
    """Apply a :class:`ViewPlan` to float images (B, 3, H, W) in [0, 1] on any device.

    ``luma_w`` is the (1, 3, 1, 1) luma weight tensor on ``x``'s device.
    """
    dev = x.device
    t = plan.table
    if dev.type == "cuda":
        t = t.pin_memory()
    t = t.to(dev, non_blocking=True)
    y = x

    def blend(y: torch.Tensor, i: int, needs_luma: bool) -> torch.Tensor:
        out = y * _col(t, 3 * i)
        if needs_luma:
            lum = (y * luma_w).sum(dim=1, keepdim=True)
            ref = torch.addcmul(lum.mean(dim=(2, 3), keepdim=True) * _col(t, 3 * i + 1),
                                _col(t, 3 * i + 2), lum)
            out = out.add_(ref)
        return out.clamp_(0, 1)

    hue_done = not plan.hue
    for i, needs_luma in plan.passes:
        if i >= 3 and not hue_done:  # between the passes before and after the hue
            y, hue_done = _hue_step(y, t, plan), True
        y = blend(y, i, needs_luma)
    if not hue_done:
        y = _hue_step(y, t, plan)
    if plan.gray:
        y = torch.lerp(y, (y * luma_w).sum(dim=1, keepdim=True), _col(t, _GRAY))
    if plan.blur:
        y = gaussian_blur(y, t[:, _KER:])
    if plan.solarize:
        y = torch.where(y >= _col(t, _SOL), 1.0 - y, y)
    return y


def _hue_step(y: torch.Tensor, t: torch.Tensor, plan: ViewPlan) -> torch.Tensor:
    rotated = _rotate_hue(y, t[:, _HUE].view(-1, 1, 1))
    return rotated if plan.jitter_all else torch.lerp(y, rotated, _col(t, _JIT))


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
    luma_w = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    return run_plan(x, plan_view(p, kernel_size), luma_w)


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
        m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
        # normalisation in one op: y * scale + shift
        self.register_buffer("scale", (1 / s).float(), persistent=False)
        self.register_buffer("shift", (-m / s).float(), persistent=False)
        self.register_buffer("luma_w", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)

    def draw(self, n: int, generator: torch.Generator) -> tuple[ViewParams, ViewParams]:
        """Student and teacher parameters for a batch of ``n``."""
        return (draw_view_params(self.student_cfg, n, generator),
                draw_view_params(self.teacher_cfg, n, generator))

    def augment(self, x: torch.Tensor, p: ViewParams,
                memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """One view: uint8 (B, 3, H, W) (any layout) -> normalised float32 (B, 3, H, W)."""
        if len(p) != x.shape[0]:
            raise ValueError(f"{len(p)} parameter sets for a batch of {x.shape[0]}")
        y = run_plan(x * (1 / 255), plan_view(p, self.kernel_size), self.luma_w)
        return torch.addcmul(self.shift, y, self.scale).contiguous(memory_format=memory_format)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, generator: torch.Generator,
                memory_format: torch.memory_format = torch.contiguous_format,
                params: Optional[tuple[ViewParams, ViewParams]] = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch of view pairs with per-sample parameters drawn from ``generator``
        (or given as ``params``)."""
        p1, p2 = params if params is not None else self.draw(v1.shape[0], generator)
        return self.augment(v1, p1, memory_format), self.augment(v2, p2, memory_format)
