"""Encoder factory on timm."""

from __future__ import annotations

import timm
import torch.nn as nn


def create_encoder(arch: str, **kwargs) -> nn.Module:
    """A timm model without classifier (``num_classes=0``), random init (no hub download).

    Args:
        arch: any timm model name, e.g. ``resnet18``, ``resnet50``.
        **kwargs: passed to ``timm.create_model``.

    Returns:
        The encoder; ``encoder.num_features`` is its pooled feature width.
    """
    if not timm.is_model(arch.split(".")[0]):
        raise ValueError(f"unknown timm architecture {arch!r} (see timm.list_models())")
    kwargs.setdefault("pretrained", False)
    return timm.create_model(arch, num_classes=0, **kwargs)
