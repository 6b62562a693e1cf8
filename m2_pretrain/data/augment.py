"""Two-view augmentation of the authors' code (BYOL/SimCLR family).

Student view: blur p=1.0, solarisation p=0; teacher view: blur p=0.1, solarisation p=0.2.
Both: RandomResizedCrop(scale=(0.08, 1)), horizontal flip, colour jitter (0.4, 0.4, 0.2, 0.1)
with p=0.8, grayscale p=0.2. Outputs are uint8 CHW tensors; normalisation happens on the
device (``Normalizer``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.transforms as T


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


class RandomGaussianBlur:
    """Gaussian blur with sigma ~ U(sigma_min, sigma_max) on a PIL image, with PIL's own
    ``ImageFilter.GaussianBlur(radius=sigma)`` (as in the MoCo v2 / BYOL reference code).

    PIL blurs in C on the uint8 image; torchvision's ``GaussianBlur`` on a PIL image converts
    it to a tensor and back and convolves a full kernel, which made blur the largest cost of
    the two-view pipeline.
    """

    def __init__(self, sigma=(0.1, 2.0)) -> None:
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, img):
        from PIL import ImageFilter

        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * float(torch.rand(()))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def build_view_transform(cfg: ViewAugConfig) -> T.Compose:
    """PIL image -> augmented uint8 tensor (3, res, res)."""
    ops = [
        T.RandomResizedCrop(cfg.res, scale=(cfg.crop_scale_min, 1.0),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=cfg.flip_p),
        T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
        T.RandomGrayscale(p=cfg.gray_p),
        T.RandomApply([RandomGaussianBlur(cfg.blur_sigma)], p=cfg.blur_p),
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
