"""FCOS for yacs configs, in two variants.

Detectron2 ships FCOS only as a LazyConfig model. ``M2FCOS`` subclasses Detectron2's ``FCOS``
(its anchor points, focal loss and box decoding are reused) with a ``from_config`` that reads
``cfg.MODEL.FCOS``; it is registered as ``META_ARCHITECTURE: "M2FCOS"``.
``MODEL.FCOS.VARIANT`` picks the matching, head, loss and inference:

``"adelaidet"`` (the shipped configs): FCOS as AdelaiDet's ``FCOS_R_50_1x`` trains it, the
    supervised baseline of the paper's Table 10 (38.7 AP):

    - targets assigned by AdelaiDet's rule (:func:`match_locations`): centre sampling, size
      ranges with inclusive bounds, and the smallest-area box for a location inside several;
    - a learnable scalar per FPN level multiplies the regression output (initialised to 1);
    - the GIoU loss of each positive location (IoU smoothed as (inter + 1) / (union + 1), areas
      in stride units, as AdelaiDet computes it) is weighted by its centerness target and the
      sum is divided by the sum of centerness targets (averaged over workers); classification and
      centerness losses are divided by this iteration's number of positives (averaged over
      workers), not by a moving average;
    - at test time a location/class is a candidate when its classification probability exceeds
      ``SCORE_THRESH_TEST`` (0.05); candidates are ranked (top ``TOPK_CANDIDATES_TEST`` per
      level) and reported by sqrt(cls x centerness).

``"detectron2"``: Detectron2's own ``FCOS`` class unchanged: Detectron2's matching (exclusive
    size bounds; ties broken by a float32 ``1e8 - area`` key, under which areas a few px^2 apart
    compare equal and the first box wins, not the smaller), no scales, plain GIoU summed over
    positives, all losses divided by a moving average of the number of positives, candidates
    kept when sqrt(cls x centerness) exceeds ``SCORE_THRESH_TEST`` (Detectron2 uses 0.2).

Both variants guard Detectron2 v0.6's crash on a training image without instances (fixed
upstream after v0.6): such an image labels every location as background.

The matching backbone ``build_fcos_resnet_fpn_backbone`` computes P6/P7 from P5 (as AdelaiDet
and Detectron2's LazyConfig do), not from C5 as RetinaNet's does.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage
from fvcore.nn import sigmoid_focal_loss_jit
from torch import Tensor, nn
from torch.nn import functional as F

FCOS_VARIANTS = ("adelaidet", "detectron2")


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups, as "GN" means in Detectron2. v0.6's RetinaNetHead probes ``norm(1)`` only to
    # read the layer type, which recent torch rejects for 32 groups; the probe gets 1 group.
    return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)


def _head_norm(norm: str):
    return _group_norm if norm == "GN" else norm


def _mean_over_workers(value: Tensor) -> float:
    """``value`` averaged over the distributed workers (itself on one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone().float()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def centerness(ltrb: Tensor) -> Tensor:
    """FCOS centerness of (left, top, right, bottom) distances, shape (P, 4) -> (P,).

    sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)); 1 at a box centre, 0 on its border.
    """
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
    ratio = (lr.min(dim=1).values / lr.max(dim=1).values) * (
        tb.min(dim=1).values / tb.max(dim=1).values)
    return ratio.clamp(min=0).sqrt()


def ltrb_giou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """1 - GIoU of boxes given as (left, top, right, bottom) distances from the same point, in
    stride units, shape (P, 4) -> (P,). As in AdelaiDet's FCOS, the IoU term is smoothed:
    (intersection + 1) / (union + 1), with areas in stride^2."""
    pred_area = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    target_area = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    lo, hi = torch.minimum(pred, target), torch.maximum(pred, target)
    inter = (lo[:, 0] + lo[:, 2]) * (lo[:, 1] + lo[:, 3])
    enclosing = (hi[:, 0] + hi[:, 2]) * (hi[:, 1] + hi[:, 3])
    union = pred_area + target_area - inter
    iou = (inter + 1.0) / (union + 1.0)
    return 1.0 - (iou - (enclosing - union) / enclosing)


# Detectron2 v0.6's FCOS matches in ``match_anchors`` and hands the matched boxes from
# ``label_anchors`` to ``losses`` as ``Boxes``; later Detectron2 (upstream commit ef2c3abb,
# "Handle empty instances in FCOS") hands over tensors. M2FCOS keeps tensors and converts at its
# two calls into Detectron2's methods: the only place that tells the versions apart.
_D2_FCOS_PASSES_BOXES = hasattr(FCOS, "match_anchors")


def _from_d2_boxes(boxes) -> List[Tensor]:
    return [b.tensor for b in boxes] if _D2_FCOS_PASSES_BOXES else list(boxes)


def _to_d2_boxes(boxes: List[Tensor]):
    return [Boxes(b) for b in boxes] if _D2_FCOS_PASSES_BOXES else boxes


def fcos_size_ranges(strides: Sequence[int]) -> List[Tuple[float, float]]:
    """AdelaiDet's sizes of interest for FPN levels of the given strides.

    Level ``k`` takes the locations whose largest distance to the sides of a box lies in
    [4·s_k, 8·s_k], both bounds inclusive; the first level starts at -1 and the last is
    unbounded. For P3–P7 (strides 8–128) the boundaries are 64, 128, 256 and 512 px.

    Returns:
        one (low, high) pair per level.
    """
    last = len(strides) - 1
    return [(-1.0 if k == 0 else 4.0 * s, math.inf if k == last else 8.0 * s)
            for k, s in enumerate(strides)]


def match_locations(points: Tensor, strides: Tensor, size_ranges: Tensor, boxes: Tensor,
                    radius: float) -> Tensor:
    """FCOS target assignment as AdelaiDet defines it, for one image.

    A location is a candidate for a box when it lies strictly inside the box's centre region
    (the square of half-side ``radius`` x its stride around the box centre, clipped to the box)
    and the largest of its four distances to the box sides lies in its level's size range
    (inclusive). Among the candidates it takes the box of smallest area, the first such box on
    equal areas; a location without candidates is background.

    Args:
        points: (R, 2) location coordinates (x, y), in pixels.
        strides: (R,) stride of each location's level.
        size_ranges: (R, 2) inclusive (low, high) range of each location's level.
        boxes: (M, 4) ground-truth boxes (x0, y0, x1, y1), M >= 1.
        radius: centre-sampling radius, in strides.

    Returns:
        (R,) index of the matched box, -1 for background.
    """
    x, y = points[:, 0, None], points[:, 1, None]  # (R, 1)
    x0, y0, x1, y1 = boxes.unbind(dim=1)  # (M,)
    half = radius * strides[:, None]  # (R, 1)
    cx, cy = (x0 + x1) * 0.5, (y0 + y1) * 0.5
    region = torch.stack([x - torch.maximum(cx - half, x0), y - torch.maximum(cy - half, y0),
                          torch.minimum(cx + half, x1) - x, torch.minimum(cy + half, y1) - y],
                         dim=2)  # (R, M, 4)
    largest = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2).max(dim=2).values  # (R, M)
    candidate = (region.min(dim=2).values > 0) & (largest >= size_ranges[:, :1]) & (
        largest <= size_ranges[:, 1:])
    area = torch.where(candidate, ((x1 - x0) * (y1 - y0))[None], math.inf)  # (R, M)
    smallest = area.min(dim=1, keepdim=True).values
    index = (area == smallest).to(torch.int32).argmax(dim=1)  # argmax: the first maximum
    index[smallest[:, 0] == math.inf] = -1
    return index


