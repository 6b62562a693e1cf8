"""The pure-Python stand-in for detectron2._C (only active when the real one is missing)."""

import pytest
import torch

import m2_detectron2
from m2_detectron2 import MissingCppOpError

pytestmark = pytest.mark.skipif(
    m2_detectron2.HAS_CPP_OPS, reason="detectron2 has its real C++ extension; stand-in unused"
)


def test_detectron2_modeling_imports():
    import detectron2.modeling  # noqa: F401  (fails without the stand-in)
    from detectron2 import _C

    assert getattr(_C, "IS_STANDIN", False)


def test_cpp_only_op_raises_clear_error():
    from detectron2.layers import nms_rotated
    from detectron2.structures import RotatedBoxes, pairwise_iou_rotated

    boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0], [6.0, 5.0, 4.0, 4.0, 10.0]])
    with pytest.raises(MissingCppOpError, match="'nms_rotated'.*has no C\\+\\+ ops"):
        nms_rotated(boxes, torch.tensor([0.9, 0.8]), 0.5)
    with pytest.raises(MissingCppOpError, match="box_iou_rotated"):
        pairwise_iou_rotated(RotatedBoxes(boxes), RotatedBoxes(boxes))


def test_any_c_attribute_is_an_op_that_raises():
    """deform conv on CUDA and the fast COCO evaluator call detectron2._C directly."""
    from detectron2 import _C

    with pytest.raises(MissingCppOpError, match="'deform_conv_forward'"):
        _C.deform_conv_forward(torch.zeros(1))
    with pytest.raises(MissingCppOpError, match="'COCOevalAccumulate'"):
        _C.COCOevalAccumulate({}, [])
    with pytest.raises(AttributeError):
        _C.__wrapped__


def test_plain_ops_still_work():
    """Non-C++ ops used by the transfer configs (NMS, ROIAlign from torchvision) work."""
    from detectron2.layers import ROIAlign, batched_nms

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.long), 0.5)
    assert keep.tolist() == [0, 2]
    out = ROIAlign((2, 2), 1.0, 0, aligned=True)(torch.randn(1, 1, 8, 8), torch.tensor([[0, 0, 0, 4, 4.0]]))
    assert out.shape == (1, 1, 2, 2)
