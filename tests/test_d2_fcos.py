"""M2FCOS: AdelaiDet's FCOS (the paper's supervised FCOS baseline) against Detectron2's, one test
per difference, checked against plain re-computations (target assignment included); and
training on images without instances (Detectron2 v0.6 crashes there)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

import m2_detectron2  # noqa: F401  (stand-in first)
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from m2_detectron2.modeling.fcos import M2FCOS, M2FCOSHead

LEVELS = [f"p{k}" for k in range(3, 8)]
SIZE = 128


class TinyPyramid(Backbone):
    """p3..p7 (strides 8..128) from one 1x1 conv and average pooling: a cheap FPN stand-in."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, channels, 1)
        self.channels = channels

    def forward(self, x):
        y = self.proj(x)
        return {n: F.avg_pool2d(y, 2 ** k) for n, k in zip(LEVELS, range(3, 8))}

    def output_shape(self):
        return {n: ShapeSpec(channels=self.channels, stride=2 ** k)
                for n, k in zip(LEVELS, range(3, 8))}

    @property
    def size_divisibility(self):
        return 128


def _fcos(variant: str, num_classes: int = 3, **kw) -> M2FCOS:
    bb = TinyPyramid()
    shapes = [bb.output_shape()[n] for n in LEVELS]
    head = M2FCOSHead(input_shape=shapes, conv_dims=[16], num_classes=num_classes,
                      use_scale=variant == "adelaidet")
    args = dict(test_score_thresh=0.05 if variant == "adelaidet" else 0.2,
                test_topk_candidates=1000, test_nms_thresh=0.6)
    args.update(kw)
    return M2FCOS(variant=variant, backbone=bb, head=head, head_in_features=LEVELS,
                  num_classes=num_classes, pixel_mean=[0.0, 0.0, 0.0], pixel_std=[1.0, 1.0, 1.0],
                  **args)


def _sample(boxes, classes, size=SIZE):
    inst = Instances((size, size))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return {"image": torch.rand(3, size, size) * 255, "instances": inst}


BOXES = [[10.0, 12.0, 50.0, 40.0], [60.0, 50.0, 120.0, 118.0]]


def test_adelaidet_head_has_a_learnable_scale_per_level():
    torch.manual_seed(0)
    ade, d2 = _fcos("adelaidet"), _fcos("detectron2")
    assert d2.head.scales is None
    assert isinstance(ade.head.scales, torch.nn.Parameter)
    torch.testing.assert_close(ade.head.scales.data, torch.ones(5))
    d2.head.load_state_dict({k: v for k, v in ade.head.state_dict().items() if k != "scales"})
    feats = [torch.randn(1, 16, s, s) for s in (16, 8, 4, 2, 1)]
    _, reg_ade, _ = ade.head(feats)
    _, reg_d2, _ = d2.head(feats)
    for a, b in zip(reg_ade, reg_d2):  # scales start at 1: same output as Detectron2's head
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        ade.head.scales[2] = 3.0
    logits2, reg2, ctr2 = ade.head(feats)
    for i, (a, b) in enumerate(zip(reg2, reg_d2)):
        torch.testing.assert_close(a, b * (3.0 if i == 2 else 1.0))
    # the scales are trained: one loss step gives them a gradient
    _positive_head(ade)
    ade.train()
    with EventStorage():
        losses = ade([_sample(BOXES, [0, 2])])
    sum(losses.values()).backward()
    assert ade.head.scales.grad is not None and ade.head.scales.grad[0].abs() > 0


def _positive_head(model):
    """Regression outputs around 1 stride and varied per-level scales, so GIoU and
    centerness are non-trivial."""
    with torch.no_grad():
        model.head.bbox_pred.bias.copy_(torch.tensor([1.5, 0.8, 1.0, 2.0]))
        model.head.bbox_pred.weight.normal_(0, 0.05)
        model.head.ctrness.weight.normal_(0, 0.05)
        if model.head.scales is not None:
            model.head.scales.copy_(torch.tensor([1.3, 0.7, 1.0, 1.1, 0.9]))


