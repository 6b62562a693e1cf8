"""MLP projector / predictor heads (BYOL style: Linear-BN-ReLU-...-Linear)."""

from __future__ import annotations

import torch.nn as nn


class MLP(nn.Sequential):
    """``num_layers`` linear layers with BN1d + ReLU between them, none after the last.

    Args:
        in_dim: input features.
        hidden_dim: width of the hidden layers.
        out_dim: output features.
        num_layers: number of linear layers (>= 1).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i in range(num_layers):
            last = i == num_layers - 1
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=last))
            if not last:
                layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim
