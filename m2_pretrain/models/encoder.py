"""Encoder factory on timm."""

from __future__ import annotations

from typing import Optional

import timm
import torch.nn as nn

from ..config import Config, ConfigError, encoder_kwargs


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


def check_arch(arch: str, key: str = "model.arch") -> None:
    """``ConfigError`` naming ``key`` unless timm knows ``arch``."""
    if not timm.is_model(arch.split(".")[0]):
        raise ConfigError(f"config key '{key}' names no timm model: {arch!r} "
                          "(see timm.list_models())")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def check_encoder(cfg: Config, res: Optional[int] = None, res_key: str = "data.res") -> None:
    """Check ``model.arch``, build it with the config's timm arguments and pass it a batch of
    ``res`` (default ``data.res``) crops, without allocating it (:func:`check_encoder_input`).

    Raises:
        ConfigError: an architecture timm does not know, ``model.zero_init_last`` set for an
            architecture without that argument, or an input size the architecture cannot
            take (e.g. a ViT built for 224 px).
    """
    arch, res = cfg.model.arch, res or cfg.data.res
    check_arch(arch)
    try:
        check_encoder_input(arch, res, **encoder_kwargs(cfg))
    except TypeError as e:
        if "zero_init_last" in str(e):
            raise ConfigError(f"config key 'model.zero_init_last' is not an argument of timm "
                              f"'{arch}' (only ResNet-like models take it); leave it "
                              "unset") from None
        raise ConfigError(f"timm '{arch}' cannot be built: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - whatever the model says about the input
        raise ConfigError(f"config key '{res_key}' ({res}) does not fit timm '{arch}': "
                          f"{_first_line(e)}") from None
