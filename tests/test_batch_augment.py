"""Device-side (batched) two-view augmentation, run on CPU tensors."""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from m2_pretrain.data import batch_augment as BA
from m2_pretrain.data.augment import STUDENT_VIEW, TEACHER_VIEW, ViewAugConfig
from m2_pretrain.data.embedded import render_sample
from m2_pretrain.checkpoint import list_checkpoints, safe_load
from m2_pretrain.engine.trainer import Trainer
from m2_pretrain.models.build import build_augmentation

from helpers import sigterm_during_step, tiny_config


def _images():
    """Shapes with gradients and noise, plus pure noise (saturated colours everywhere)."""
    imgs = [render_sample(i, 48)["image"] for i in range(3)]
    imgs.append(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    return imgs


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255


def _mad(pil_img: Image.Image, x: torch.Tensor) -> float:
    """Mean absolute difference in uint8 levels."""
    ref = np.asarray(pil_img).astype(np.float64)
    return float(np.abs(ref - x[0].permute(1, 2, 0).double().numpy() * 255).mean())


@pytest.mark.parametrize("name,pil_op,op,values", [
    ("brightness", TF.adjust_brightness, BA.adjust_brightness, [0.6, 1.4]),
    ("contrast", TF.adjust_contrast, BA.adjust_contrast, [0.6, 1.4]),
    ("saturation", TF.adjust_saturation, BA.adjust_saturation, [0.0, 0.6, 1.4]),
    ("hue", TF.adjust_hue, BA.adjust_hue, [-0.1, -0.03, 0.05, 0.1, 0.5]),
])
def test_colour_ops_match_torchvision_pil(name, pil_op, op, values):
    for a in _images():
        for v in values:
            got = op(_tensor(a), torch.tensor([v]))
            mad = _mad(pil_op(Image.fromarray(a), v), got)
            assert mad <= 2.0, f"{name}({v}): {mad:.2f} levels"
    if name == "hue":  # the shift is not a no-op, and the sign matters
        a = _images()[3]
        assert _mad(Image.fromarray(a), op(_tensor(a), torch.tensor([0.1]))) > 10


def test_gray_blur_solarize_match_torchvision_pil():
    for a in _images():
        img = Image.fromarray(a)
        assert _mad(TF.rgb_to_grayscale(img, 3), BA.grayscale(_tensor(a))) <= 2.0
        assert _mad(TF.solarize(img, 128), BA.solarize(_tensor(a))) <= 2.0
        for sigma in (0.1, 0.7, 2.0):
            k = 5
            ref = T.GaussianBlur(k, sigma=(sigma, sigma))(img)
            got = BA.gaussian_blur(_tensor(a), BA.gaussian_kernels(torch.tensor([sigma]), k))
            assert _mad(ref, got) <= 2.0, sigma


def _view_cfg(**kw) -> ViewAugConfig:
    return ViewAugConfig(res=32, **kw)


def test_batched_equals_per_sample_loop():
    x = torch.stack([_tensor(render_sample(i, 32)["image"])[0] for i in range(16)])
    x = x.contiguous(memory_format=torch.channels_last)
    cfg = _view_cfg(jitter_p=0.7, gray_p=0.4, blur_p=0.5, solarize_p=0.5)
    p = BA.draw_view_params(cfg, 16, torch.Generator().manual_seed(3))
    assert 0 < int(p.jitter.sum()) < 16 and 0 < int(p.blur.sum()) < 16  # a mixed batch
    got = BA.apply_view(x, p, kernel_size=3)
    want = torch.cat([BA.apply_view(x[i : i + 1], p.select(i), kernel_size=3) for i in range(16)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, x, atol=1e-3)  # something happened
    # samples without any op come out unchanged; ops in the drawn order, not a fixed one
    untouched = ~(p.jitter | p.gray | p.blur | p.solarize)
    torch.testing.assert_close(got[untouched], x[untouched])
    i = int((p.jitter & ~p.gray & ~p.blur & ~p.solarize).nonzero()[0])
    y = x[i : i + 1]
    for op in p.order[i].tolist():
        y = BA._JITTER_OPS[op](y, [p.brightness, p.contrast, p.saturation, p.hue][op][i : i + 1])
    torch.testing.assert_close(got[i : i + 1], y, atol=1e-6, rtol=0)


def test_parameter_probabilities_and_ranges():
    n = 20000
    g = torch.Generator().manual_seed(0)
    views = (("student", _view_cfg(**STUDENT_VIEW)), ("teacher", _view_cfg(**TEACHER_VIEW)))
    for view, cfg in views:
        p = BA.draw_view_params(cfg, n, g)
        tol = 4 * math.sqrt(0.25 / n)  # 4 standard deviations
        for mask, prob in ((p.jitter, 0.8), (p.gray, 0.2), (p.blur, cfg.blur_p),
                           (p.solarize, cfg.solarize_p)):
            assert abs(mask.float().mean().item() - prob) < tol, view
        assert 0.6 <= p.brightness.min() and p.brightness.max() <= 1.4
        assert abs(p.brightness.mean().item() - 1.0) < 0.01
        assert 0.8 <= p.saturation.min() and p.saturation.max() <= 1.2
        assert -0.1 <= p.hue.min() and p.hue.max() <= 0.1 and p.hue.min() < -0.099
        assert 0.1 <= p.sigma.min() and p.sigma.max() <= 2.0
        # every op is first a quarter of the time; each row is a permutation
        first = torch.bincount(p.order[:, 0], minlength=4).float() / n
        assert (first - 0.25).abs().max() < 4 * math.sqrt(0.1875 / n)
        assert (p.order.sort(dim=1).values == torch.arange(4)).all()
    # independent draws for the two views of a pair
    a, b = BA.BatchTwoViewAugment(_view_cfg(), _view_cfg(), [0.5] * 3, [0.5] * 3).draw(64, g)
    assert not torch.equal(a.brightness, b.brightness)
    # MoCo v2's symmetric pipeline: saturation 0.4, blur p 0.5 on both views, no solarisation
    tf = build_augmentation(tiny_config(model={"method": "mocov2"}))
    aug = BA.BatchTwoViewAugment(tf.student_cfg, tf.teacher_cfg, [0.5] * 3, [0.5] * 3)
    for p in aug.draw(n, g):
        assert p.saturation.min() < 0.61 and p.saturation.max() > 1.39
        assert abs(p.blur.float().mean().item() - 0.5) < 0.02 and not p.solarize.any()


def test_parameters_keyed_by_seed_rank_micro():
    draw = lambda *key: BA.draw_view_params(_view_cfg(), 8, BA.batch_generator(*key)).brightness
    torch.testing.assert_close(draw(0, 0, 5), draw(0, 0, 5), rtol=0, atol=0)
    assert not torch.equal(draw(0, 0, 5), draw(0, 0, 6))
    assert not torch.equal(draw(0, 0, 5), draw(0, 1, 5))
    assert not torch.equal(draw(0, 0, 5), draw(1, 0, 5))


def test_crop_box_distribution_matches_torchvision():
    n, h, w = 4000, 90, 120
    torch.manual_seed(0)
    ours = np.array([BA.random_resized_crop_box(h, w, (0.08, 1.0), (3 / 4, 4 / 3),
                                                torch.rand(40).tolist()) for _ in range(n)])
    img = torch.empty(3, h, w)
    ref = np.array([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
                    for _ in range(n)])
    for arr in (ours, ref):
        assert (arr[:, 0] >= 0).all() and (arr[:, 0] + arr[:, 2] <= h).all()
        assert (arr[:, 1] >= 0).all() and (arr[:, 1] + arr[:, 3] <= w).all()
    area = lambda a: a[:, 2] * a[:, 3] / (h * w)
    logr = lambda a: np.log(a[:, 3] / a[:, 2])
    for f in (area, logr, lambda a: a[:, 0] / h, lambda a: a[:, 1] / w):
        se = np.sqrt(f(ours).var() / n + f(ref).var() / n)
        assert abs(f(ours).mean() - f(ref).mean()) < 4 * se
        assert abs(f(ours).std() - f(ref).std()) < 0.1 * f(ref).std()


def test_geometric_two_view_crop_resize_and_flip():
    a = render_sample(3, 64)["image"]
    box = (5, 9, 40, 30)
    out = BA.resize_crop(a, box, 48, flip=False)
    ref = np.asarray(Image.fromarray(a).resize((48, 48), Image.BICUBIC, box=(9, 5, 39, 45)))
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(float) - ref).mean() < 3.0  # OpenCV vs PIL bicubic
    np.testing.assert_array_equal(BA.resize_crop(a, box, 48, flip=True), out[:, ::-1])
    # a column-major (STL10 memory map) view gives the same result as a contiguous copy
    cm = np.ascontiguousarray(a.transpose(2, 1, 0)).transpose(2, 1, 0)
    np.testing.assert_array_equal(BA.resize_crop(cm, box, 48, flip=False), out)
    tf = BA.GeometricTwoView(32)
    torch.manual_seed(0)
    v1, v2 = tf(Image.fromarray(a))
    assert v1.shape == (32, 32, 3) and v1.dtype == torch.uint8 and not torch.equal(v1, v2)
    torch.manual_seed(0)
    w1, w2 = tf(a)  # arrays and PIL images alike
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    flips = 0
    for s in range(400):
        torch.manual_seed(s)
        u = torch.rand(82, dtype=torch.float64).tolist()
        flips += (u[40] < 0.5) + (u[81] < 0.5)
    assert abs(flips / 800 - 0.5) < 0.08


def test_resume_exact_with_device_augmentation(tmp_path, monkeypatch):
    cfg = tiny_config(train={"max_steps": 3}, data={"augment_device": "cuda"},
                      model={"arch": "resnet10t"})
    full = Trainer(cfg, tmp_path / "full", progress=False)
    assert full.feed.batch_aug is not None  # the batched pipeline, here on the CPU
    full_result = full.fit()
    t = Trainer(cfg, tmp_path / "part", progress=False)
    sigterm_during_step(t, monkeypatch, 1)  # the 2nd optimizer step is running
    part = t.fit()
    assert part["status"].startswith("interrupted") and part["step"] == 2
    rest = Trainer(cfg, tmp_path / "part", resume=True, progress=False).fit()
    got = [(r["step"], r["loss"]) for r in part["history"] + rest["history"]]
    want = [(r["step"], r["loss"]) for r in full_result["history"]]
    assert got == want
    a = safe_load(list_checkpoints(tmp_path / "full")[-1])
    b = safe_load(list_checkpoints(tmp_path / "part")[-1])
    for k in a["teacher"]:
        torch.testing.assert_close(a["teacher"][k], b["teacher"][k], rtol=0, atol=0)


def test_device_ops_per_view_are_few_and_fixed_shape():
    """Whole-batch ops with per-sample factors: no index_select/index_copy_/nonzero on the
    device, at most 54 ops per view (the per-op index plan took about 310, elementwise blend
    passes 92)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from op_count import augment_ops

    ops = augment_ops(batch=64, res=16)
    total = sum(ops.values())
    assert 40 <= total <= 54, ops
    assert not {"index_select", "index_copy_", "nonzero", "clone"} & set(ops), ops
    assert ops["baddbmm"] == 6 and ops["convolution"] == 2, ops  # every pass and op ran


def test_compiled_colour_equals_eager_without_recompiling():
    """``compile_colour()``: one graph (fullgraph) for every parameter draw and both views'
    settings, equal to the eager path, which skips the ops no sample needs."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    cfg = dict(jitter_p=0.8, gray_p=0.3, blur_p=0.5, solarize_p=0.3)
    aug = BA.BatchTwoViewAugment(_view_cfg(**cfg), _view_cfg(**{**cfg, "solarize_p": 0.0}),
                                 [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    x = torch.stack([torch.from_numpy(render_sample(i, 32)["image"]) for i in range(12)])
    x = x.permute(0, 3, 1, 2)  # uint8, channels_last as the trainer hands it over
    g = torch.Generator().manual_seed(5)
    draws = [aug.draw(12, g)[0], aug.draw(12, g)[1]]  # the second without solarisation
    cl = torch.channels_last
    eager = [aug.augment(x, p, cl) for p in draws]
    plan = BA.plan_view(draws[1], aug.kernel_size)
    assert not plan.solarize and plan.blur  # the eager path skipped an op there
    # running every op is exact (identity factors), also without compiling
    every = BA.colour_view(x, plan.data, aug.hue_diff, aug.hue_lut, aug.scale, aug.shift, cl)
    assert torch.equal(every, eager[1])

    torch._dynamo.reset()
    counters.clear()
    aug.compile_colour()
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = [aug.augment(x, p, cl) for p in draws]
    assert counters["stats"]["unique_graphs"] == 1
    for e, c in zip(eager, got):
        assert c.is_contiguous(memory_format=cl) and e.is_contiguous(memory_format=cl)
        d = (c - e).abs()
        # Equal to fp32 rounding except where a rounding difference (the pixel means are
        # summed in another order) moves a value across a hue or saturation byte boundary:
        # one hue byte changes a channel by at most 6/255, the blend passes after the hue
        # scale a difference by at most 1.4 * 1.8 * 1.4, normalisation by 1/0.224.
        assert (d > 1e-5).float().mean() < 0.01, (d > 1e-5).float().mean()
        assert d.max() < 6 / 255 * 1.4 * 1.8 * 1.4 / 0.224, d.max()
    assert not torch.allclose(got[0], got[1], atol=0.1)


@pytest.mark.parametrize("compile_", [False, True])
def test_train_compile_compiles_the_device_colour_part(compile_):
    """``train.compile`` reaches the device augmentation: its colour part is compiled too."""
    from m2_pretrain.data.feed import TwoViewFeed

    cfg = tiny_config(data={"augment_device": "cuda"}, train={"compile": compile_})
    feed = TwoViewFeed(cfg, build_augmentation(cfg), torch.device("cpu"), 0, 1,
                       torch.contiguous_format)
    assert feed.augment_mode == "device"
    assert (feed.batch_aug._compiled is not None) == compile_
