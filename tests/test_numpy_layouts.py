"""Weights pickled by the running numpy, read by the restricted loaders: real numpy-2 pickles
(``numpy._core``) under numpy 2, real numpy-1 pickles (``numpy.core``) under numpy 1, the other
numpy's spelling in either, and the same attacks refused without running, spelled with the
running numpy's module paths. The suite runs under both (docs/install.md, "Tested
combinations")."""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import m2_detectron2  # noqa: F401  (stand-in first)
from detectron2.checkpoint import DetectionCheckpointer

from m2_detectron2.convert import convert_file
from m2_detectron2.safe_load import UnsafePickleError, load_pickle_file, restricted_pickle_loading
from m2_pretrain.checkpoint import (CheckpointError, capture_rng_state, restore_rng_state,
                                    safe_load)

NUMPY2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"
# where this numpy pickles arrays from, and the other numpy's spelling
CORE, OTHER = ("numpy._core", "numpy.core") if NUMPY2 else ("numpy.core", "numpy._core")


def _weights() -> dict:
    rng = np.random.default_rng(0)
    return {
        "model": {
            "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            "conv.half": rng.standard_normal(5).astype(np.float16),
            "fc.fortran": np.asfortranarray(rng.standard_normal((3, 2))),
            "mask": np.array([True, False, True]),
            "steps": np.arange(3, dtype=np.int64),
            "scale": np.float32(2.5),  # numpy scalars: multiarray.scalar
            "count": np.int64(7),
        },
        "__author__": "model zoo", "matching_heuristics": True,
    }


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert type(got[k]) is type(v) and got[k].dtype == v.dtype, k
        assert np.array_equal(got[k], v), k


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_weights_pickled_by_this_numpy_load(protocol):
    w = _weights()
    data = pickle.dumps(w, protocol=protocol)  # what Detectron2 users write with plain pickle
    assert f"{CORE}.multiarray".encode() in data and f"{OTHER}.".encode() not in data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 2 warns when numpy.core is touched
        got = load_pickle_file(io.BytesIO(data), "zoo.pkl")
    _assert_same(got["model"], w["model"])
    assert got["__author__"] == "model zoo" and got["matching_heuristics"] is True


def test_the_other_numpys_spelling_loads():
    """Protocol-2 pickles name the module in text: swapping ``numpy._core`` and ``numpy.core``
    gives byte for byte what the other numpy writes for the same arrays."""
    w = _weights()
    data = pickle.dumps(w, protocol=2)
    other = data.replace(f"{CORE}.multiarray".encode(), f"{OTHER}.multiarray".encode())
    assert other != data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = load_pickle_file(io.BytesIO(other), "other.pkl")
    _assert_same(got["model"], w["model"])


def test_detectron2_checkpointer_reads_real_pickles(tmp_path):
    model = torch.nn.Linear(3, 2)
    w = {"weight": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.ones(2, np.float32)}
    path = tmp_path / "w.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": w, "__author__": "zoo"}, f)
    assert f"{CORE}.multiarray".encode() in path.read_bytes()
    with restricted_pickle_loading():
        DetectionCheckpointer(model).load(str(path))
    torch.testing.assert_close(model.weight.detach(), torch.from_numpy(w["weight"]))
    torch.testing.assert_close(model.bias.detach(), torch.from_numpy(w["bias"]))


def test_converted_file_loads_with_a_plain_unpickler(tmp_path):
    import timm

    src = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), src)
    out = tmp_path / "r18.pkl"
    convert_file(src, out)
    data = out.read_bytes()
    assert b"numpy._core" not in data and b"numpy.core" not in data
    plain = pickle.loads(data)["model"]  # Detectron2's own loader in this environment
    restricted = load_pickle_file(io.BytesIO(data))["model"]
    assert plain.keys() == restricted.keys() and len(plain) == 100  # ResNet-18 without fc
    for k, v in plain.items():
        assert v.dtype == restricted[k].dtype and np.array_equal(v, restricted[k]), k


class _Reduce:
    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _attacks(marker: Path) -> list[tuple[str, bytes]]:
    """``(expected refusal, pickle)``: pickles that run code or read files under a plain
    unpickler."""
    touch = f"open({str(marker)!r}, 'w').close()"
    runstring = __import__("numpy.testing._private.utils", fromlist=["runstring"]).runstring
    return [
        ("refusing to unpickle posix.system", pickle.dumps(
            {"model": {"w": _Reduce(os.system, f"touch {marker}")}})),
        # numpy's own exec gadget
        ("refusing to unpickle numpy.testing._private.utils.runstring", pickle.dumps(
            {"model": {"w": _Reduce(runstring, touch, {})}})),
        # an object array whose element runs code
        ("refusing to unpickle posix.system", pickle.dumps(
            {"model": {"w": np.array([_Reduce(os.system, f"touch {marker}"), 1], dtype=object)}})),
        # an object array of plain objects: each global allowed, the array refused after loading
        ("holds an object array", pickle.dumps({"model": {"w": np.array([{}, 1], dtype=object)}})),
        # a numpy-private function other than the array rebuilders, in this numpy's path
        (f"refusing to unpickle {CORE}.multiarray.fromfile",
         f"\x80\x02c{CORE}.multiarray\nfromfile\nX\x0b\x00\x00\x00/etc/passwd\x85R.".encode("latin1")),
    ]


def test_attacks_in_this_numpys_layout_are_refused(tmp_path):
    marker = tmp_path / "PWNED"
    attacks = _attacks(marker)
    if NUMPY2:  # the object arrays reference the numpy-2 paths: nothing was simulated
        assert f"{CORE}.multiarray\n_reconstruct".encode() in pickle.dumps(
            np.array([{}], dtype=object), protocol=2)
    for expected, data in attacks:
        with pytest.raises(UnsafePickleError) as e:
            load_pickle_file(io.BytesIO(data), "evil.pkl")
        assert str(e.value).startswith("evil.pkl: ") and expected in str(e.value)
        assert "\n" not in str(e.value)
    assert not marker.exists()
    pickle.loads(attacks[1][1])
    assert marker.exists()  # the same bytes under a plain unpickler run numpy's gadget


def test_pretraining_checkpoints_under_this_numpy(tmp_path):
    """The trainer keeps numpy's RNG state as tensors: a checkpoint round-trips through the
    restricted ``safe_load``; a file holding numpy arrays or code is refused in one line."""
    np.random.seed(3)
    state = capture_rng_state()
    want = np.random.random(4)
    path = tmp_path / "ckpt.pth"
    torch.save({"rng": state, "w": torch.ones(2)}, path)
    restore_rng_state(safe_load(path)["rng"])
    assert np.array_equal(np.random.random(4), want)
    arrays = tmp_path / "arrays.pth"
    torch.save({"w": np.ones(2, np.float32)}, arrays)
    marker = tmp_path / "PWNED_PTH"
    evil = tmp_path / "evil.pth"
    torch.save({"w": _Reduce(os.system, f"touch {marker}")}, evil)
    for path, named in ((arrays, f"{CORE}.multiarray._reconstruct"), (evil, "system")):
        with pytest.raises(CheckpointError) as e:
            safe_load(path)
        msg = str(e.value)
        assert "not a loadable PyTorch checkpoint" in msg and named in msg, msg
        assert "\n" not in msg and "weights_only=False" not in msg
    assert not marker.exists()
