"""The demo's summary picture, drawn from fake results (no training)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from m2_detectron2.demo_plot import _TAB10, overlay_masks, plot_summary


def test_overlay_paints_only_masked_pixels_in_class_colour():
    img = np.full((6, 8, 3), 100, np.uint8)
    masks = np.zeros((2, 6, 8), bool)
    masks[0, :2, :3] = True
    masks[1, 4:, 5:] = True
    out = overlay_masks(img, masks, [3, 12], alpha=0.5)
    assert np.array_equal(out[~masks.any(0)], img[~masks.any(0)])
    assert np.array_equal(out[0, 0], np.clip(0.5 * 100 + 0.5 * _TAB10[3], 0, 255).astype(np.uint8))
    assert np.array_equal(out[5, 7], np.clip(0.5 * 100 + 0.5 * _TAB10[2], 0, 255).astype(np.uint8))
    assert img[0, 0, 0] == 100  # input untouched


def test_plot_summary_writes_a_figure_with_every_panel(tmp_path):
    arms = ["M2 Teacher (converted)", "untrained, paper init (converted)"]
    summary = {
        "pretrain": {
            "history": [{"step": s, "loss": 3.0 - s / 100, **({"knn_top1": 20.0 + s / 10}
                                                             if s % 60 == 0 else {})}
                        for s in range(10, 250, 10)],
            "knn": {"M2 Teacher (pretrained)": {"top1": 31.2},
                    "untrained (paper init)": {"top1": 20.1}}},
        "detection": {arms[0]: {"bbox": {"AP": 12.3}, "segm": {"AP": 8.1}},
                      arms[1]: {"bbox": {"AP": 5.2}, "segm": {"AP": float("nan")}}},
        "detector_seed_spread": {"bbox": 5.4, "segm": 2.0},
        "findings": ["kNN: teacher 31.2 vs untrained 20.1 (+11.1)", "box AP: no difference"],
    }
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 48, 64), bool)
    masks[0, 5:20, 5:20] = masks[1, 25:40, 30:60] = masks[2, 1:3, 1:3] = True
    pred = {"masks": masks, "classes": np.array([0, 4, 9]), "scores": np.array([0.9, 0.6, 0.1]),
            "boxes": np.array([[5, 5, 20, 20], [30, 25, 60, 40], [1, 1, 3, 3]], float),
            "file_name": "val_000001.png", "image_id": 1}  # extra keys, as the demo passes
    panels = [{"image": rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), "image_id": i,
               "pred": {a: pred for a in arms}} for i in range(2)]
    path = plot_summary(summary, panels, [f"c{i}" for i in range(10)], tmp_path / "s.png")
    assert path == tmp_path / "s.png"
    with Image.open(path) as im:
        w, h = im.size
        px = np.asarray(im.convert("RGB"))
    assert w >= 1000 and h >= 800
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 50  # drawn, not blank