class M2FCOSHead(FCOSHead):
    """Detectron2's FCOS head, optionally with one learnable scale per level on the regression
    output (AdelaiDet's ``USE_SCALE``; Detectron2 drops it since its targets are divided by
    the stride)."""

    def __init__(self, *, input_shape: List[ShapeSpec], conv_dims: List[int],
                 use_scale: bool = False, **kwargs):
        super().__init__(input_shape=input_shape, conv_dims=conv_dims, **kwargs)
        # one scalar per level (a parameter, so it is trained and checkpointed)
        self.scales = nn.Parameter(torch.ones(len(input_shape))) if use_scale else None

    def forward(self, features):
        logits, bbox_reg, ctrness = super().forward(features)
        if self.scales is not None:
            bbox_reg = [reg * self.scales[i] for i, reg in enumerate(bbox_reg)]
        return logits, bbox_reg, ctrness


@META_ARCH_REGISTRY.register()
class M2FCOS(FCOS):
    """FCOS built from ``cfg.MODEL.FCOS``: GN head, centerness, P3–P7; ``variant`` selects
    AdelaiDet's or Detectron2's loss and inference (see the module docstring)."""

    @configurable
    def __init__(self, *, variant: str = "detectron2", **kwargs):
        if variant not in FCOS_VARIANTS:
            raise ValueError(f"MODEL.FCOS.VARIANT must be one of {FCOS_VARIANTS}, got {variant!r}")
        super().__init__(**kwargs)
        self.variant = variant

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        f = cfg.MODEL.FCOS
        if f.VARIANT not in FCOS_VARIANTS:
            raise ValueError(f"MODEL.FCOS.VARIANT must be one of {FCOS_VARIANTS}, "
                             f"got {f.VARIANT!r}")
        shapes = backbone.output_shape()
        missing = [k for k in f.IN_FEATURES if k not in shapes]
        if missing:
            raise ValueError(f"MODEL.FCOS.IN_FEATURES {missing} are not produced by the backbone "
                             f"(it outputs {sorted(shapes)})")
        feature_shapes = [shapes[k] for k in f.IN_FEATURES]
        channels = feature_shapes[0].channels
        head = M2FCOSHead(
            input_shape=feature_shapes,
            conv_dims=[channels] * f.NUM_CONVS,
            num_classes=f.NUM_CLASSES,
            norm=_head_norm(f.HEAD_NORM),
            prior_prob=f.PRIOR_PROB,
            use_scale=f.VARIANT == "adelaidet",
        )
        return {
            "variant": f.VARIANT,
            "backbone": backbone,
            "head": head,
            "head_in_features": list(f.IN_FEATURES),
            "num_classes": f.NUM_CLASSES,
            "center_sampling_radius": f.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": f.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": f.FOCAL_LOSS_GAMMA,
            "test_score_thresh": f.SCORE_THRESH_TEST,
            "test_topk_candidates": f.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": f.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    # ---- matching

    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]):
        """Class label (``num_classes`` for background) and matched box of every anchor point.

        ``"adelaidet"``: :func:`match_locations`, AdelaiDet's rule. ``"detectron2"``:
        Detectron2's own matching (exclusive size bounds, ties broken by a float32
        ``1e8 - area`` key), applied to the images that have instances.

        Args:
            anchors: one ``Boxes`` per level, side = stride, centred on the locations.
            gt_instances: per image, ``gt_boxes`` and ``gt_classes``.

        Returns:
            per image, labels (R,) and matched boxes (R, 4) as tensors; an image without
            instances labels every location as background (Detectron2 v0.6 crashes there).
        """
        num_anchors = sum(len(a) for a in anchors)
        matched = [None] * len(gt_instances)
        nonempty = [i for i, g in enumerate(gt_instances) if len(g) > 0]
        if self.variant == "detectron2" and nonempty:
            labels, boxes = super().label_anchors(anchors, [gt_instances[i] for i in nonempty])
            for i, label, box in zip(nonempty, labels, _from_d2_boxes(boxes)):
                matched[i] = (label, box)
        elif nonempty:
            points = Boxes.cat(anchors).get_centers()
            strides, ranges = [], []
            for a, s, r in zip(anchors, self.anchor_generator.strides,
                               fcos_size_ranges(self.anchor_generator.strides)):
                strides.append(torch.full((len(a),), float(s)))
                ranges.append(torch.tensor(r).expand(len(a), 2))
            strides = torch.cat(strides).to(points.device)
            ranges = torch.cat(ranges).to(points.device)
            for i in nonempty:
                gt = gt_instances[i]
                index = match_locations(points, strides, ranges, gt.gt_boxes.tensor,
                                        self.center_sampling_radius)
                label = gt.gt_classes[index.clip(min=0)]
                label[index < 0] = self.num_classes
                matched[i] = (label, gt.gt_boxes.tensor[index.clip(min=0)])
        device = anchors[0].tensor.device
        background = (torch.full((num_anchors,), self.num_classes, dtype=torch.long,
                                 device=device), torch.zeros(num_anchors, 4, device=device))
        matched = [m if m is not None else background for m in matched]
        return [m[0] for m in matched], [m[1] for m in matched]

    # ---- losses

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes,
               pred_centerness):
        if self.variant == "detectron2":
            return super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas,
                                  _to_d2_boxes(gt_boxes), pred_centerness)
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos = pos.sum()
        get_event_storage().put_scalar("num_pos_anchors", num_pos.item() / num_images)
        normalizer = max(_mean_over_workers(num_pos), 1.0)

        logits = torch.cat(pred_logits, dim=1)
        target = F.one_hot(gt_labels, self.num_classes + 1)[..., :-1].to(logits.dtype)
        loss_cls = sigmoid_focal_loss_jit(logits, target, alpha=self.focal_loss_alpha,
                                          gamma=self.focal_loss_gamma, reduction="sum")

        anchor_boxes = Boxes.cat(anchors).tensor  # (R, 4)
        pos_anchors = anchor_boxes.unsqueeze(0).expand(num_images, -1, -1)[pos]
        pos_gt = torch.stack(gt_boxes)[pos]
        # distances to the four box sides in stride units (the linear transform divides by the
        # anchor size, which is the stride); predictions are clamped at 0 as decoding does
        target_ltrb = self.box2box_transform.get_deltas(pos_anchors, pos_gt)
        pred_ltrb = F.relu(torch.cat(pred_anchor_deltas, dim=1)[pos])
        ctr_target = centerness(target_ltrb)
        ctr_normalizer = max(_mean_over_workers(ctr_target.sum()), 1e-6)
        loss_loc = (ltrb_giou_loss(pred_ltrb, target_ltrb) * ctr_target).sum()

        ctr_pred = torch.cat(pred_centerness, dim=1).squeeze(2)[pos]
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_pred, ctr_target, reduction="sum")
        return {
            "loss_fcos_cls": loss_cls / normalizer,
            "loss_fcos_loc": loss_loc / ctr_normalizer,
            "loss_fcos_ctr": loss_ctr / normalizer,
        }

    # ---- inference

    def forward_inference(self, images, features: List[Tensor], predictions: List[List[Tensor]]):
        if self.variant == "detectron2":
            return super().forward_inference(images, features, predictions)
        pred_logits, pred_deltas, pred_ctr = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1])
        anchors = self.anchor_generator(features)
        results: List[Instances] = []
        for i, image_size in enumerate(images.image_sizes):
            per_level = [
                self._candidates(a, logits[i], deltas[i], ctr[i], image_size)
                for a, logits, deltas, ctr in zip(anchors, pred_logits, pred_deltas, pred_ctr)
            ]
            pred = Instances.cat(per_level)
            keep = batched_nms(pred.pred_boxes.tensor, pred.scores, pred.pred_classes,
                               self.test_nms_thresh)
            results.append(pred[keep[: self.max_detections_per_image]])
        return results

    def _candidates(self, anchors: Boxes, logits: Tensor, deltas: Tensor, ctr: Tensor,
                    image_size) -> Instances:
        """One level of one image, AdelaiDet's rule: keep (location, class) pairs whose
        classification probability exceeds the threshold, rank them by cls x centerness,
        keep the top ``test_topk_candidates`` and report sqrt(cls x centerness)."""
        cls = logits.sigmoid()  # (HW, K)
        keep = cls > self.test_score_thresh
        score = (cls * ctr.sigmoid())[keep]
        idx = keep.nonzero()
        score, order = score.sort(descending=True)
        order = order[: self.test_topk_candidates]
        loc, cls_idx = idx[order].unbind(dim=1)
        boxes = self.box2box_transform.apply_deltas(deltas[loc], anchors.tensor[loc])
        return Instances(image_size, pred_boxes=Boxes(boxes),
                         scores=score[: self.test_topk_candidates].sqrt(), pred_classes=cls_idx)


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + FPN (P3–P5) + P6/P7 computed from P5, as in FCOS."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
