"""Detectron2 side of the safety checks: weights files never run code (``.pkl`` and PyTorch
files alike, whatever the environment says), a hostile pickle cannot hang or exhaust the
loader, converted files cross numpy 1/2, clear converter messages, and setup errors validated
once before ``launch``."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import m2_detectron2  # noqa: F401  (stand-in first)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg

from d2_data import write_detection_set
from m2_detectron2.convert import ConversionError, convert_file
from m2_detectron2.data import DatasetSpecError, register_coco_spec
from m2_detectron2.safe_load import (
    UnsafePickleError, dumps_pickle, load_pickle, load_pickle_file, restricted_pickle_loading)
from m2_detectron2.train import SetupError, Trainer, validate_setup
from m2_pretrain.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "detectron2"
DEMO_CONFIG = str(CONFIGS / "demo_shapes_mask_rcnn_R18.yaml")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_pkl(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": _Evil(marker)}, "__author__": "x",
                     "matching_heuristics": True}, f)
    return path, marker


def _evil_pth(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED_PTH"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": _Evil(marker)}}, path)
    return path, marker


def _args(*opts, config=DEMO_CONFIG, register=(), eval_only=False):
    sys.path.insert(0, str(REPO / "tools"))
    import train_net

    argv = ["--config-file", config] + (["--eval-only"] if eval_only else [])
    for spec in register:
        argv += ["--register-coco", spec]
    return train_net.parse_args(argv + list(opts))



def _bare_trainer(model, weights):
    """A training ``Trainer`` with only what ``resume_or_load`` reads: Detectron2's own
    checkpointer on ``model`` and ``MODEL.WEIGHTS = weights``."""
    trainer = object.__new__(Trainer)
    trainer.checkpointer = DetectionCheckpointer(model)
    trainer.cfg = get_cfg()
    trainer.cfg.MODEL.WEIGHTS = str(weights)
    return trainer

def test_evil_pickle_is_refused_by_every_loader(tmp_path):
    evil, marker = _evil_pkl(tmp_path)
    with pytest.raises(UnsafePickleError, match="evil.pkl: refusing to unpickle posix.system"):
        load_pickle(evil)
    # Detectron2's checkpointer, as used by --eval-only
    model = torch.nn.Linear(2, 2)
    with restricted_pickle_loading(), pytest.raises(UnsafePickleError, match="evil.pkl"):
        DetectionCheckpointer(model).load(str(evil))
    # the training Trainer (and the demo, which uses it): resume_or_load
    trainer = _bare_trainer(model, evil)
    with pytest.raises(UnsafePickleError, match="evil.pkl"):
        trainer.resume_or_load(resume=False)
    # the parent-side check before launch
    with pytest.raises(SetupError, match="MODEL.WEIGHTS=.*evil.pkl: refusing"):
        validate_setup(_args("MODEL.WEIGHTS", str(evil)))
    assert not marker.exists()
    # the checkpointer is plain again outside the block, and good weights load inside it
    good = tmp_path / "good.pkl"
    w = {"weight": np.arange(4, dtype=np.float32).reshape(2, 2), "bias": np.ones(2, np.float32)}
    good.write_bytes(dumps_pickle({"model": w, "__author__": "test"}))
    with restricted_pickle_loading():
        DetectionCheckpointer(model).load(str(good))
    torch.testing.assert_close(model.weight.detach(), torch.from_numpy(w["weight"]))
    from detectron2.checkpoint import detection_checkpoint as dc

    assert dc.pickle is pickle


@pytest.mark.slow
def test_train_net_reports_errors_in_one_line_before_launch(tmp_path):
    """With --num-gpus 2 a setup error raised inside launched workers would be a traceback per
    worker: the parent validates first (the evil .pkl is never unpickled by a plain pickle)."""
    evil, marker = _evil_pkl(tmp_path)
    evil_pth, marker_pth = _evil_pth(tmp_path)
    runs = {"refusing to unpickle posix.system": ["--num-gpus", "2", "MODEL.WEIGHTS", str(evil)],
            "must look like name=path": ["--eval-only", "--register-coco", "badspec"],
            # torch.load's default restriction is lifted by the variable, not an explicit one
            "refused by the restricted loader": ["MODEL.WEIGHTS", str(evil_pth)]}
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    for expected, extra in runs.items():
        r = subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file",
                            DEMO_CONFIG, *extra, "OUTPUT_DIR", str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=300, env=env)
        last = r.stderr.strip().splitlines()[-1]  # import-time warnings of torch may precede it
        assert r.returncode != 0 and last.startswith("error: ") and expected in last
        assert "Traceback" not in r.stderr and "weights_only" not in last, r.stderr[-2000:]
    assert not marker.exists() and not marker_pth.exists()


def _globals_of(data: bytes) -> set[tuple[str, str]]:
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(data)).load()
    return seen


# The two tests below build numpy 2's layout out of numpy 1's modules; under real numpy 2,
# tests/test_numpy_layouts.py covers the same with real numpy-2 pickles.
numpy1_layout = pytest.mark.skipif(
    np.lib.NumpyVersion(np.__version__) >= "2.0.0",
    reason="simulates numpy 2 from numpy 1's modules (numpy.core); under numpy 2, "
    "test_numpy_layouts.py reads real numpy-2 pickles")


def _hide(monkeypatch, prefix: str) -> None:
    """Make ``prefix`` and its submodules unimportable (as numpy 2 lacks ``numpy.core``'s real
    modules and numpy 1 lacks ``numpy._core``)."""
    for name in [m for m in list(sys.modules) if m == prefix or m.startswith(prefix + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    for sub in ("", ".multiarray", ".numeric", "._multiarray_umath"):
        monkeypatch.setitem(sys.modules, prefix + sub, None)


def _simulate_numpy2(monkeypatch) -> None:
    """numpy 2's layout: the private modules live at numpy._core, numpy.core is gone."""
    core = sys.modules["numpy.core"]
    mods = {"": core, ".multiarray": sys.modules["numpy.core.multiarray"],
            ".numeric": sys.modules["numpy.core.numeric"]}
    _hide(monkeypatch, "numpy.core")
    for sub, mod in mods.items():
        monkeypatch.setitem(sys.modules, "numpy._core" + sub, mod)


