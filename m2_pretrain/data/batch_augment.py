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
and three after it, in each sample's own op order, each pass one per-sample 3 x 3 matrix over
the channels (built on the host) with identity matrices (exact) for the samples whose op is
elsewhere; hue, grayscale, blur and solarisation are selected per sample by exact 0/1 weights,
a matrix, a delta kernel or a threshold. Eagerly, ops no sample of the batch needs are
skipped (decided on the host): 54 aten ops per view at B = 256 (``benchmarks/op_count.py``).
:meth:`BatchTwoViewAugment.compile_colour` runs every op through ``torch.compile`` instead
(one graph for all parameters; 2 fused loops and the 2 blur convolutions on CPU).

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

from ..layers.memory import memory_format_of
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
# Reference ops, one per PIL op (the tests compare each with torchvision's PIL op); the batched
# view below applies the same maths with per-sample matrices and shares the hue rotation and
# the blur with these.
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
    applied here, in float, so both pipelines draw the same hue distribution; the value
    (max of R, G, B) is kept exactly.
    """
    step = _hue_steps(shift).to(x.dtype).to(x.device).view(-1, 1, 1)
    diff, lut = (c.to(x.device) for c in _hue_constants())
    return _rotate_hue(x.flatten(2), step, diff, lut).view_as(x)


def _hue_steps(shift: torch.Tensor) -> torch.Tensor:
    """Hue-byte steps ``trunc(shift * 255)`` offset by 256: the row of :func:`_hue_constants`'
    table to start from (|shift| <= 0.5, as ``T.ColorJitter`` requires)."""
    shift = shift.to(torch.float64)
    if shift.abs().max() > 0.5:
        raise ValueError(f"hue shifts must lie in [-0.5, 0.5], got {shift.abs().max():.3f}")
    return torch.trunc(shift * 255.0) + 256.0


def _hue_constants() -> tuple[torch.Tensor, torch.Tensor]:
    """``diff`` (3, 3): row c gives channel c+1 minus channel c-1; ``lut`` (3, 768): the
    weight of the chroma subtracted from the value in each channel for the hue byte
    ``j mod 256`` (HSV to RGB: ``clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 j / 255) mod 6``,
    n = 5, 3, 1 for R, G, B). Three periods cover a hue byte (0..254) plus an offset step."""
    diff = torch.tensor([[0.0, 1.0, -1.0], [-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]])
    h6 = (torch.arange(768, dtype=torch.float64) % 256) * (6.0 / 255.0)
    k = torch.remainder(h6 + torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64).view(3, 1), 6.0)
    return diff, torch.minimum(k, 4.0 - k).clamp(0, 1).float()


def _rotate_hue(y: torch.Tensor, step: torch.Tensor, diff: torch.Tensor,
                lut: torch.Tensor) -> torch.Tensor:
    """Hue rotation of (B, 3, N) images in [0, 1]: ``step`` (B, 1, 1) from :func:`_hue_steps`,
    ``diff`` and ``lut`` from :func:`_hue_constants` on ``y``'s device."""
    b, n = y.shape[0], y.shape[2]
    maxc, imax = y.max(dim=1, keepdim=True)  # the first maximal channel: R before G, as PIL
    delta = maxc - y.amin(dim=1, keepdim=True)
    # hue in sextants: R max: (G - B) / delta, G: 2 + (B - R) / delta, B: 4 + (R - G) / delta
    # (0 for grey pixels: the difference is 0 there too)
    num = _mix(diff.expand(b, 3, 3), y).gather(1, imax)
    h = torch.add(num / delta.clamp_min(1e-30), imax, alpha=2)
    h_byte = torch.floor(torch.remainder(h, 6.0) * (255.0 / 6.0))
    w = lut.expand(b, 3, lut.shape[1]).gather(2, (h_byte + step).long().expand(b, 3, n))
    s_byte = torch.floor(delta / maxc.clamp_min(1e-30) * 255.0)
    # each channel: v - chroma * w with chroma = v * s_byte / 255; grey pixels stay grey
    return torch.addcmul(maxc, maxc * s_byte, w, value=-1.0 / 255.0)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma replicated on 3 channels."""
    return luma(x).expand_as(x).contiguous(memory_format=memory_format_of(x))


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, k) normalised 1-D Gaussian kernels on ``linspace(-(k-1)/2, (k-1)/2, k)``, as
    torchvision's ``GaussianBlur``."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, dtype=torch.float32, device=sigma.device)
    pdf = torch.exp(-0.5 * (t / sigma.float().view(-1, 1)) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable blur of each sample with its own (k,) kernel, reflect padding (B, 3, H, W)."""
    return _blur(x, kernels.to(x.dtype).repeat_interleave(x.shape[1], dim=0))


