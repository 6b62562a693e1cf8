"""Memory layout of activations."""

from __future__ import annotations

import torch


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-D tensor laid out channels-last (and not also plainly
    contiguous, as a tensor with one channel or 1x1 spatial size is), else
    ``torch.contiguous_format``.

    Args:
        x: any tensor.

    Returns:
        The memory format to pass to ``contiguous`` / ``empty_like`` to keep ``x``'s layout.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
