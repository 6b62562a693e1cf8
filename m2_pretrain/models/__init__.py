"""Encoders, heads, the Momentum² Teacher and schedules."""

from .encoder import create_encoder
from .heads import MLP
from .loss import byol_loss, symmetric_byol_loss
from .m2_teacher import Branch, M2Teacher
from . import schedules

__all__ = [
    "Branch",
    "M2Teacher",
    "MLP",
    "byol_loss",
    "create_encoder",
    "schedules",
    "symmetric_byol_loss",
]
