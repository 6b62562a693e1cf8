"""What a training run shows while it runs: history rows, TensorBoard scalars, a progress bar."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)


@dataclass
class LogWindow:
    """What is accumulated between two log rows (device tensors stay on the device)."""

    loss_sum: torch.Tensor
    count: int = 0
    images: int = 0
    wait_s: float = 0.0
    t0: float = field(default_factory=time.perf_counter)


class RunLog:
    """The log window of one ``fit()``, its TensorBoard writer (``tb_dir``) and tqdm bar
    (``progress``: ``(total, initial)``); either may be None."""

    def __init__(self, device: torch.device, tb_dir: Optional[Path],
                 progress: Optional[tuple[int, int]]) -> None:
        self.device = device
        self.window = LogWindow(torch.zeros((), device=device))
        self.writer = self.bar = None
        if tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(tb_dir))
            except ImportError:
                logger.warning("tensorboard not installed: no TensorBoard scalars")
        if progress is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=progress[0], initial=progress[1], desc="pretrain",
                            dynamic_ncols=True)

    def add(self, loss: torch.Tensor, images: int) -> None:
        """One micro-batch's detached loss (no host sync) and image count."""
        self.window.loss_sum += loss
        self.window.count += 1
        self.window.images += images

    def waited(self, seconds: float) -> None:
        self.window.wait_s += seconds

    def row(self, step: int, epoch: float, lr: float, method: dict[str, float]) -> dict:
        """The window's history row (one host sync) with the method's scalars (``method``,
        e.g. the EMA ``m`` and Momentum BN ``alpha``); TensorBoard and the bar get it, and a
        new window starts."""
        w, now = self.window, time.perf_counter()
        mean_loss = (w.loss_sum / max(w.count, 1)).item()
        row = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": lr, **method,
               "img_per_s": w.images / max(now - w.t0, 1e-9),
               "data_wait": w.wait_s / max(now - w.t0, 1e-9)}
        self.scalars("train", {k: v for k, v in row.items() if k not in ("step", "epoch")}, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.3g}",
                                 **{k: f"{v:.4g}" for k, v in method.items()},
                                 ips=f"{row['img_per_s']:.0f}",
                                 wait=f"{100 * row['data_wait']:.0f}%")
        self.window = LogWindow(torch.zeros((), device=self.device))
        return row

    def scalars(self, prefix: str, numbers: dict, step: int) -> None:
        if self.writer is not None:
            for k, v in numbers.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
