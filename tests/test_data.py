"""Datasets on generated stand-ins of the real formats, and augmentation probabilities."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from m2_pretrain.config import load_config
from m2_pretrain.data.augment import TwoViewTransform, build_view_transform, ViewAugConfig
from m2_pretrain.data.datasets import (
    DatasetError,
    FashionMNIST,
    ImageFolderDataset,
    STL10Binary,
    build_dataset,
)
from m2_pretrain.data.embedded import EmbeddedShapes, render_sample


def test_embedded_is_deterministic_and_labelled():
    a, b = render_sample(7, 48), render_sample(7, 48)
    assert np.array_equal(a["image"], b["image"]) and a["label"] == 7
    assert not np.array_equal(render_sample(8, 48)["image"], a["image"])
    assert a["mask"].sum() > 50
    x0, y0, w, h = a["bbox"]
    assert a["mask"][int(y0):int(y0 + h), int(x0):int(x0 + w)].sum() == a["mask"].sum()
    ds = EmbeddedShapes(30, res=40, num_classes=5)
    img, y = ds[13]
    assert img.size == (40, 40) and y == 3 and ds.targets[13] == 3


def test_embedded_two_tone_palette_paints_dark_or_light_shapes():
    from m2_pretrain.data.embedded import PALETTES

    tones = PALETTES["two_tone"]
    for i in range(6):
        s = render_sample(i, 48, palette="two_tone")
        shape = s["image"][s["mask"]].astype(float).mean(0)
        ground = s["image"][~s["mask"]].astype(float).mean(0)
        # the shape is one tone, the ground (a gradient around it) the other
        near = [np.abs(tones - c).max(1).argmin() for c in (shape, ground)]
        assert sorted(near) == [0, 1] and np.abs(tones[near[0]] - shape).max() < 25, (i, shape)
    assert not np.array_equal(render_sample(3, 48)["image"],
                              render_sample(3, 48, palette="two_tone")["image"])
    with pytest.raises(ValueError, match="palette"):
        render_sample(0, 32, palette="pastel")


def _write_stl10(root, n_train=4, n_unl=3):
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = {}
    for split, n in (("train", n_train), ("unlabeled", n_unl), ("test", 2)):
        hwc = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        imgs[split] = hwc
        hwc.transpose(0, 3, 2, 1).tofile(d / f"{split}_X.bin")  # STL10 stores column-major
        if split != "unlabeled":
            np.arange(1, n + 1, dtype=np.uint8).tofile(d / f"{split}_y.bin")
    return imgs


def test_stl10_binary(tmp_path):
    imgs = _write_stl10(tmp_path)
    ds = STL10Binary(tmp_path, "train+unlabeled")
    assert len(ds) == 7
    img, y = ds[1]
    assert np.array_equal(np.asarray(img), imgs["train"][1]) and y == 1
    img, y = ds[5]
    assert np.array_equal(np.asarray(img), imgs["unlabeled"][1]) and y == -1
    with pytest.raises(DatasetError, match="test_X.bin|STL10 file not found"):
        STL10Binary(tmp_path / "nowhere", "test")


def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(str(path) + ".gz", "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 256, (5, 28, 28))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 1, 4, 1, 5]))
    ds = FashionMNIST(tmp_path, "test")
    img, y = ds[2]
    assert img.mode == "RGB" and y == 4
    assert np.array_equal(np.asarray(img)[..., 0], imgs[2])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*apt-get install"):
        FashionMNIST(tmp_path, "train")


def test_imagefolder_missing_and_corrupt(tmp_path):
    with pytest.raises(DatasetError, match="image folder not found: .*nope"):
        ImageFolderDataset(tmp_path / "nope")
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / c / "ok.png")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["a", "b"] and len(ds) == 3
    broken = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.jpg")][0]
    with pytest.raises(DatasetError, match="cannot read image .*broken.jpg"):
        ds[broken]
    skipping = ImageFolderDataset(tmp_path, skip_corrupt=True)
    img, _ = skipping[broken]
    assert img.size == (8, 8) and skipping.num_skipped == 1


def test_build_dataset_dispatch(tmp_path):
    cfg = load_config(None, ["data.dataset=stl10", f"data.root={tmp_path}"])
    _write_stl10(tmp_path)
    assert len(build_dataset(cfg.data, "train")) == 4


def _freq(transform, img, test, n=400):
    torch.manual_seed(0)
    return sum(bool(test(transform(img))) for _ in range(n)) / n


def test_view_pipelines_have_configured_probabilities():
    tv = TwoViewTransform(32)
    assert tv.student_cfg.blur_p == 1.0 and tv.teacher_cfg.blur_p == 0.1
    assert tv.student_cfg.solarize_p == 0.0 and tv.teacher_cfg.solarize_p == 0.2
    colour = Image.fromarray(np.tile(np.array([200, 40, 90], np.uint8), (40, 40, 1)))
    is_gray = lambda x: bool((x[0] == x[1]).all() and (x[1] == x[2]).all())  # noqa: E731
    for pipe in (tv.student, tv.teacher):
        assert abs(_freq(pipe, colour, is_gray) - 0.2) < 0.06
    # jitter p=0.8 changes the colour of a flat image
    changed = lambda x: bool((x[:, 0, 0] != torch.tensor([200, 40, 90], dtype=torch.uint8)).any())  # noqa: E731
    assert abs(_freq(tv.student, colour, changed) - 0.8) < 0.06
    # solarisation, isolated (jitter and grayscale off): a flat 200 image becomes 55
    flat = Image.fromarray(np.full((40, 40, 3), 200, np.uint8))
    solarized = lambda x: bool((x == 55).all())  # noqa: E731
    for p in (0.0, 0.2):
        pipe = build_view_transform(ViewAugConfig(res=32, jitter_p=0.0, gray_p=0.0, solarize_p=p))
        assert abs(_freq(pipe, flat, solarized) - p) < 0.06
    # teacher defaults: solarize 0.2 when nothing else touches the flat image
    teacher_only_sol = TwoViewTransform(32, jitter_p=0.0, gray_p=0.0).teacher
    assert abs(_freq(teacher_only_sol, flat, solarized) - 0.2) < 0.06
    out = tv.student(colour)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)


def test_separable_blur_equals_torchvision_gaussian_blur():
    """The pipeline's separable blur against torchvision's GaussianBlur (full 2-D kernel) with
    the same kernel size and sigma, on the same PIL image: equal up to uint8 rounding."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    from m2_pretrain.data.augment import RandomGaussianBlur, _blur_kernel

    for res in (32, 96, 224):
        img = Image.fromarray(render_sample(3, res)["image"])
        k = _blur_kernel(res)
        for sigma in (0.3, 1.0, 2.0):
            ours = TF.pil_to_tensor(RandomGaussianBlur(k, (sigma, sigma))(img)).int()
            ref = TF.pil_to_tensor(T.GaussianBlur(k, sigma=(sigma, sigma))(img)).int()
            diff = (ours - ref).abs()
            assert diff.max() <= 1 and diff.float().mean() < 0.01, (res, sigma, int(diff.max()))
            if sigma >= 1.0:  # it blurs
                assert (ours - TF.pil_to_tensor(img).int()).abs().float().mean() > 0.1
    gray = Image.fromarray(render_sample(1, 32)["image"]).convert("L")
    assert RandomGaussianBlur(3, (1.0, 1.0))(gray).mode == "L"
    torch.manual_seed(0)
    a = TF.pil_to_tensor(RandomGaussianBlur(9, (0.1, 2.0))(img))
    torch.manual_seed(0)
    assert torch.equal(a, TF.pil_to_tensor(RandomGaussianBlur(9, (0.1, 2.0))(img)))
    with pytest.raises(ValueError, match="odd"):
        RandomGaussianBlur(4)