def _blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """:func:`gaussian_blur` with the kernel of each (sample, channel) given, (B * C, k)."""
    bsz, ch, hgt, wid = x.shape
    k = taps.shape[1]
    p = k // 2
    y = F.pad(x.reshape(1, bsz * ch, hgt, wid), (p, p, p, p), mode="reflect")
    y = F.conv2d(y, taps.view(bsz * ch, 1, 1, k), groups=bsz * ch)
    y = F.conv2d(y, taps.view(bsz * ch, 1, k, 1), groups=bsz * ch)
    return y.view(bsz, ch, hgt, wid)


def solarize(x: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert pixels at or above ``threshold`` (PIL ``ImageOps.solarize(img, 128)``)."""
    return torch.where(x >= threshold, 1.0 - x, x)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


# ----------------------------------------------------------------------------- batched view
_SOLARIZE_THRESHOLD = 128 / 255
_NEVER = 2.0  # a solarisation threshold no pixel reaches

# Columns of the per-sample table (see :class:`ViewPlan`)
_PASS = 18  # per blend pass: M (3 x 3), then A (3 x 3), row-major
_STEP, _JIT, _GRAY, _SOL = 6 * _PASS, 6 * _PASS + 1, 6 * _PASS + 2, 6 * _PASS + 11
_COLUMNS = _SOL + 1


@dataclass
class ViewPlan:
    """Host-side plan of one view.

    ``data`` is one flat float32 tensor (one upload): a (B, 120) table of per-sample factors,
    then the blur taps (B * 3, k). Table columns:

    * 6 blend passes ``y <- clamp(M y + A mean(y), 0, 1)`` with per-sample 3 x 3 matrices
      over the channels (``mean`` over the pixels): brightness ``M = f I``; contrast
      ``M = f I, A = (1 - f) 1 w^T`` (blend with the mean luma); saturation
      ``M = f I + (1 - f) 1 w^T`` (blend with the per-pixel luma); identity ``M = I``;
    * the hue step (:func:`_hue_steps`) and the jitter flag (0/1);
    * the grayscale matrix (``1 w^T`` or ``I``, 3 x 3);
    * the solarisation threshold (``_NEVER`` for samples without it).

    ``passes`` and the flags say which passes and ops some sample of the batch needs (the
    eager path skips the others; the compiled path runs all, with exact identity factors).
    """

    data: torch.Tensor
    passes: list[int]
    hue: bool
    jitter_all: bool
    gray: bool
    blur: bool
    solarize: bool


def plan_view(p: ViewParams, kernel_size: int) -> ViewPlan:
    """Per-sample factors of every pass (see :class:`ViewPlan`), computed on the host.

    Colour jitter applies the four ops in each sample's order; hue sits at position
    ``q`` of it. Pass ``j < 3`` (before the hue) applies the op at position ``j`` to samples
    with ``j < q``; pass ``3 + j`` (after it) applies the op at position ``j + 1`` to samples
    with ``j + 1 > q``; other samples get the identity (``M = I, A = 0``), which is exact.
    """
    n = len(p)
    jit = p.jitter
    hue_pos = (p.order == HUE).float().argmax(dim=1)
    factor = torch.stack([p.brightness, p.contrast, p.saturation], dim=1).double()  # (B, 3)
    eye = torch.eye(3, dtype=torch.float64)
    rows_w = torch.tensor(_LUMA, dtype=torch.float64).expand(3, 3)  # every row: luma weights
    table = torch.zeros(n, _COLUMNS, dtype=torch.float64)
    passes = []
    for i in range(6):
        pos = i if i < 3 else i - 2
        op = p.order[:, pos]
        active = jit & ((pos < hue_pos) if i < 3 else (pos > hue_pos))
        f = torch.where(active, factor.gather(1, op.clamp(max=2).view(-1, 1)).squeeze(1), 1.0)
        a = torch.where(active & (op == CONTRAST), 1.0 - f, 0.0)
        b = torch.where(active & (op == SATURATION), 1.0 - f, 0.0)
        m = f.view(-1, 1, 1) * eye + b.view(-1, 1, 1) * rows_w
        table[:, _PASS * i : _PASS * i + 9] = m.reshape(n, 9)
        table[:, _PASS * i + 9 : _PASS * (i + 1)] = (a.view(-1, 1, 1) * rows_w).reshape(n, 9)
        if active.any():
            passes.append(i)
    table[:, _STEP] = _hue_steps(p.hue)
    table[:, _JIT] = jit.double()
    table[:, _GRAY : _GRAY + 9] = torch.where(p.gray.view(-1, 1, 1), rows_w, eye).reshape(n, 9)
    table[:, _SOL] = torch.where(p.solarize, _SOLARIZE_THRESHOLD, _NEVER)
    delta = torch.zeros(kernel_size, dtype=torch.float64)
    delta[kernel_size // 2] = 1.0
    kernels = gaussian_kernels(p.sigma, kernel_size).double()
    taps = torch.where(p.blur.view(-1, 1), kernels, delta).repeat_interleave(3, dim=0)
    data = torch.cat([table.flatten(), taps.flatten()]).float()
    return ViewPlan(data, passes, bool(jit.any()), bool(jit.all()),
                    bool(p.gray.any()), bool(p.blur.any()), bool(p.solarize.any()))


def _mix(m: torch.Tensor, y: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample channel mixing ``m @ y (+ add)``: m (B, 3, 3), y (B, 3, N).

    Eager: one batched matmul. Compiled: the three products written out, which inductor fuses
    with the neighbouring elementwise ops (a matmul would be a library call of its own).
    """
    if torch.compiler.is_compiling():
        out = m[:, :, 0:1] * y[:, 0:1] + m[:, :, 1:2] * y[:, 1:2] + m[:, :, 2:3] * y[:, 2:3]
        return out if add is None else out + add
    return torch.bmm(m, y) if add is None else torch.baddbmm(add, m, y)


def _mean_term(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``a @ mean(y)`` (B, 3, 1): the mean over the pixels, mixed by ``a`` (B, 3, 3), whose
    rows are equal (``A`` of :class:`ViewPlan`). Compiled: one reduction per sample."""
    if torch.compiler.is_compiling():
        return (a[:, :1].transpose(1, 2) * y).sum(dim=(1, 2), keepdim=True) / y.shape[2]
    return _mix(a, y.mean(dim=2, keepdim=True))


def _mat(t: torch.Tensor, col: int) -> torch.Tensor:
    return t[:, col : col + 9].view(-1, 3, 3)


def _col(t: torch.Tensor, col: int) -> torch.Tensor:
    return t[:, col : col + 1].view(-1, 1, 1)


def colour_view(x: torch.Tensor, data: torch.Tensor, diff: torch.Tensor, lut: torch.Tensor,
                scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                memory_format: Optional[torch.memory_format] = None,
                plan: Optional[ViewPlan] = None) -> torch.Tensor:
    """Apply a :class:`ViewPlan` (its ``data`` already on ``x``'s device) to a batch.

    Args:
        x: (B, 3, H, W) uint8 (scaled by 1/255) or float in [0, 1]; not modified.
        data: ``plan.data`` on the device.
        diff, lut: :func:`_hue_constants` on the device.
        scale, shift: (1, 3, 1, 1) normalisation ``y * scale + shift``; None: none.
        memory_format: of the result; None: as the last op gives it.
        plan: the plan, to skip the passes and ops no sample needs; None runs every one,
            with the same result (identity factors are exact): fixed code for
            ``torch.compile``, whatever the parameters.

    Returns:
        The augmented (B, 3, H, W) float batch.
    """
    bsz, _, hgt, wid = x.shape
    t = data[: bsz * _COLUMNS].view(bsz, _COLUMNS)
    taps = data[bsz * _COLUMNS :].view(3 * bsz, -1)
    every = plan is None

    def hue(y: torch.Tensor) -> torch.Tensor:
        rotated = _rotate_hue(y, _col(t, _STEP), diff, lut)
        return rotated if not every and plan.jitter_all else torch.lerp(y, rotated, _col(t, _JIT))

    y = (x * (1 / 255) if x.dtype == torch.uint8 else x).flatten(2)  # (B, 3, H * W)
    passes = range(6) if every else plan.passes
    hue_at = 3 if every else (min([i for i in passes if i >= 3] + [6]) if plan.hue else -1)
    for i in passes:
        if i == hue_at:
            y = hue(y)
        m, a = _mat(t, _PASS * i), _mat(t, _PASS * i + 9)
        y = _mix(m, y, _mean_term(a, y)).clamp_(0, 1)
    if hue_at == 6:
        y = hue(y)
    if every or plan.gray:
        y = _mix(_mat(t, _GRAY), y)
    y = y.view(bsz, 3, hgt, wid)
    if every or plan.blur:
        y = _blur(y, taps)
    if every or plan.solarize:
        y = torch.where(y >= t[:, _SOL].view(-1, 1, 1, 1), 1.0 - y, y)
    if scale is not None:
        if memory_format is not None and not torch.compiler.is_compiling():
            # the last op writes the layout asked for
            out = torch.empty(y.shape, dtype=y.dtype, device=y.device,
                              memory_format=memory_format)
            return torch.addcmul(shift, y, scale, out=out)
        y = torch.addcmul(shift, y, scale)
    return y if memory_format is None else y.contiguous(memory_format=memory_format)


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
    plan = plan_view(p, kernel_size)
    diff, lut = (c.to(x.device) for c in _hue_constants())
    return colour_view(x, _upload(plan.data, x.device), diff, lut, plan=plan)


def _upload(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host table to the device: pinned and non-blocking on CUDA (no host sync)."""
    if device.type == "cuda":
        data = data.pin_memory()
    return data.to(device, non_blocking=True)


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
        diff, lut = _hue_constants()
        self.register_buffer("hue_diff", diff, persistent=False)
        self.register_buffer("hue_lut", lut, persistent=False)
        self._compiled = None

    def compile_colour(self, **compile_kwargs) -> "BatchTwoViewAugment":
        """Run the colour part (everything after the uint8 upload) through ``torch.compile``
        (``fullgraph=True``): every pass and op runs, with the same result as the eager path,
        so new parameters reuse the compiled code (a new batch size compiles once more).
        ``compile_kwargs`` go to ``torch.compile``. Returns ``self``."""
        self._compiled = torch.compile(colour_view, fullgraph=True, **compile_kwargs)
        return self

    def draw(self, n: int, generator: torch.Generator) -> tuple[ViewParams, ViewParams]:
        """Student and teacher parameters for a batch of ``n``."""
        return (draw_view_params(self.student_cfg, n, generator),
                draw_view_params(self.teacher_cfg, n, generator))

    def augment(self, x: torch.Tensor, p: ViewParams,
                memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """One view: uint8 (B, 3, H, W) (any layout) -> normalised float32 (B, 3, H, W)."""
        if len(p) != x.shape[0]:
            raise ValueError(f"{len(p)} parameter sets for a batch of {x.shape[0]}")
        plan = plan_view(p, self.kernel_size)
        data = _upload(plan.data, x.device)
        args = (x, data, self.hue_diff, self.hue_lut, self.scale, self.shift, memory_format)
        with torch.autocast(x.device.type, enabled=False):  # float32 matmuls and convolutions
            if self._compiled is not None:
                return self._compiled(*args)
            return colour_view(*args, plan=plan)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, generator: torch.Generator,
                memory_format: torch.memory_format = torch.contiguous_format,
                params: Optional[tuple[ViewParams, ViewParams]] = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch of view pairs with per-sample parameters drawn from ``generator``
        (or given as ``params``)."""
        p1, p2 = params if params is not None else self.draw(v1.shape[0], generator)
        return self.augment(v1, p1, memory_format), self.augment(v2, p2, memory_format)
