"""``summary.png`` of ``make demo``: pretraining curve, kNN and AP bars, top detections."""

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
                 path: str | Path) -> Path:
    """Write the demo's summary figure to ``path``.

    Args:
        summary: the demo's ``results.json`` content: ``pretrain.history`` (rows with ``step``,
            ``loss`` and optionally ``knn_top1``), ``pretrain.knn`` (teacher first, then the
            untrained network), ``detection`` (``{arm: {"bbox": {"AP": ..}, "segm": {"AP": ..}}}``)
            and optionally ``detector_seed_spread`` (``{"bbox": .., "segm": ..}``, drawn as
            error bars) and ``findings`` (lines of text printed under the plots).
        panels: validation images, each ``{"image": (H, W, 3) uint8, "pred": {arm: {"boxes":
            (N, 4) xyxy, "masks": (N, H, W) bool, "classes": (N,) int, "scores": (N,) float}}}``
            holding the detections to draw (the demo passes each detector's best few).
        class_names: names of the detector's classes.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    pre, det = summary["pretrain"], summary["detection"]
    arms = list(det)
    findings = summary.get("findings", [])
    n_img = max(len(panels), 1)
    n_cols = max(3, n_img)
    fig = plt.figure(figsize=(max(13, 3.2 * n_cols), 5.2 + 3.2 * len(arms) + 0.22 * len(findings)),
                     dpi=100)
    gs = fig.add_gridspec(2 + len(arms), n_cols,
                          height_ratios=[1.6] + [1] * len(arms) + [0.08 + 0.1 * len(findings)])
    top = gs[0, :].subgridspec(1, 3, width_ratios=[1.4, 1, 1.2], wspace=0.6)
    colours = ["tab:green", "tab:gray"]
    names = list(pre["knn"])
    vals = [pre["knn"][n]["top1"] for n in names]

    ax = fig.add_subplot(top[0])
    hist = pre.get("history", [])
    ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], "-", color="tab:blue")
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("loss (symmetrised BYOL)", color="tab:blue")
    ax.set_title("Momentum² Teacher pretraining")
    knn_rows = [h for h in hist if h.get("knn_top1") is not None]
    if knn_rows:
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in knn_rows], [h["knn_top1"] for h in knn_rows], "o-",
                 color="tab:orange", label="teacher")
        if len(vals) > 1:
            ax2.axhline(vals[1], color="tab:gray", ls="--", label=names[1])
        ax2.set_ylim(0, 100)
        ax2.set_ylabel("kNN top-1 (%)", color="tab:orange")
        ax2.legend(fontsize=8, loc="lower right")

    ax = fig.add_subplot(top[1])
    bars = ax.bar(range(len(names)), vals, color=colours[:len(names)])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=9)
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title("encoder: kNN (k=20), embedded shapes")
    ax.set_ylim(0, 100)

    ax = fig.add_subplot(top[2])
    spread = summary.get("detector_seed_spread", {})
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        v = [det[arm]["bbox"]["AP"], det[arm]["segm"]["AP"]]
        err = [spread.get("bbox", 0) / 2, spread.get("segm", 0) / 2] if spread else None
        b = ax.bar(np.arange(2) + (i - (len(arms) - 1) / 2) * width, v, width, yerr=err,
                   capsize=4, label=arm, color=colours[i % len(colours)])
        ax.bar_label(b, fmt="%.1f", fontsize=9, padding=2)
    ax.set_xticks(range(2), ["box AP", "mask AP"])
    ax.set_ylabel("COCO AP (%)")
    ax.set_title("Mask R-CNN R18-FPN, val" + ("\n(bars: +-half the detector-seed spread)"
                                              if spread else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    top_ap = max([v for a in arms for t in ("bbox", "segm")
                  if np.isfinite(v := det[a][t]["AP"])] + [1])  # COCO AP is NaN without detections
    ax.set_ylim(0, top_ap * 1.45 + max(spread.values(), default=0))

    for r, arm in enumerate(arms):
        for c, p in enumerate(panels):
            ax = fig.add_subplot(gs[1 + r, c])
            pred = {k: np.asarray(v) for k, v in p["pred"][arm].items()
                    if k in ("boxes", "masks", "classes", "scores")}
            ax.imshow(overlay_masks(p["image"], pred["masks"], pred["classes"]))
            for j in range(len(pred["scores"])):
                colour = _TAB10[int(pred["classes"][j]) % len(_TAB10)] / 255
                x0, y0, x1, y1 = pred["boxes"][j]
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5,
                                       edgecolor=colour))
                ax.text(x0, y0, f"{class_names[int(pred['classes'][j])]} "
                        f"{pred['scores'][j]:.2f}", fontsize=9, color="white", va="top",
                        bbox=dict(facecolor=colour, alpha=0.85, pad=0.5, lw=0))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(arm.replace(" (", "\n("), fontsize=10)
            ax.set_title(f"val image {p.get('image_id', c)}: top {len(pred['scores'])} "
                         "detections", fontsize=10)
    if findings:
        ax = fig.add_subplot(gs[-1, :])
        ax.axis("off")
        ax.text(0, 1, "\n".join(findings), va="top", ha="left", fontsize=10, wrap=True)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