@numpy1_layout
def test_converted_pickle_loads_under_both_numpy_layouts(tmp_path, monkeypatch):
    import timm

    src = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), src)
    out = tmp_path / "r18.pkl"
    convert_file(src, out)
    data = out.read_bytes()
    # only module paths that numpy 1 and numpy 2 both have
    assert _globals_of(data) <= {("numpy", "ndarray"), ("builtins", "bytearray")}
    want = pickle.loads(data)["model"]
    stem = want["stem.conv1.weight"]
    assert stem.shape == (64, 3, 7, 7) and stem.flags.writeable
    with monkeypatch.context() as m:  # numpy 1 (no numpy._core): Detectron2's plain unpickler
        _hide(m, "numpy._core")
        got = pickle.load(io.BytesIO(data), encoding="latin1")["model"]
    with monkeypatch.context() as m:  # numpy 2 layout: plain and restricted unpicklers
        _simulate_numpy2(m)
        got2 = pickle.load(io.BytesIO(data), encoding="latin1")["model"]
        got3 = load_pickle_file(io.BytesIO(data))["model"]
    for k, v in want.items():
        for g in (got, got2, got3):
            assert g[k].dtype == v.dtype and np.array_equal(g[k], v), k


@numpy1_layout
def test_restricted_loader_reads_the_other_numpys_pickles(tmp_path, monkeypatch):
    w = {"model": {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float32(2.5)},
         "__author__": "x"}
    numpy1 = pickle.dumps(w, protocol=2)  # numpy.core.multiarray._reconstruct / scalar
    assert b"numpy.core.multiarray" in numpy1
    numpy2 = numpy1.replace(b"numpy.core.multiarray", b"numpy._core.multiarray")
    with monkeypatch.context() as m:  # a numpy-2 file read under numpy 1
        _hide(m, "numpy._core")
        with pytest.raises(ModuleNotFoundError, match="numpy._core"):
            pickle.loads(numpy2)  # the failure of the issue
        got = load_pickle_file(io.BytesIO(numpy2))["model"]
    assert np.array_equal(got["a"], w["model"]["a"]) and got["s"] == np.float32(2.5)
    with monkeypatch.context() as m:  # a numpy-1 file read under numpy 2's layout
        _simulate_numpy2(m)
        got = load_pickle_file(io.BytesIO(numpy1))["model"]
    assert np.array_equal(got["a"], w["model"]["a"]) and got["s"].dtype == np.float32


