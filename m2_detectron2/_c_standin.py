"""A pure-Python stand-in for ``detectron2._C`` when detectron2 was installed without its
C++ extension (the PyPI copy ``pb1-detectron2==0.6``; see docs/install.md).

``detectron2.layers`` imports ``detectron2._C`` at import time, although the transfer configs
of this project never call a C++ op (rotated boxes, deformable convolution, the fast COCO
evaluator). The stand-in makes those imports succeed and turns any *call* of a C++-only op
into an error that names the op. The same holds for the ops detectron2 reaches through
``torch.ops.detectron2.*``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import types

logger = logging.getLogger(__name__)

MODULE_NAME = "detectron2._C"

# Ops that detectron2 (v0.6 and main) reaches through torch.ops.detectron2, with their schemas.
_TORCH_OPS = {
    "nms_rotated": "nms_rotated(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "box_iou_rotated": "box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor",
    "roi_align_rotated_forward": (
        "roi_align_rotated_forward(Tensor input, Tensor rois, float spatial_scale, "
        "int pooled_height, int pooled_width, int sampling_ratio) -> Tensor"
    ),
    "roi_align_rotated_backward": (
        "roi_align_rotated_backward(Tensor grad, Tensor rois, float spatial_scale, "
        "int pooled_height, int pooled_width, int batch_size, int channels, int height, "
        "int width, int sampling_ratio) -> Tensor"
    ),
}


class MissingCppOpError(RuntimeError):
    """Raised when a detectron2 C++ op is called on an install without C++ ops."""


def _message(op: str) -> str:
    return (
        f"detectron2 C++ op '{op}' was called, but this detectron2 install has no C++ ops "
        "(detectron2._C is a pure-Python stand-in installed by m2_detectron2). Rotated boxes, "
        "deformable convolution and the fast COCO evaluator need detectron2 built from its "
        "GitHub source (see docs/install.md)."
    )


def _missing_op(name: str):
    def op(*args, **kwargs):
        raise MissingCppOpError(_message(name))

    op.__name__ = name
    op.__qualname__ = name
    return op


class _StandInModule(types.ModuleType):
    """Module whose every unknown attribute is an op that raises ``MissingCppOpError``."""

    IS_STANDIN = True

    # Build information that detectron2's collect_env_info() (run by default_setup) reads;
    # these describe the missing extension instead of raising.
    @staticmethod
    def get_compiler_version() -> str:
        return "none (no C++ extension; m2_detectron2 pure-Python stand-in)"

    @staticmethod
    def get_cuda_version() -> str:
        return "none (no C++ extension)"

    @staticmethod
    def has_cuda() -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _missing_op(name)


_torch_lib = None


def _register_torch_ops() -> None:
    """Define ``torch.ops.detectron2.<op>`` for the C++ ops, each raising the clear error."""
    global _torch_lib
    import torch

    if _torch_lib is not None:
        return
    lib = torch.library.Library("detectron2", "FRAGMENT")
    for name, schema in _TORCH_OPS.items():
        try:
            lib.define(schema)
        except RuntimeError:  # already defined by a real build: leave it alone
            continue
        lib.impl(name, _missing_op(name), "CompositeExplicitAutograd")
    _torch_lib = lib


def real_extension_available() -> bool:
    """Whether detectron2 ships a compiled ``detectron2._C``."""
    existing = sys.modules.get(MODULE_NAME)
    if existing is not None:
        return not getattr(existing, "IS_STANDIN", False)
    try:
        return importlib.util.find_spec(MODULE_NAME) is not None
    except ModuleNotFoundError:  # detectron2 itself is missing
        return False


def is_standin_active() -> bool:
    return getattr(sys.modules.get(MODULE_NAME), "IS_STANDIN", False)


def install_c_standin() -> bool:
    """Install the stand-in when detectron2 is importable but its ``_C`` is missing.

    Returns:
        True when the stand-in is (now) in place, False when the real extension is used.
    """
    if is_standin_active():
        return True
    if importlib.util.find_spec("detectron2") is None:
        raise ImportError(
            "detectron2 is not installed; run `make test` or scripts/install_detectron2.sh"
        )
    if real_extension_available():
        return False
    module = _StandInModule(MODULE_NAME, __doc__)
    module.__file__ = __file__
    module.__spec__ = importlib.machinery.ModuleSpec(MODULE_NAME, loader=None)
    sys.modules[MODULE_NAME] = module
    import detectron2

    detectron2._C = module
    _register_torch_ops()
    logger.info("detectron2 has no C++ extension: using m2_detectron2's pure-Python stand-in")
    return True
