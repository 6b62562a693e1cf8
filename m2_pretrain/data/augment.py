"""Two-view augmentation of the authors' code (BYOL/SimCLR family).

Student view: blur p=1.0, solarisation p=0; teacher view: blur p=0.1, solarisation p=0.2.
Both: RandomResizedCrop(scale=(0.08, 1)), horizontal flip, colour jitter (0.4, 0.4, 0.2, 0.1)
with p=0.8, grayscale p=0.2. Outputs are uint8 CHW tensors; normalisation happens on the
device (``Normalizer``).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

# The blur runs inside DataLoader workers, one small image at a time: OpenCV's own thread
# pool would only oversubscribe the cores the workers already use.
cv2.setNumThreads(1)


@dataclass
class ViewAugConfig:
    res: int = 96
    crop_scale_min: float = 0.08
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    gray_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0


STUDENT_VIEW = dict(blur_p=1.0, solarize_p=0.0)
TEACHER_VIEW = dict(blur_p=0.1, solarize_p=0.2)


def _blur_kernel(res: int) -> int:
    """About 10% of the image side, odd (23 at 224 px, 9 at 96 px, 3 at 32 px), as BYOL."""
    k = max(3, int(0.1 * res))
    return k if k % 2 == 1 else k + 1


class RandomGaussianBlur:
    """torchvision's ``GaussianBlur(kernel_size, sigma)`` on a PIL image, computed separably
    with OpenCV.

    Same truncated kernel, reflect padding, sigma ~ U(sigma) and rounding back to uint8 as
    ``T.GaussianBlur``, which instead converts to a tensor and convolves a full ``k x k``
    kernel (23 x 23 at 224 px); two 1-D passes cost ``2k`` multiply-adds per pixel.
    """

    def __init__(self, kernel_size: int, sigma=(0.1, 2.0)) -> None:
        if kernel_size % 2 != 1 or kernel_size < 1:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.kernel_size = kernel_size
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, img):
        sigma = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item())
        half = (self.kernel_size - 1) * 0.5
        x = np.linspace(-half, half, self.kernel_size, dtype=np.float32)
        k = np.exp(-0.5 * (x / sigma) ** 2)
        k = (k / k.sum()).astype(np.float32)
        arr = np.asarray(img)
        # float32 result, then round half to even like torchvision; BORDER_REFLECT_101 is
        # torch's "reflect" padding
        out = cv2.sepFilter2D(arr, cv2.CV_32F, k, k, borderType=cv2.BORDER_REFLECT_101)
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        return Image.fromarray(out, mode=img.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel_size={self.kernel_size}, sigma={self.sigma})"


def build_view_transform(cfg: ViewAugConfig) -> T.Compose:
    """PIL image -> augmented uint8 tensor (3, res, res)."""
    ops = [
        T.RandomResizedCrop(cfg.res, scale=(cfg.crop_scale_min, 1.0),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=cfg.flip_p),
        T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
        T.RandomGrayscale(p=cfg.gray_p),
        T.RandomApply([RandomGaussianBlur(_blur_kernel(cfg.res), cfg.blur_sigma)], p=cfg.blur_p),
        T.RandomSolarize(threshold=128, p=cfg.solarize_p),
        T.PILToTensor(),
    ]
    return T.Compose(ops)


class TwoViewTransform:
    """Returns ``(student_view, teacher_view)`` uint8 tensors from one PIL image.

    The loss is symmetrised, so which view is called "student" only matters for the
    augmentation strengths (blur/solarisation), as in the authors' code.
    """

    def __init__(self, res: int, crop_scale_min: float = 0.08, **overrides) -> None:
        s = {**STUDENT_VIEW, **{k[8:]: v for k, v in overrides.items() if k.startswith("student_")}}
        t = {**TEACHER_VIEW, **{k[8:]: v for k, v in overrides.items() if k.startswith("teacher_")}}
        common = {k: v for k, v in overrides.items() if not k.startswith(("student_", "teacher_"))}
        self.student_cfg = ViewAugConfig(res=res, crop_scale_min=crop_scale_min, **common, **s)
        self.teacher_cfg = ViewAugConfig(res=res, crop_scale_min=crop_scale_min, **common, **t)
        self.student = build_view_transform(self.student_cfg)
        self.teacher = build_view_transform(self.teacher_cfg)

    def __call__(self, img):
        return self.student(img), self.teacher(img)


def eval_transform(res: int) -> T.Compose:
    """Resize + centre crop (ratio 0.875) to a uint8 tensor, for kNN / linear evaluation."""
    return T.Compose([
        T.Resize(int(round(res / 0.875)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(res),
        T.PILToTensor(),
    ])


class Normalizer(torch.nn.Module):
    """uint8 (B, 3, H, W) on the device -> float, normalised with mean/std (0..1 scale)."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std
