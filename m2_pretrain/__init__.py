"""Momentum² Teacher self-supervised pretraining on timm encoders."""

__version__ = "0.1.0"
