"""Methods by name, and the model and two-view augmentation a config asks for."""

from __future__ import annotations

from ..config import Config, choose
from ..data.augment import TwoViewTransform
from .base import Method
from .m2_teacher import M2Teacher
from .mocov2 import MoCoV2
from .simsiam import SimSiam

# ``model.method`` -> the method's class; the only place a method is named
METHODS: dict[str, type[Method]] = {"m2": M2Teacher, "mocov2": MoCoV2, "simsiam": SimSiam}


def method_class(cfg: Config) -> type[Method]:
    return choose("model.method", cfg.model.method, METHODS)


def build_model(cfg: Config, distributed: bool = False) -> Method:
    """The model named by ``cfg.model``; ``distributed`` turns ``sync`` norms into SyncBatchNorm."""
    return method_class(cfg).from_config(cfg, distributed)


def build_augmentation(cfg: Config) -> TwoViewTransform:
    """The method's two-view pipeline (the authors' for M2, MoCo v2's symmetric one)."""
    return method_class(cfg).augmentation(cfg.data)