def test_converter_names_its_input(tmp_path, monkeypatch, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError) as e:
        convert_file(junk, tmp_path / "o.pkl")
    assert "not a loadable PyTorch checkpoint" in str(e.value)
    assert "weights_only` set to `False`" not in str(e.value)
    pkl = tmp_path / "already.pkl"
    weights = {"stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}
    pkl.write_bytes(dumps_pickle({"model": weights, "__author__": "m2",
                                  "matching_heuristics": True}))
    with pytest.raises(CheckpointError, match="already a Detectron2 weights file"):
        convert_file(pkl, tmp_path / "o.pkl")
    sys.path.insert(0, str(REPO / "tools"))
    import convert_to_d2

    monkeypatch.setattr(sys, "argv", ["convert_to_d2.py", str(pkl), str(tmp_path / "o.pkl")])
    assert convert_to_d2.main() == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "already a Detectron2" in err and err.count("\n") == 1
    with pytest.raises(ConversionError, match="is the input file itself"):
        convert_file(pkl, pkl)


def test_setup_is_validated_once_before_launch(tmp_path):
    with pytest.raises(SetupError, match="must look like name=path"):
        validate_setup(_args(register=["badspec"]))
    with pytest.raises(SetupError, match="annotation file .*missing.json does not exist"):
        validate_setup(_args(register=[f"x={tmp_path / 'missing.json'}:{tmp_path}"]))
    with pytest.raises(SetupError, match="Non-existent .*MODEL.NOPE"):
        validate_setup(_args("MODEL.NOPE", "1"))
    timm_cfg = str(CONFIGS / "mask_rcnn_timm_FPN_1x.yaml")
    data = ["DATASETS.TRAIN", "('shapes_coco_train',)", "DATASETS.TEST", "('shapes_coco_val',)",
            "MODEL.ROI_HEADS.NUM_CLASSES", "10", "M2.RANDOM_INIT", "True"]
    with pytest.raises(SetupError, match="MODEL.TIMM.NORM must be one of"):
        validate_setup(_args("MODEL.TIMM.NORM", "GroupNorm", *data, config=timm_cfg))
    with pytest.raises(SetupError, match="MODEL.TIMM.ARCH names no timm model"):
        validate_setup(_args("MODEL.TIMM.ARCH", "not_a_model", *data, config=timm_cfg))
    validate_setup(_args(*data, config=timm_cfg))  # a good setup passes
    # the transfer checks (m2_detectron2.checks) run in the parent too
    with pytest.raises(SetupError, match="MODEL.ROI_HEADS.NUM_CLASSES is 80"):
        validate_setup(_args(*data[:4], "M2.RANDOM_INIT", "True", config=timm_cfg))
    with pytest.raises(SetupError, match="M2.RANDOM_INIT"):
        validate_setup(_args(*data[:6], config=timm_cfg))
    # a dataset registered by the parent's check can be set up again by main() in-process
    ann, images = write_detection_set(tmp_path, "a", 1, [1])
    spec = f"mine_{os.getpid()}={ann}:{images}"
    assert register_coco_spec(spec) == register_coco_spec(spec)
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetSpecError, match="already registered"):
        register_coco_spec(f"mine_{os.getpid()}={ann}:{tmp_path / 'other'}")


# ---------------------------------------------------------------------------------------------
# PyTorch files through the restricted loader; a hostile pickle cannot hang it

