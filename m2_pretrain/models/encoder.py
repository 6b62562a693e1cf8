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


def check_encoder_input(arch: str, res: int, **kwargs) -> None:
    """Build ``arch`` with ``kwargs`` and run a batch of two ``res`` x ``res`` images through
    it, on the meta device (no memory, no compute); where the meta device cannot run the model,
    on the CPU.

    Raises:
        TypeError: ``kwargs`` holds an argument the architecture does not take.
        Exception: whatever the model raises for that input size (e.g. a ViT built for
            another size); the message says why.
    """
    import torch

    def attempt(device: str) -> None:
        with torch.device(device):
            model = create_encoder(arch, **kwargs)
            with torch.no_grad():
                model.train()(torch.zeros(2, 3, res, res))

    try:
        attempt("meta")
    except Exception:  # noqa: BLE001 - operations without meta kernels: decide on the CPU
        attempt("cpu")