@torch.no_grad()
def _reference_losses(model, batch):
    """FCOS losses recomputed from the head outputs with torchvision's GIoU and focal loss,
    plain centerness and explicit AdelaiDet normalisation (matching from the model)."""
    images = model.preprocess_image(batch)
    feats = model.backbone(images.tensor)
    feats = [feats[n] for n in LEVELS]
    logits, deltas, ctr = model.head(feats)
    strides = [8, 16, 32, 64, 128]
    anchors = model.anchor_generator(feats)
    labels, gt_boxes = model.label_anchors(anchors, [b["instances"] for b in batch])
    centers = torch.cat([a.get_centers() for a in anchors])
    stride = torch.cat([torch.full((len(a),), float(s)) for a, s in zip(anchors, strides)])
    flat = lambda xs, k: torch.cat([x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, k)  # noqa
                                    for x in xs], dim=1)
    logits, deltas, ctr = flat(logits, model.num_classes), flat(deltas, 4), flat(ctr, 1)[..., 0]
    labels = torch.stack(labels)
    pos = labels < model.num_classes
    num_pos = int(pos.sum())
    target = torch.zeros_like(logits)
    target[pos, labels[pos]] = 1.0
    cls = torchvision.ops.sigmoid_focal_loss(logits, target, 0.25, 2.0, reduction="sum")
    gt = torch.stack(gt_boxes)[pos]
    c, s = centers.expand(len(batch), -1, -1)[pos], stride.expand(len(batch), -1)[pos]
    d = deltas[pos].clamp(min=0) * s[:, None]
    pred = torch.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2],
                        c[:, 1] + d[:, 3]], dim=1)
    # AdelaiDet's GIoU: IoU smoothed with +1 on areas measured in stride^2, from pixel boxes
    inter_wh = (torch.minimum(pred[:, 2:], gt[:, 2:]) - torch.maximum(pred[:, :2], gt[:, :2]))
    inter = inter_wh.clamp(min=0).prod(dim=1)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    union = area(pred) + area(gt) - inter
    hull = (torch.maximum(pred[:, 2:], gt[:, 2:]) - torch.minimum(pred[:, :2], gt[:, :2]))
    hull = hull.prod(dim=1)
    giou = (inter / s**2 + 1) / (union / s**2 + 1) - (hull - union) / hull
    plain_giou = torch.diagonal(torchvision.ops.generalized_box_iou(pred, gt))
    left, top = c[:, 0] - gt[:, 0], c[:, 1] - gt[:, 1]
    right, bottom = gt[:, 2] - c[:, 0], gt[:, 3] - c[:, 1]
    ctr_t = torch.sqrt(torch.minimum(left, right) / torch.maximum(left, right)
                       * torch.minimum(top, bottom) / torch.maximum(top, bottom))
    ctr_loss = F.binary_cross_entropy_with_logits(ctr[pos], ctr_t, reduction="sum")
    return {"num_pos": num_pos, "cls_sum": cls, "giou_terms": 1 - giou, "ctr_t": ctr_t,
            "ctr_sum": ctr_loss, "plain_giou_terms": 1 - plain_giou}


def test_adelaidet_loss_is_centerness_weighted_smoothed_giou_normalised_per_iteration():
    torch.manual_seed(0)
    model = _fcos("adelaidet")
    _positive_head(model)
    batch = [_sample(BOXES, [0, 2]), _sample([[20.0, 30.0, 90.0, 100.0]], [1])]
    model.train()
    with EventStorage():
        losses = model(batch)
    ref = _reference_losses(model, batch)
    n = ref["num_pos"]
    assert n > 10
    weighted = (ref["ctr_t"] * ref["giou_terms"]).sum() / ref["ctr_t"].sum()
    torch.testing.assert_close(losses["loss_fcos_loc"], weighted)
    torch.testing.assert_close(losses["loss_fcos_cls"], ref["cls_sum"] / n)
    torch.testing.assert_close(losses["loss_fcos_ctr"], ref["ctr_sum"] / n)
    # the weighting and the smoothing matter here (the test could not pass without either)
    assert abs(float(weighted) - float(ref["giou_terms"].mean())) > 1e-3
    plain = (ref["ctr_t"] * ref["plain_giou_terms"]).sum() / ref["ctr_t"].sum()
    assert abs(float(weighted) - float(plain)) > 1e-3

    # Detectron2's variant on the same weights: plain GIoU sum, moving-average normaliser
    d2 = _fcos("detectron2")
    d2.load_state_dict({k: v for k, v in model.state_dict().items() if k != "head.scales"})
    model.head.scales.data.fill_(1.0)  # compare the losses alone, without the scales
    with EventStorage():
        la, ld = model(batch), d2(batch)
    ref = _reference_losses(d2, batch)
    ema = 0.9 * 300 + 0.1 * ref["num_pos"]  # Detectron2's normaliser after one iteration
    torch.testing.assert_close(ld["loss_fcos_loc"], ref["plain_giou_terms"].sum() / ema)
    torch.testing.assert_close(la["loss_fcos_loc"],
                               (ref["ctr_t"] * ref["giou_terms"]).sum() / ref["ctr_t"].sum())


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _predictions(num_classes, entries):
    """Head outputs for a 128 px image: every probability ~0 except ``entries``:
    (level, y, x, class, cls prob, ctr prob); all regressions 1 (a 2-stride box)."""
    sides = [16, 8, 4, 2, 1]
    logits = [torch.full((1, num_classes, s, s), -20.0) for s in sides]
    ctr = [torch.full((1, 1, s, s), -20.0) for s in sides]
    deltas = [torch.ones(1, 4, s, s) for s in sides]
    for lvl, y, x, k, p_cls, p_ctr in entries:
        logits[lvl][0, k, y, x] = _logit(p_cls)
        ctr[lvl][0, 0, y, x] = _logit(p_ctr)
    feats = [torch.zeros(1, 16, s, s) for s in sides]
    images = ImageList(torch.zeros(1, 3, SIZE, SIZE), [(SIZE, SIZE)])
    return images, feats, [logits, deltas, ctr]