def test_pth_weights_are_restricted_even_when_torch_is_told_otherwise(tmp_path, monkeypatch):
    from m2_detectron2.checkpoint import RestrictedCheckpointer
    from m2_detectron2.safe_load import load_torch_file

    evil, marker = _evil_pth(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UnsafePickleError) as e:
        RestrictedCheckpointer(model).load(str(evil))
    msg = str(e.value)
    assert msg.startswith(f"{evil}: refused by the restricted loader") and "posix.system" in msg
    assert "\n" not in msg and "weights_only" not in msg and "False" not in msg
    pyth = tmp_path / "evil.pyth"  # Detectron2's pycls branch: torch.load too
    pyth.write_bytes(evil.read_bytes())
    with pytest.raises(UnsafePickleError, match="evil.pyth: refused"):
        RestrictedCheckpointer(model).load(str(pyth))
    # the training Trainer switches Detectron2's own checkpointer to the restricted one
    trainer = _bare_trainer(model, evil)
    with pytest.raises(UnsafePickleError, match="evil.pth: refused"):
        trainer.resume_or_load(resume=False)
    with pytest.raises(SetupError) as e:  # the parent-side check before launch
        validate_setup(_args("MODEL.WEIGHTS", str(evil)))
    assert str(e.value).startswith(f"MODEL.WEIGHTS={evil}: refused") and "\n" not in str(e.value)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="plain.pth: refused .*Unsupported operand"):
        (tmp_path / "plain.pth").write_bytes(pickle.dumps({"a": 1}, protocol=4))
        load_torch_file(tmp_path / "plain.pth")
    # good weights still load, as Detectron2 would
    good = tmp_path / "good.pth"
    torch.save({"model": {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}}, good)
    RestrictedCheckpointer(model).load(str(good))
    assert torch.equal(model.weight.detach(), torch.ones(2, 2))


def test_detectron2s_own_pth_loader_runs_code_under_the_variable(tmp_path, monkeypatch):
    """Why the checkpointer is replaced: Detectron2 calls ``torch.load`` without
    ``weights_only``, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns off."""
    evil, marker = _evil_pth(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(Exception):  # noqa: B017 - the object is not a tensor: loading fails after
        DetectionCheckpointer(torch.nn.Linear(2, 2)).load(str(evil))
    assert marker.exists()


def _shared_reference_pickle(levels: int) -> bytes:
    """``levels`` nested lists, each holding the next one twice: a few bytes per level, and
    2**levels paths from the top to the innermost list."""
    inner: list = [np.zeros(1, np.float32)]
    for _ in range(levels):
        inner = [inner, inner]
    return dumps_pickle({"model": inner})


def test_object_array_check_visits_each_object_once(monkeypatch):
    from m2_detectron2 import safe_load

    data = _shared_reference_pickle(50)
    assert len(data) < 400  # 2**50 paths
    calls = {"n": 0}

    def counting_isinstance(obj, kind):
        calls["n"] += 1
        if calls["n"] > 100_000:  # a walk over paths: stop long before it would end
            raise RuntimeError("the object-array check walks paths, not objects")
        return isinstance(obj, kind)

    monkeypatch.setattr(safe_load, "isinstance", counting_isinstance, raising=False)
    got = load_pickle_file(io.BytesIO(data))
    assert calls["n"] < 10 * 53  # each of the 52 containers and the array looked at once
    assert got["model"][0] is got["model"][1]
    monkeypatch.undo()
    # an object array hidden behind the shared references is still found
    inner: list = [np.array([None], dtype=object)]
    for _ in range(50):
        inner = [inner, inner]
    with pytest.raises(UnsafePickleError, match="object array"):
        load_pickle_file(io.BytesIO(pickle.dumps({"model": inner})))


class _Huge:
    def __init__(self, kind):
        self.kind = kind

    def __reduce__(self):
        return self.kind, ((range(10**12),) if self.kind is not bytearray else (10**12,))


@pytest.mark.parametrize("kind", [frozenset, set, bytearray])
def test_pickles_that_expand_into_gigabytes_are_refused(kind):
    data = pickle.dumps({"model": _Huge(kind)}, protocol=4)
    assert len(data) < 100
    with pytest.raises(UnsafePickleError, match=f"refusing {kind.__name__}\\(\\) of a "):
        load_pickle_file(io.BytesIO(data), "huge.pkl")


# ---------------------------------------------------------------------------------------------
# Config files run no code; a finished run is never replaced; launch problems before any write

def test_python_tag_in_a_config_file_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"_BASE_: {DEMO_CONFIG}\nSEED: !!python/object/apply:os.system "
                   f"['touch {marker}']\n")
    with pytest.raises(SetupError) as e:
        validate_setup(_args("M2.RANDOM_INIT", "True", config=str(cfg)))
    msg = str(e.value)
    assert "\n" not in msg and not marker.exists()
    assert msg.startswith(f"{cfg}, line 2: invalid YAML: could not determine a constructor")
    assert "a config may hold only plain YAML values" in msg
    # the same through a _BASE_ file, and a key written twice
    base = tmp_path / "base.yaml"
    base.write_text(f"_BASE_: {DEMO_CONFIG}\nSOLVER:\n  MAX_ITER: 5\nSOLVER:\n  BASE_LR: 1.0\n")
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: base.yaml\n")
    with pytest.raises(SetupError, match=r"base.yaml, line 4: invalid YAML: key 'SOLVER' is "
                                         r"written twice"):
        validate_setup(_args("M2.RANDOM_INIT", "True", config=str(child)))


