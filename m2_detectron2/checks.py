"""Setup-time checks of a built transfer config: mistakes that would otherwise cost a whole
training run are one-line ``SetupError``s naming the key to set.

- Empty ``MODEL.WEIGHTS`` (``MODEL.TIMM.WEIGHTS`` for the timm-backbone configs) would train
  from random initialisation, and Detectron2 only logs "No checkpoint found" (about 31 AP
  instead of 39.7 for Mask R-CNN 1x, Table 9a): it needs ``M2.RANDOM_INIT True``.
- The model's class count must equal the number of categories of every dataset the run uses
  (training: ``DATASETS.TRAIN`` and ``DATASETS.TEST``, which the final evaluation reads;
  ``--eval-only``: ``DATASETS.TEST``), read from the key the meta-architecture really uses
  (``M2FCOS`` reads only ``MODEL.FCOS.*``).
- Weights must fit the model they load into (:func:`check_weights_fit`, run once in the
  launching process): every backbone tensor for training, every model tensor for
  ``--eval-only`` and for a resumed run. Detectron2 itself only logs the keys it skips, and
  the detector then trains from random initialisation.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from m2_pretrain.checkpoint import CheckpointError
from m2_pretrain.export import meta_path

logger = logging.getLogger("m2_detectron2")

TIMM_BACKBONES = ("build_timm_fpn_backbone", "build_timm_retinanet_fpn_backbone")

# meta-architecture -> the config key holding its number of classes (None: class-agnostic)
NUM_CLASSES_KEYS = {
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "PanopticFPN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "M2FCOS": "MODEL.FCOS.NUM_CLASSES",
    "ProposalNetwork": None,
}


class SetupError(ValueError):
    """A configuration that cannot run; the message says what to change."""


def check_config_file(path: str | Path, _seen: tuple = ()) -> None:
    """Read a yacs ``--config-file`` and every local ``_BASE_`` file it names with the safe
    loader of :func:`m2_pretrain.config.load_yaml_file`: a Python tag (which Detectron2's own
    loader would run after a warning) or a key written twice is a one-line ``SetupError``.
    Nothing in the file is executed."""
    from m2_pretrain.config import ConfigError, load_yaml_file

    path = Path(path)
    if not path.is_file():
        raise SetupError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise SetupError(f"config file {path} includes itself through _BASE_")
    try:
        data = load_yaml_file(path)
    except ConfigError as e:
        raise SetupError(str(e)) from None
    bases = data.get("_BASE_", []) if isinstance(data, dict) else []
    for base in [bases] if isinstance(bases, str) else bases:
        base = str(base)
        if "://" in base:
            raise SetupError(f"{path}: _BASE_ {base} is a URL; download it and name the file")
        base = os.path.expanduser(base)
        check_config_file(base if os.path.isabs(base) else path.parent / base,
                          _seen + (path.resolve(),))


# Files a Detectron2 training run writes into OUTPUT_DIR; a new run there would replace them.
_RUN_FILES = ("model_final.pth", "last_checkpoint", "metrics.json")


def check_output_dir(cfg, resume: bool = False, eval_only: bool = False) -> None:
    """Refuse to start a new training run in an ``OUTPUT_DIR`` that holds another run's
    checkpoints or metrics (they would be replaced), as ``m2-pretrain train`` refuses a run
    directory: continue it with ``--resume``, or choose a new ``OUTPUT_DIR``.
    ``--eval-only`` writes only its own results there and is not refused."""
    if resume or eval_only:
        return
    out = Path(cfg.OUTPUT_DIR)
    if out.exists() and not out.is_dir():
        raise SetupError(f"OUTPUT_DIR {out} is a file, not a directory: choose another "
                         "OUTPUT_DIR")
    if not out.is_dir():
        return
    found = [n for n in _RUN_FILES if (out / n).exists()]
    found += sorted(p.name for p in out.glob("model_*.pth") if p.name not in found)
    if found:
        raise SetupError(f"OUTPUT_DIR {out} holds another run ({', '.join(found[:3])}): pass "
                         "--resume to continue it, or set OUTPUT_DIR to a new directory")


def local_weights_path(value: str) -> str:
    """``file://`` weights as a plain path (Detectron2's file handlers would take the URL for
    a relative file name); any other value unchanged."""
    if value.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(value).path)
    return value


def fetch_remote_weights(cfg) -> str | None:
    """Download ``MODEL.WEIGHTS`` when it is a URL (``http(s)://``, ``detectron2://``) into
    Detectron2's cache, before anything is written, so that a failed download is a one-line
    ``SetupError`` instead of a traceback after setup; the workers then read the cached copy.

    Returns:
        The local file, or None when ``MODEL.WEIGHTS`` is not a URL.
    """
    w = cfg.MODEL.WEIGHTS
    if "://" not in w:
        return None
    from detectron2.utils.file_io import PathManager

    try:
        local = PathManager.get_local_path(w)
    except Exception as e:  # noqa: BLE001 - URLError, HTTPError, timeouts, unknown handlers
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SetupError(f"MODEL.WEIGHTS={w} cannot be downloaded ({first}): download it "
                         "where the network is reachable and pass the local file") from None
    if not Path(local).is_file():
        raise SetupError(f"MODEL.WEIGHTS={w} names no file Detectron2 can read: pass a local "
                         "file")
    return local


def check_num_gpus(num_gpus: int) -> None:
    """``--num-gpus`` must not exceed the CUDA devices this machine has (1 runs on the CPU)."""
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_gpus > max(have, 1):
        raise SetupError(f"--num-gpus {num_gpus} but this machine has {have} CUDA device(s): "
                         f"pass --num-gpus {max(have, 1)}" + (" (the run then uses the CPU)"
                                                               if have == 0 else ""))


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_weights(cfg, resume: bool = False) -> None:
    """Refuse empty weights unless ``M2.RANDOM_INIT`` is set; refuse missing files and
    exported encoders given as ``MODEL.WEIGHTS``.

    Args:
        cfg: a config built with :func:`m2_detectron2.config.add_m2_config`.
        resume: ``--resume``; an existing ``OUTPUT_DIR/last_checkpoint`` then replaces the
            initial weights, so empty weights are fine.
    """
    w = cfg.MODEL.WEIGHTS
    timm_backbone = cfg.MODEL.BACKBONE.NAME in TIMM_BACKBONES
    if not w:
        if timm_backbone and cfg.MODEL.TIMM.WEIGHTS:
            t = cfg.MODEL.TIMM.WEIGHTS
            if "://" not in t and Path(t).is_dir():
                raise SetupError(f"MODEL.TIMM.WEIGHTS={t} is a directory: name the exported "
                                 "encoder file in it")
            if "://" not in t and not Path(t).is_file():
                raise SetupError(f"MODEL.TIMM.WEIGHTS={t} does not exist")
            return
        if resume and (Path(cfg.OUTPUT_DIR) / "last_checkpoint").is_file():
            return
        if cfg.M2.RANDOM_INIT:
            logger.warning("training from random initialisation (M2.RANDOM_INIT True)")
            return
        if timm_backbone:
            raise SetupError("MODEL.TIMM.WEIGHTS is empty: set it to an exported encoder "
                             "(`m2-pretrain export`), or pass M2.RANDOM_INIT True to train from "
                             "random initialisation")
        raise SetupError("MODEL.WEIGHTS is empty: set it to the converted weights "
                         "(`python tools/convert_to_d2.py`), or pass M2.RANDOM_INIT True to "
                         "train from random initialisation")
    if "://" in w:
        return
    if Path(w).is_dir():
        raise SetupError(f"MODEL.WEIGHTS={w} is a directory: name the weights file in it "
                         "(a converted .pkl, or model_final.pth of a finished run)")
    if not Path(w).is_file():
        raise SetupError(f"MODEL.WEIGHTS={w} does not exist")
    if meta_path(w).is_file():
        raise SetupError(
            f"MODEL.WEIGHTS={w} looks like an exported encoder (timm names, with a .json "
            "sidecar): convert it with `python tools/convert_to_d2.py` for the ResNet configs, "
            "or pass it as MODEL.TIMM.WEIGHTS with a timm-backbone config")


def dataset_classes(name: str) -> list[str] | None:
    """The category names Detectron2 will train ``name`` with (``thing_classes``), or None.

    Built-in COCO/LVIS sets carry them from registration; sets registered from a json file get
    them when loaded, so those are loaded here (as the training loader will do again).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is None:
        logger.info("loading dataset %s to read its categories", name)
        DatasetCatalog.get(name)
    classes = meta.get("thing_classes")
    return list(classes) if classes is not None else None


def datasets_in_use(cfg, eval_only: bool = False) -> list[tuple[str, str]]:
    """``(role, name)`` of every dataset the run reads: ``("training", name)`` for
    ``DATASETS.TRAIN`` and ``("test", name)`` for ``DATASETS.TEST`` (``--eval-only`` reads
    only these; training reads both, as it ends with an evaluation on ``DATASETS.TEST``)."""
    test = [("test", n) for n in cfg.DATASETS.TEST]
    return test if eval_only else [("training", n) for n in cfg.DATASETS.TRAIN] + test


def check_num_classes(cfg, eval_only: bool = False) -> None:
    """The model's class count (from the key its meta-architecture reads) must equal the
    number of categories of every dataset the run uses (see :func:`datasets_in_use`)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in NUM_CLASSES_KEYS:
        logger.warning("class count not checked: unknown META_ARCHITECTURE %s", arch)
        return
    key = NUM_CLASSES_KEYS[arch]
    if key is None:
        return
    n = _get(cfg, key)
    for role, name in datasets_in_use(cfg, eval_only):
        classes = dataset_classes(name)
        if classes is None:
            logger.warning("class count not checked: dataset %s has no thing_classes", name)
        elif len(classes) != n and (role == "training" or eval_only):
            raise SetupError(f"{key} is {n} but {role} dataset {name} has {len(classes)} "
                             f"categories: set {key} {len(classes)}")
        elif len(classes) != n:
            raise SetupError(f"{key} is {n} but test dataset {name} has {len(classes)} "
                             "categories, and training ends with an evaluation on DATASETS.TEST: "
                             f"set DATASETS.TEST to datasets with {n} categories, or to ()")


def check_config(cfg, resume: bool = False, eval_only: bool = False) -> None:
    """All cheap setup-time checks on a built config (datasets must be registered already).

    Raises:
        SetupError: with a one-line message naming the key to change.
    """
    check_weights(cfg, resume=resume)
    check_num_classes(cfg, eval_only=eval_only)


def check_timm_backbone(cfg) -> None:
    """``MODEL.TIMM.*`` values that would otherwise fail only when the model is built."""
    import timm

    from .modeling.timm_backbone import NORMS

    if cfg.MODEL.TIMM.NORM not in NORMS:
        raise SetupError(f"MODEL.TIMM.NORM must be one of {NORMS}, got {cfg.MODEL.TIMM.NORM!r}")
    if not timm.is_model(cfg.MODEL.TIMM.ARCH.split(".")[0]):
        raise SetupError(f"MODEL.TIMM.ARCH names no timm model: {cfg.MODEL.TIMM.ARCH!r} "
                         "(see timm.list_models())")


def check_dataset_files(cfg, eval_only: bool = False) -> None:
    """The annotation file and image folder of every dataset the run uses exist (Detectron2's
    built-in COCO/LVIS sets are registered lazily and would fail only when first read: a test
    set after the whole schedule), and an LVIS set's file holds LVIS's fields (a COCO file there
    fails only at the final evaluation). Sets registered with ``--register-coco`` were
    validated in full on registration; the embedded shapes set is generated on first use."""
    from detectron2.data import MetadataCatalog

    from .data import EMBEDDED_SPLITS

    for role, name in datasets_in_use(cfg, eval_only):
        if name in EMBEDDED_SPLITS:
            continue
        meta = MetadataCatalog.get(name)
        json_file, image_root = meta.get("json_file"), meta.get("image_root")
        if json_file and not Path(json_file).is_file():
            raise SetupError(f"{role} dataset {name}: annotation file {json_file} does not exist "
                             "(COCO/LVIS go under $DETECTRON2_DATASETS)")
        if image_root and not Path(image_root).is_dir():
            raise SetupError(f"{role} dataset {name}: image folder {image_root} does not exist "
                             "(COCO/LVIS go under $DETECTRON2_DATASETS)")
        if json_file and meta.get("evaluator_type") == "lvis" and not _has_lvis_fields(json_file):
            raise SetupError(f"{role} dataset {name} is registered as LVIS but {json_file} has no "
                             "LVIS fields ('frequency' of categories, "
                             "'not_exhaustive_category_ids' of images): it looks like a COCO "
                             "file; put the LVIS annotations there, or register it as COCO")


# Keys every LVIS annotation file has and COCO files do not (LVIS evaluation reads them).
_LVIS_KEYS = (b'"frequency"', b'"not_exhaustive_category_ids"')


def _has_lvis_fields(json_file: str) -> bool:
    """True when ``json_file`` holds LVIS's own keys; a byte search of the memory-mapped
    file (about a second for LVIS train), without parsing it."""
    import mmap

    with open(json_file, "rb") as f:
        if Path(json_file).stat().st_size == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return all(m.find(key) >= 0 for key in _LVIS_KEYS)


# ---------------------------------------------------------------------------------------------
# Weights against the model they load into

_COUNTER = "num_batches_tracked"
_D2_RESNET_KEY = re.compile(r"(?:^|\.)((?:stem|res[2-5])\..*)$")


def model_shapes(cfg) -> tuple[dict[str, tuple], str]:
    """Shapes of the tensors of the model ``cfg`` builds (BatchNorm counters left out), and
    the key prefix of its pretrained backbone (the FPN's bottom-up network).

    The model is built on the meta device (no memory, no initialisation); a model that cannot
    be built there is built on the CPU. ``MODEL.TIMM.WEIGHTS`` is not loaded.
    """
    import torch
    from detectron2.modeling import META_ARCH_REGISTRY

    c = cfg.clone()
    c.defrost()
    c.MODEL.TIMM.WEIGHTS = ""
    build = META_ARCH_REGISTRY.get(c.MODEL.META_ARCHITECTURE)
    try:
        try:
            with torch.device("meta"):
                model = build(c)
        except Exception:  # noqa: BLE001 - a module that reads tensor values while built
            model = build(c)
    except Exception as e:  # noqa: BLE001 - a config value the model cannot be built with
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SetupError(f"the model cannot be built from this config: {first}") from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith(_COUNTER)}
    backbone = getattr(model, "backbone", None)
    prefix = "backbone.bottom_up." if hasattr(backbone, "bottom_up") else "backbone."
    return shapes, prefix


def loadable_keys(shapes: dict[str, tuple], loaded: dict) -> tuple[set[str], list[str]]:
    """The model keys (of ``shapes``) that Detectron2's checkpointer fills from ``loaded``
    (what :func:`m2_detectron2.checkpoint.load_weights_file` returns): matched by name
    heuristics when the file asks for them, else by exact name, with equal shapes.

    Returns:
        (keys that load, "key (file shape, model shape)" of names found with other shapes;
        the heuristic matching skips those silently, so the list is empty there).
    """
    import torch

    sd = loaded.get("model")
    if not isinstance(sd, dict):
        return set(), []
    sd = {k: v for k, v in sd.items() if isinstance(k, str) and hasattr(v, "shape")}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if sd and loaded.get("matching_heuristics"):
        from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

        quiet = logging.getLogger("detectron2.checkpoint.c2_model_loading")
        was, quiet.disabled = quiet.disabled, True
        try:
            model_sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
            sd = align_and_update_state_dicts(model_sd, sd, loaded.get("__author__") == "Caffe2")
        except ValueError as e:  # one file key matching several model keys
            raise SetupError(f"weights cannot be matched to the model: {e}") from None
        finally:
            quiet.disabled = was
    matched = {k for k, s in shapes.items() if k in sd and tuple(sd[k].shape) == s}
    other = [f"{k} ({tuple(sd[k].shape)} in the file, {s} in the model)"
             for k, s in shapes.items() if k in sd and tuple(sd[k].shape) != s]
    return matched, other


def _likely_cause(cfg, loaded: dict, backbone_matched: bool, other_shapes: list[str],
                  unmatched: list[str], resumed: bool) -> str:
    """What the weights most likely are, and what to do, for a file that does not fit."""
    from .convert import ConversionError, resnet_depth

    sd = loaded.get("model") if isinstance(loaded.get("model"), dict) else {}
    keys = [k[len("module."):] if k.startswith("module.") else k for k in sd if isinstance(k, str)]
    timm_backbone = cfg.MODEL.BACKBONE.NAME in TIMM_BACKBONES
    if other_shapes:
        return (f"shapes differ for {other_shapes[0]}"
                + (f" and {len(other_shapes) - 1} more" if len(other_shapes) > 1 else "")
                + " (weights of a model with another NUM_CLASSES or architecture?)")
    if backbone_matched:
        if resumed:
            return ("it holds backbone weights only, not a checkpoint of this model: restore "
                    "the run's checkpoint, or start without --resume in a new OUTPUT_DIR")
        return ("it holds backbone weights only; --eval-only needs a trained detector "
                "(OUTPUT_DIR/model_final.pth of a run with this config)")
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        if timm_backbone:
            return ("it holds an encoder with timm names (e.g. `m2-pretrain export` output): "
                    "pass it as MODEL.TIMM.WEIGHTS and leave MODEL.WEIGHTS empty")
        return ("it holds an encoder with timm/torchvision names (e.g. `m2-pretrain export` "
                "output, with or without its .json sidecar): convert it first with "
                "`python tools/convert_to_d2.py ENCODER OUT.pkl` and pass OUT.pkl")
    d2 = {m.group(1): None for k in keys if (m := _D2_RESNET_KEY.search(k))}
    if d2 and not timm_backbone and "stem.conv1.weight" in d2:
        try:
            depth = resnet_depth(d2)
        except ConversionError:
            depth = None
        want = cfg.MODEL.RESNETS.DEPTH
        if depth is not None and depth != want:
            return (f"it holds ResNet-{depth} weights but the config builds ResNet-{want} "
                    f"(MODEL.RESNETS.DEPTH): use ResNet-{want} weights or set "
                    f"MODEL.RESNETS.DEPTH {depth}")
    return (f"{unmatched[0]} and {len(unmatched) - 1} more of the model's tensors are not in "
            "it (another architecture?)" if len(unmatched) > 1 else
            f"the model's {unmatched[0]} is not in it (another architecture?)")


def _training_checkpoint_error(label: str, path: str, timm_backbone: bool) -> SetupError:
    if timm_backbone:
        todo = f"m2-pretrain export {path} --out encoder.pth, then pass MODEL.TIMM.WEIGHTS"
    else:
        todo = (f"m2-pretrain export {path} --out encoder.pth, then "
                "python tools/convert_to_d2.py encoder.pth encoder.pkl")
    return SetupError(f"{label} is a pretraining checkpoint: export and convert it first "
                      f"({todo})")


def _exported_arch(path: str) -> str | None:
    """The ``arch`` in an exported encoder's metadata (``.safetensors`` header or ``.json``
    sidecar), without reading its tensors; None when there is none."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("m2_teacher", "{}"))
        elif meta_path(path).is_file():
            meta = json.loads(meta_path(path).read_text())
        else:
            return None
    except (OSError, ValueError):  # unreadable metadata: no hint, the fit check still holds
        return None
    return meta.get("arch") if isinstance(meta, dict) else None


def check_weights_fit(cfg, eval_only: bool = False, resume: bool = False) -> None:
    """Load each weights file the run will load and compare it with the model's tensors.

    - ``MODEL.WEIGHTS`` for training: every tensor of the pretrained backbone must load.
    - ``MODEL.WEIGHTS`` with ``--eval-only``, and the checkpoint ``--resume`` continues from
      (``OUTPUT_DIR/last_checkpoint``): every tensor of the model must load.
    - ``MODEL.TIMM.WEIGHTS``: every tensor of the timm backbone (timm names).

    ``M2.RANDOM_INIT True`` turns a partial fit into a warning. Files are read with the
    restricted loaders; URLs are not checked.

    Raises:
        SetupError: one line with how many tensors matched and the likely cause.
    """
    from m2_pretrain.export import is_training_checkpoint

    from .checkpoint import load_weights_file
    from .convert import ConversionError, load_encoder_state
    from .modeling.timm_backbone import timm_weights_problem
    from .safe_load import UnsafePickleError

    timm_backbone = cfg.MODEL.BACKBONE.NAME in TIMM_BACKBONES
    jobs = []  # (what to call it, path, whole model?): the label is what + path
    last = Path(cfg.OUTPUT_DIR) / "last_checkpoint"
    if resume and last.is_file():
        name = last.read_text().strip()
        ckpt = Path(cfg.OUTPUT_DIR) / name
        if not ckpt.is_file():
            raise SetupError(f"{last} names {name}, which does not exist: restore it, or start "
                             "without --resume in a new OUTPUT_DIR")
        jobs.append(("the checkpoint to resume ", str(ckpt), True))
    elif cfg.MODEL.WEIGHTS and "://" not in cfg.MODEL.WEIGHTS:
        jobs.append(("MODEL.WEIGHTS=", cfg.MODEL.WEIGHTS, eval_only))
    t = cfg.MODEL.TIMM.WEIGHTS
    timm_job = timm_backbone and t and "://" not in t
    if not jobs and not timm_job:
        return
    shapes, prefix = model_shapes(cfg)
    if timm_job:
        body = prefix + "body."
        own = {k[len(body):]: s for k, s in shapes.items() if k.startswith(body)}
        try:
            sd = load_encoder_state(t, cfg.MODEL.TIMM.WHICH or None)
        except (ConversionError, CheckpointError, UnsafePickleError) as e:
            raise SetupError(f"MODEL.TIMM.WEIGHTS: {e}") from None
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        problem = timm_weights_problem(own, sd)
        if problem:
            arch = _exported_arch(t)
            if arch and arch != cfg.MODEL.TIMM.ARCH:
                problem = (f"it is a {arch} encoder (its metadata) and MODEL.TIMM.ARCH is "
                           f"{cfg.MODEL.TIMM.ARCH}: set MODEL.TIMM.ARCH {arch}")
            raise SetupError(f"MODEL.TIMM.WEIGHTS={t}: {problem}")
    for what, path, whole in jobs:
        label = what + path
        try:
            loaded = load_weights_file(path)
        except UnsafePickleError as e:
            raise SetupError(f"{what}{e}") from None
        if is_training_checkpoint(loaded.get("model")):
            raise _training_checkpoint_error(label, path, timm_backbone)
        matched, other_shapes = loadable_keys(shapes, loaded)
        backbone = [k for k in shapes if k.startswith(prefix)]
        wanted = list(shapes) if whole else backbone
        n = sum(k in matched for k in wanted)
        if n == len(wanted):
            continue
        part = "model" if whole else "backbone"
        cause = _likely_cause(cfg, loaded, whole and all(k in matched for k in backbone),
                              [o for o in other_shapes if o.split(" ")[0] in wanted],
                              [k for k in wanted if k not in matched], what != "MODEL.WEIGHTS=")
        msg = f"{label}: {n} of the {part}'s {len(wanted)} tensors match the file; {cause}"
        if cfg.M2.RANDOM_INIT:
            logger.warning("%s (M2.RANDOM_INIT True: the rest starts from random values)", msg)
            continue
        raise SetupError(msg)
