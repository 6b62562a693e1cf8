"""Encoders, heads, the Momentum² Teacher and schedules."""

from .encoder import create_encoder
from .heads import MLP
from .loss import byol_loss, symmetric_byol_loss
from .base import Branch, Method
from .m2_teacher import M2Teacher
from . import schedules

__all__ = [
    "Branch",
    "M2Teacher",
    "MLP",
    "Method",
    "byol_loss",
    "create_encoder",
    "schedules",
    "symmetric_byol_loss",
]