def test_finished_output_dir_is_refused_without_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"finished model")
    (out / "last_checkpoint").write_text("model_final.pth")
    opts = ["M2.RANDOM_INIT", "True", "OUTPUT_DIR", str(out)]
    with pytest.raises(SetupError, match=rf"OUTPUT_DIR {out} holds another run \(model_final.pth, "
                                         r"last_checkpoint\): pass --resume to continue it, or "
                                         r"set OUTPUT_DIR to a new directory"):
        validate_setup(_args(*opts))
    assert (out / "model_final.pth").read_bytes() == b"finished model"
    # an evaluation only writes its own results there
    from m2_detectron2.checks import check_output_dir

    check_output_dir(build_config_for(opts), eval_only=True)
    check_output_dir(build_config_for(opts), resume=True)


def build_config_for(opts):
    from m2_detectron2.train import build_config

    return build_config(DEMO_CONFIG, opts)


def test_launch_problems_are_found_before_the_output_dir_is_written(tmp_path, monkeypatch):
    out = tmp_path / "out"
    url = "http://127.0.0.1:9/weights.pkl"  # nothing listens on the discard port
    with pytest.raises(SetupError, match=rf"MODEL.WEIGHTS={url} cannot be downloaded \(.*\): "
                                         r"download it where the network is reachable"):
        validate_setup(_args("MODEL.WEIGHTS", url, "OUTPUT_DIR", str(out)))
    assert not out.exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SetupError, match=r"--num-gpus 2 but this machine has 0 CUDA device\(s\): "
                                         r"pass --num-gpus 1"):
        validate_setup(_args("--num-gpus", "2", "M2.RANDOM_INIT", "True", "OUTPUT_DIR", str(out)))
    assert not out.exists()
    # file:// weights are read as the local path
    from m2_detectron2.train import build_config

    (tmp_path / "w.pkl").write_bytes(b"")
    cfg = build_config(DEMO_CONFIG, ["MODEL.WEIGHTS", f"file://{tmp_path}/w.pkl"])
    assert cfg.MODEL.WEIGHTS == f"{tmp_path}/w.pkl"


def test_16_bit_images_are_scaled_and_fifos_refused_by_the_mapper(tmp_path):
    import threading

    from PIL import Image

    from m2_detectron2.data import build_mapper, read_image

    ramp = np.linspace(0, 65535, 64 * 48).round().astype(np.uint16).reshape(48, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TEST = 0  # no resize: compare pixels
    item = build_mapper(cfg, False)({"file_name": str(tmp_path / "ramp.png"), "height": 48,
                                     "width": 64, "image_id": 1})
    image = item["image"].numpy()  # (3, H, W), BGR
    want = np.round(ramp * 255.0 / 65535.0)
    assert np.abs(image[0].astype(float) - want).max() == 0
    assert (image == 255).mean() < 0.01  # Detectron2's own reader made 99.6 % of it white
    os.mkfifo(tmp_path / "fifo.png")
    box = {}
    t = threading.Thread(target=lambda: box.update(
        e=pytest.raises(Exception, read_image, str(tmp_path / "fifo.png"))), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and "is a FIFO, not an image file" in str(box["e"].value)
