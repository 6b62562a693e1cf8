"""``summary.png`` of ``make demo``: pretraining curve, kNN and AP bars, predicted masks."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

# one colour per class (tab10), used for the mask overlays
_TAB10 = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                   [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34],
                   [23, 190, 207]], dtype=np.float64)


def overlay_masks(image: np.ndarray, masks: np.ndarray, classes: Sequence[int],
                  alpha: float = 0.55) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with each mask of ``masks`` (N, H, W) bool painted in its
    class colour (tab10) at opacity ``alpha``. Returns a new uint8 array."""
    out = image.astype(np.float64)
    for m, c in zip(masks, classes):
        out[m] = (1 - alpha) * out[m] + alpha * _TAB10[int(c) % len(_TAB10)]
    return np.clip(out, 0, 255).astype(np.uint8)


def plot_summary(summary: dict, panels: Sequence[dict], class_names: Sequence[str],
                 path: str | Path, min_score: float = 0.5) -> Path:
    """Write the demo's summary figure to ``path``.

    Args:
        summary: the demo's ``results.json`` content: ``pretrain.history`` (rows with ``step``,
            ``loss`` and optionally ``knn_top1``), ``pretrain.knn`` and ``detection``
            (``{arm: {"bbox": {"AP": ..}, "segm": {"AP": ..}}}``), arms in the same order in both.
        panels: validation images, each ``{"image": (H, W, 3) uint8, "pred": {arm: {"masks":
            (N, H, W) bool, "classes": (N,) int, "scores": (N,) float}}}``.
        class_names: names of the detector's classes.
        path: the PNG to write.
        min_score: predictions below this score are not drawn.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre, det = summary["pretrain"], summary["detection"]
    arms = list(det)
    n_img = max(len(panels), 1)
    fig = plt.figure(figsize=(max(12, 2.6 * n_img), 4 + 2.6 * len(arms)), dpi=110)
    gs = fig.add_gridspec(1 + len(arms), max(3, n_img), height_ratios=[1.5] + [1] * len(arms))
    top = gs[0, :].subgridspec(1, 3, width_ratios=[1.4, 1, 1.2], wspace=0.55)

    ax = fig.add_subplot(top[0])
    hist = pre.get("history", [])
    ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], ".-", color="tab:blue")
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("loss (symmetrised BYOL)", color="tab:blue")
    ax.set_title("Momentum² Teacher pretraining")
    knn_rows = [h for h in hist if h.get("knn_top1") is not None]
    if knn_rows:
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in knn_rows], [h["knn_top1"] for h in knn_rows], "o-",
                 color="tab:orange")
        ax2.set_ylabel("teacher kNN top-1 (%)", color="tab:orange")

    colours = ["tab:green", "tab:gray"]
    ax = fig.add_subplot(top[1])
    names = list(pre["knn"])
    vals = [pre["knn"][n]["top1"] for n in names]
    bars = ax.bar(range(len(names)), vals, color=colours[:len(names)])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(names)), [n.split(" (")[0] for n in names], fontsize=8)
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title("encoder: kNN on embedded shapes")
    ax.set_ylim(0, max(vals + [1]) * 1.25)

    ax = fig.add_subplot(top[2])
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        v = [det[arm]["bbox"]["AP"], det[arm]["segm"]["AP"]]
        b = ax.bar(np.arange(2) + (i - (len(arms) - 1) / 2) * width, v, width,
                   label=arm, color=colours[i % len(colours)])
        ax.bar_label(b, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(2), ["box AP", "mask AP"])
    ax.set_ylabel("COCO AP (%)")
    ax.set_title("Mask R-CNN R18-FPN, val")
    ax.legend(fontsize=7, loc="upper right")
    top_ap = max([det[a][t]["AP"] for a in arms for t in ("bbox", "segm")] + [1])
    ax.set_ylim(0, top_ap * 1.35)

    for r, arm in enumerate(arms):
        for c, p in enumerate(panels):
            ax = fig.add_subplot(gs[1 + r, c])
            pred = p["pred"][arm]
            keep = np.asarray(pred["scores"]) >= min_score
            pred = {k: np.asarray(pred[k])[keep] for k in ("masks", "classes", "scores")}
            ax.imshow(overlay_masks(p["image"], pred["masks"], pred["classes"]))
            for m, cl, s in zip(pred["masks"], pred["classes"], pred["scores"]):
                ys, xs = np.nonzero(m)
                if len(ys):
                    ax.text(xs.min(), ys.min(), f"{class_names[int(cl)]} {s:.2f}", fontsize=6,
                            color="white", va="bottom",
                            bbox=dict(facecolor="black", alpha=0.6, pad=0.5, lw=0))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(arm, fontsize=8)
            ax.set_title(f"val image {p.get('image_id', c)}: {len(pred['masks'])} masks "
                         f"(score >= {min_score:g})",
                         fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