def _detections(model, entries):
    images, feats, preds = _predictions(model.num_classes, entries)
    (r,) = model.forward_inference(images, feats, preds)
    return sorted(zip(r.pred_classes.tolist(), r.scores.tolist(), r.pred_boxes.tensor.tolist()),
                  key=lambda t: -t[1])


def test_adelaidet_test_candidates_by_class_probability():
    entries = [
        (0, 2, 2, 0, 0.9, 0.01),     # cls 0.9, sqrt(cls*ctr) 0.095: AdelaiDet only
        (0, 10, 10, 1, 0.045, 0.999),  # cls < 0.05, sqrt(cls*ctr) 0.212: Detectron2 only
        (1, 5, 5, 1, 0.5, 0.5),      # both
    ]
    ade = _detections(_fcos("adelaidet"), entries)
    d2 = _detections(_fcos("detectron2"), entries)
    assert [k for k, _, _ in ade] == [1, 0] and [k for k, _, _ in d2] == [1, 1]
    assert ade[0][1] == pytest.approx(0.5, abs=1e-5)
    assert ade[1][1] == pytest.approx(math.sqrt(0.9 * 0.01), abs=1e-5)
    assert d2[1][1] == pytest.approx(math.sqrt(0.045 * 0.999), abs=1e-5)
    # P3 location (row 2, col 2) has its point at (20, 20); regression 1 = one stride (8 px)
    assert ade[1][2] == pytest.approx([12.0, 12.0, 28.0, 28.0])


def test_adelaidet_ranks_candidates_by_cls_times_centerness():
    # one candidate allowed per level: the higher cls x ctr wins, not the higher cls
    entries = [(0, 2, 2, 0, 0.9, 0.01), (0, 12, 12, 2, 0.3, 0.9)]
    ade = _detections(_fcos("adelaidet", test_topk_candidates=1), entries)
    assert [(k, round(s, 4)) for k, s, _ in ade] == [(2, round(math.sqrt(0.27), 4))]


@pytest.mark.parametrize("variant", ["adelaidet", "detectron2"])
def test_fcos_trains_a_step_with_an_image_without_instances(variant):
    torch.manual_seed(0)
    model = _fcos(variant)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.head.cls_score.weight.detach().clone()
    with EventStorage():
        losses = model([_sample(BOXES, [0, 2]), _sample([], [])])
        total = sum(losses.values())
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
        assert not torch.equal(before, model.head.cls_score.weight)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        only_empty = model([_sample([], [])])
    assert only_empty["loss_fcos_loc"] == 0 and only_empty["loss_fcos_ctr"] == 0
    assert 0 < float(only_empty["loss_fcos_cls"].detach()) < math.inf
    # the empty image labels every location as background
    feats = [torch.zeros(1, 16, s, s) for s in (16, 8, 4, 2, 1)]
    anchors = model.anchor_generator(feats)
    labels, _ = model.label_anchors(anchors, [_sample([], [])["instances"]])
    assert labels[0].tolist() == [model.num_classes] * sum(len(a) for a in anchors)


@pytest.mark.skipif(not hasattr(FCOS, "match_anchors"),
                    reason="Detectron2 after v0.6 (upstream ef2c3abb) handles images without "
                           "instances in FCOS: only v0.6's label_anchors crashes there")
def test_detectron2_v06_fcos_crashes_without_instances():
    """Why the guard exists: the installed v0.6 FCOS fails on an image without instances."""
    model = _fcos("detectron2")
    feats = [torch.zeros(1, 16, s, s) for s in (16, 8, 4, 2, 1)]
    anchors = model.anchor_generator(feats)
    with pytest.raises((RuntimeError, IndexError)):
        FCOS.label_anchors(model, anchors, [_sample([], [])["instances"]])


