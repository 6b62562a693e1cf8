"""Work the trainer runs every few steps, handed to it (as Detectron2's ``EvalHook`` is)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class PeriodicHook:
    """``fn(trainer)`` every ``period`` optimizer steps and after the last one.

    ``fn`` may return a dict of numbers: they go into the trainer's newest history row and to
    TensorBoard as ``<name>/<key>``. With ``main_only`` (the default) it runs on rank 0 only.
    """

    name: str
    period: int
    fn: Callable[..., Optional[dict]]
    main_only: bool = True

    def __post_init__(self) -> None:
        if self.period < 1:
            raise ValueError(f"hook {self.name!r}: period must be >= 1 step, got {self.period}")

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.period == 0 or step == total_steps