def _adelaidet_targets(height, width, boxes, classes, num_classes, strides=(8, 16, 32, 64, 128),
                       sizes_of_interest=(64, 128, 256, 512), radius=1.5):
    """AdelaiDet's FCOS target assignment, written out location by location in float64.

    Level k has locations (i·s + s//2, j·s + s//2) and takes boxes whose largest distance from
    the location to a side lies in [bounds[k], bounds[k + 1]], both inclusive (bounds -1, 64,
    128, 256, 512, inf). The location must lie strictly inside the square of half-side
    radius·s around the box centre, clipped to the box. Among the boxes left, the one of
    smallest area; the first one on equal areas (torch.min's index on CPU). Locations are
    listed level by level, row by row, as the head's outputs are flattened.

    Returns:
        labels (num_classes for background) and matched boxes (None for background).
    """
    bounds = [-1.0, *sizes_of_interest, math.inf]
    areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
    labels, matched = [], []
    for k, s in enumerate(strides):
        for j in range(height // s):
            for i in range(width // s):
                px, py = i * s + s // 2, j * s + s // 2
                best = None
                for m, (x0, y0, x1, y1) in enumerate(boxes):
                    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, radius * s
                    if not (max(cx - r, x0) < px < min(cx + r, x1)
                            and max(cy - r, y0) < py < min(cy + r, y1)):
                        continue
                    if not bounds[k] <= max(px - x0, py - y0, x1 - px, y1 - py) <= bounds[k + 1]:
                        continue
                    if best is None or areas[m] < areas[best]:
                        best = m
                labels.append(num_classes if best is None else classes[best])
                matched.append(None if best is None else boxes[best])
    return labels, matched


def _location_index(stride, x, y, side=256):
    """Index of location (x, y) of the level of ``stride`` in the flattened outputs."""
    offset = sum((side // s) ** 2 for s in (8, 16, 32, 64, 128) if s < stride)
    return offset + (y // stride) * (side // stride) + x // stride


# 10003 px^2 exactly: 89.3125 x 112, around the centre of the 100 x 100 box (10000 px^2)
NEAR_EQUAL = [[65.34375, 54.0, 154.65625, 166.0], [60.0, 60.0, 160.0, 160.0]]
TARGET_IMAGES = [
    # nested (the second inside the first) and overlapping (the third crosses both)
    ([[16.0, 16.0, 240.0, 240.0], [96.0, 96.0, 160.0, 160.0], [120.0, 40.0, 250.0, 150.0]],
     [0, 1, 2]),
    # boundaries: P4 location (72, 72) is exactly 64 px from the first box's left and right
    # sides, P3 location (100, 164) exactly 64 px from the second's
    ([[8.0, 40.0, 136.0, 104.0], [36.0, 140.0, 164.0, 188.0]], [2, 1]),
    # near-equal areas, the larger first: 10003 vs 10000 px^2
    (NEAR_EQUAL, [1, 0]),
    # equal areas (64 x 64), overlapping centre regions; and a single box
    ([[150.0, 150.0, 214.0, 214.0], [158.0, 154.0, 222.0, 218.0], [20.0, 30.0, 60.0, 90.0]],
     [0, 2, 1]),
]


def test_adelaidet_targets_match_a_per_location_implementation_of_adelaidets_rule():
    model, d2 = _fcos("adelaidet"), _fcos("detectron2")
    feats = [torch.zeros(1, 16, 256 // s, 256 // s) for s in (8, 16, 32, 64, 128)]
    anchors = model.anchor_generator(feats)
    gts = [_sample(b, c, size=256)["instances"] for b, c in TARGET_IMAGES]
    labels, boxes = model.label_anchors(anchors, gts)
    d2_labels, _ = d2.label_anchors(anchors, gts)
    for (b, c), label, box in zip(TARGET_IMAGES, labels, boxes):
        ref_labels, ref_boxes = _adelaidet_targets(256, 256, b, c, model.num_classes)
        assert label.tolist() == ref_labels
        pos = [i for i, r in enumerate(ref_boxes) if r is not None]
        assert box[pos].tolist() == [ref_boxes[i] for i in pos]
        assert len(pos) >= 10
    # the cases where AdelaiDet's rule differs from Detectron2's are in the images
    p4 = _location_index(16, 72, 72)
    assert labels[1][p4] == 2 and d2_labels[1][p4] == model.num_classes
    p3 = _location_index(8, 100, 164)
    assert labels[1][p3] == 1 and d2_labels[1][p3] == model.num_classes
    smaller = (labels[2] == 0) & (d2_labels[2] == 1)  # Detectron2's key ties 10003 with 10000
    assert smaller.sum() >= 4
    # equal areas: locations that are candidates of both boxes exist (and take the first)
    (b, c), n = TARGET_IMAGES[3], model.num_classes
    first, second = (_adelaidet_targets(256, 256, [b[i]], [c[i]], n)[0] for i in (0, 1))
    assert sum(x == c[0] and y == c[1] for x, y in zip(first, second)) >= 4
