"""Typed configuration: YAML files over dataclass defaults, plus ``key=value`` overrides.

An unknown key or a value of the wrong type is a ``ConfigError`` that names the key.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, TypeVar

import yaml


logger = logging.getLogger(__name__)
T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key."""


def choose(key: str, name: str, table: Mapping[str, T]) -> T:
    """``table[name]``; a ``ConfigError`` naming ``key`` and the valid names otherwise. Each
    choice is a table in the module that builds it (methods, datasets, norms, optimizers)."""
    if name not in table:
        raise ConfigError(f"config key '{key}' must be one of {tuple(table)}, got {name!r}")
    return table[name]


@dataclass
class MoCoConfig:
    """MoCo v2 (``model.method: mocov2``)."""

    dim: int = 128  # head output
    hidden: int = 2048  # head hidden width
    queue: int = 65536  # negatives kept
    temperature: float = 0.2
    key_norm: str = "shuffle_bn"  # shuffle_bn | momentum | bn
    key_alpha: float = 0.064  # fixed Momentum BN alpha of the key encoder
    shuffle_splits: int = 2  # single-process shuffle BN sub-batches


@dataclass
class SimSiamConfig:
    """SimSiam (``model.method: simsiam``; Chen & He 2021)."""

    dim: int = 2048  # projector width and output (3 layers, BN on the output)
    pred_hidden: int = 512  # predictor bottleneck (dim -> pred_hidden -> dim)


# flat ``model`` keys of older configs -> their key in ``model.moco``
MOCO_RENAMED = {"moco_dim": "dim", "moco_hidden": "hidden", "moco_queue": "queue",
                "moco_temperature": "temperature", "key_norm": "key_norm",
                "key_alpha": "key_alpha", "shuffle_splits": "shuffle_splits"}


@dataclass
class ModelConfig:
    method: str = "m2"  # "m2" (Momentum² Teacher / BYOL family), "mocov2" or "simsiam"
    arch: str = "resnet18"  # any timm CNN
    proj_hidden: int = 512
    proj_out: int = 128
    pred_hidden: int = 512
    # where BN statistics come from (Table 1's rows): per device "bn", whole batch "sync",
    # teacher only: "momentum" (Momentum BN per device); see train.bn_group_size
    teacher_norm: str = "momentum"  # momentum | bn (BYOL baseline) | sync
    student_norm: str = "bn"  # bn | sync
    alpha_base: float = 1.0  # Momentum BN: initial weight of the current batch
    # timm ResNets start each block's last BN weight at 0 (zero_init_last); torchvision's ResNet,
    # which the paper and the authors' code use, starts it at 1. None keeps timm's default (the
    # argument is only passed when set; only timm's ResNet family accepts it).
    zero_init_last: Optional[bool] = None
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    simsiam: SimSiamConfig = field(default_factory=SimSiamConfig)


@dataclass
class DataConfig:
    dataset: str = "embedded"  # embedded | imagefolder | stl10 | fashion_mnist
    root: str = ""  # dataset location (not used by "embedded")
    split: str = "train"  # pretraining split (stl10: "train+unlabeled")
    res: int = 32  # crop size
    num_images: int = 2000  # embedded dataset size
    num_classes: int = 10  # embedded dataset classes
    embedded_palette: Literal["colour", "two_tone"] = "colour"  # 6 colours, or two tones
    workers: int = 2
    pin_memory: bool = True
    skip_corrupt: bool = False  # skip unreadable images with a warning instead of stopping
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    crop_scale_min: float = 0.08
    # Gaussian blur sigma range in pixels (BYOL's, for 224 px crops; both methods) and the
    # teacher view's solarisation probability (m2 only: the student view's is 0, and MoCo v2's
    # pipeline has no solarisation)
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_p: float = 0.2
    # where the two-view colour augmentation runs: cpu (per image, PIL, in the loader workers),
    # cuda (batched on the training device; workers only decode, crop and flip), auto (cuda
    # when training on CUDA)
    augment_device: Literal["auto", "cpu", "cuda"] = "auto"
    # knn monitor / evaluation splits (labelled); empty disables
    knn_train_split: str = ""
    knn_test_split: str = ""


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | lars
    base_lr: float = 0.1  # per `lr_reference_batch` images (linear scaling rule)
    lr_reference_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 10.0
    warmup_factor: float = 0.001
    exclude_bias_norm: bool = True  # no wd (and no LARS adaptation) on bias and norm params


@dataclass
class TrainConfig:
    epochs: float = 400.0
    max_steps: int = 0  # >0 overrides epochs (in optimizer steps)
    batch_size: int = 32  # per device, per view
    accum_steps: int = 1  # gradient accumulation; schedules step per optimizer step
    # virtual devices: >0 splits each view's batch into groups of this size whose per-device
    # BN statistics are kept apart as that many devices would (0 = the process is one device)
    bn_group_size: int = 0
    m_base: float = 0.032  # initial 1 - m of the parameter EMA, at m_base_reference_batch
    # momentum equivalence rule (paper 4.2): m_base is scaled by global_batch / this; 0 = off
    m_base_reference_batch: int = 0
    m_schedule: str = "cosine"  # cosine: 1 - m decays to 0; constant: m = 1 - m_base (MoCo)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # bf16 autocast on CUDA (fp32 on CPU unless amp_cpu)
    # bf16 autocast on CPU too (opt-in; needs amp): about 1.5x per step on CPUs with bf16
    # matrix units (AVX512-BF16 / AMX), and it can be slower on CPUs without them
    amp_cpu: bool = False
    channels_last: bool = True  # on CUDA
    compile: bool = False
    log_every: int = 10
    grad_clip: float = 0.0


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3


@dataclass
class KnnConfig:
    every_epochs: float = 0.0  # 0 disables the kNN monitor
    k: int = 200
    temperature: float = 0.1
    # training images the kNN classifier keeps: 0 = the whole training split (the protocol
    # published kNN numbers use); N > 0 = a fixed random subset of N (faster, e.g. for the
    # monitor), named in results.json and printed beside the number
    max_train: int = 0


@dataclass
class EvalConfig:
    res: int = 0  # evaluation crop size; 0 = data.res
    batch_size: int = 256  # the global batch of the linear probe, over all processes
    # linear probe: frozen encoder -> BN (no affine) -> linear; SGD 0.9, no wd, cosine
    linear_epochs: float = 80.0
    linear_lr: float = 0.5  # per 256 images (0.5 STL10, 0.2 ImageNet)
    linear_augment: bool = True  # train-time crop + flip; false = precompute features once
    # semi-supervised fine-tuning of the whole encoder + linear head
    semi_epochs: float = 20.0  # 20 for a 1% split, 15 for 10%
    semi_lr: float = 0.08  # at semi_batch_size (cosine)
    semi_batch_size: int = 1024  # the global batch, over all processes
    # BN statistics of the global batch (all processes) during fine-tuning and the recount;
    # false: each process's own batch (statistics averaged over processes after the recount)
    semi_global_bn: bool = True
    val_split: str = ""  # labelled split to report on; empty = data.knn_test_split


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check/convert ``value`` to the field type ``typ``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[...]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(typ)
        if value in allowed:
            return value
        raise ConfigError(f"config key '{key}' must be one of {allowed}, got {value!r}")
    if typ is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        item = (typing.get_args(typ) or (None,))[0]
        if item is None:
            return list(value)
        try:
            return [_coerce(key, v, item) for v in value]
        except ConfigError:
            raise ConfigError(f"config key '{key}' expects a list of {item.__name__} values, got "
                              f"{value!r}") from None
    return value


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    if isinstance(obj, ModelConfig):
        updates = _moved_moco_keys(updates, prefix)
    for k, v in updates.items():
        key = prefix + str(k)
        if k not in fields:
            raise ConfigError(
                f"unknown config key '{key}' (valid keys here: {', '.join(sorted(fields))})"
            )
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _merge(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


def _moved_moco_keys(updates: dict, prefix: str) -> dict:
    """Older configs' flat MoCo keys (``model.moco_dim``...) moved into ``model.moco``."""
    old = [k for k in updates if k in MOCO_RENAMED]
    if not old:
        return updates
    logger.warning("deprecated config key%s %s: use %s", "s" if len(old) > 1 else "",
                   ", ".join(prefix + k for k in old),
                   ", ".join(f"{prefix}moco.{MOCO_RENAMED[k]}" for k in old))
    moved = {k: v for k, v in updates.items() if k not in MOCO_RENAMED}
    section = dict(moved.get("moco") or {})
    section.update({MOCO_RENAMED[k]: updates[k] for k in old})
    moved["moco"] = section
    return moved


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override for '{key}': cannot parse value {raw!r}: {e}") from None
    return key.strip().split("."), value


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain values only: a ``!!python/...`` tag is an error, never run)
    that refuses a key written twice in one mapping, where YAML would keep the last one."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is written twice (lines {first} and "
                    f"{key_node.start_mark.line + 1}); the second would replace the first: merge "
                    "them", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml_file(path: str | Path) -> Any:
    """The YAML document in ``path``, read with a safe loader that also refuses duplicated keys.

    Raises:
        ConfigError: one line naming the file, the line and the problem (a Python tag, a key
            written twice, a syntax error).
    """
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if "python/" in problem or "could not determine a constructor" in problem:
            problem = (f"{problem.strip()}: a config may hold only plain YAML values (a Python "
                       "tag would run code); remove the tag")
        raise ConfigError(f"{where}: invalid YAML: {problem.strip()}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None


def _load_yaml_chain(path: Path, cfg: Config, seen: tuple = ()) -> None:
    """Merge ``path`` into ``cfg``, after the file named by its ``_base_`` key (if any)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through _base_")
    data = load_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = data.pop("_base_", None)
    if base is not None:
        _load_yaml_chain(path.parent / base, cfg, seen + (path.resolve(),))
    _merge(cfg, data)


def load_config(path: Optional[str | Path] = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any, after its ``_base_`` chain), then ``key=value``
    overrides."""
    cfg = Config()
    if path is not None:
        _load_yaml_chain(Path(path), cfg)
    for text in overrides or []:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _merge(cfg, data)
    validate(cfg)
    return cfg


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_numbers(key: str, values: list, n: int, what: str) -> None:
    if len(values) != n or not all(_is_number(v) for v in values):
        raise ConfigError(f"config key '{key}' must be {what}, got {values!r}")


def _float_values(obj: Any, prefix: str = ""):
    """``(key, value)`` of every float (and list-of-float item) in the config."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _float_values(v, f"{prefix}{f.name}.")
        elif isinstance(v, float):
            yield prefix + f.name, v
        elif isinstance(v, list):
            yield from ((prefix + f.name, x) for x in v if isinstance(x, float))


def _check_ranges(cfg: Config) -> None:
    """Every numeric key with a range, one ``ConfigError`` naming the first key outside it."""
    t, o, d, m, k, e = cfg.train, cfg.optim, cfg.data, cfg.model, cfg.knn, cfg.eval
    at_least = {  # key: (value, minimum)
        "train.batch_size": (t.batch_size, 1), "train.accum_steps": (t.accum_steps, 1),
        "train.log_every": (t.log_every, 1), "train.max_steps": (t.max_steps, 0),
        "train.m_base_reference_batch": (t.m_base_reference_batch, 0),
        "data.res": (d.res, 1), "data.workers": (d.workers, 0),
        "data.num_images": (d.num_images, 1), "data.num_classes": (d.num_classes, 1),
        "checkpoint.keep_last": (cfg.checkpoint.keep_last, 1),
        "checkpoint.every_steps": (cfg.checkpoint.every_steps, 1),
        "optim.lr_reference_batch": (o.lr_reference_batch, 1),
        "model.proj_hidden": (m.proj_hidden, 1), "model.proj_out": (m.proj_out, 1),
        "model.pred_hidden": (m.pred_hidden, 1), "model.moco.dim": (m.moco.dim, 1),
        "model.moco.hidden": (m.moco.hidden, 1), "model.moco.queue": (m.moco.queue, 1),
        "model.moco.shuffle_splits": (m.moco.shuffle_splits, 1),
        "model.simsiam.dim": (m.simsiam.dim, 1),
        "model.simsiam.pred_hidden": (m.simsiam.pred_hidden, 1),
        "knn.k": (k.k, 1), "knn.max_train": (k.max_train, 0),
        "eval.res": (e.res, 0), "eval.batch_size": (e.batch_size, 1),
        "eval.semi_batch_size": (e.semi_batch_size, 1),
        "eval.linear_epochs": (e.linear_epochs, 1), "eval.semi_epochs": (e.semi_epochs, 1),
        "optim.weight_decay": (o.weight_decay, 0), "optim.warmup_epochs": (o.warmup_epochs, 0),
        "train.grad_clip": (t.grad_clip, 0), "train.epochs": (t.epochs, 0),
        "knn.every_epochs": (k.every_epochs, 0),
    }
    for key, (val, low) in at_least.items():
        if not val >= low:  # also refuses NaN
            raise ConfigError(f"config key '{key}' must be >= {low}, got {val}")
    for key, val in _float_values(cfg):
        if not math.isfinite(val):
            raise ConfigError(f"config key '{key}' must be a finite number, got {val}")
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"config key 'train.seed' must be in [0, 2**32) (numpy's seed range), "
                          f"got {t.seed}")
    positive = {"optim.base_lr": o.base_lr, "knn.temperature": k.temperature,
                "model.moco.temperature": m.moco.temperature, "eval.linear_lr": e.linear_lr,
                "eval.semi_lr": e.semi_lr}
    for key, val in positive.items():
        if not val > 0:
            raise ConfigError(f"config key '{key}' must be positive, got {val}")
    unit = {"optim.momentum": (o.momentum, "[0, 1)", 0 <= o.momentum < 1),
            "optim.warmup_factor": (o.warmup_factor, "(0, 1]", 0 < o.warmup_factor <= 1),
            "data.crop_scale_min": (d.crop_scale_min, "(0, 1]", 0 < d.crop_scale_min <= 1),
            "data.solarize_p": (d.solarize_p, "[0, 1]", 0 <= d.solarize_p <= 1),
            "train.m_base": (t.m_base, "[0, 1]", 0 <= t.m_base <= 1),
            "model.alpha_base": (m.alpha_base, "[0, 1]", 0 <= m.alpha_base <= 1),
            "model.moco.key_alpha": (m.moco.key_alpha, "[0, 1]", 0 <= m.moco.key_alpha <= 1)}
    for key, (val, text, ok) in unit.items():
        if not ok:
            raise ConfigError(f"config key '{key}' must be in {text}, got {val}")


def _check_batch_norm_batches(cfg: Config) -> None:
    """Train-mode batch norm needs at least 2 images per statistics group."""
    t, m = cfg.train, cfg.model
    g = t.bn_group_size
    if g < 0:
        raise ConfigError(f"config key 'train.bn_group_size' must be >= 0, got {g}")
    if g > 0 and t.batch_size % g != 0:
        raise ConfigError(
            f"config key 'train.bn_group_size' ({g}) must divide train.batch_size "
            f"({t.batch_size}); use a batch size that is a multiple of the group size")
    if g > 0 and m.method != "m2":
        raise ConfigError("config key 'train.bn_group_size' is supported for model.method=m2 only; "
                          "set it to 0")
    if g == 1:
        raise ConfigError("config key 'train.bn_group_size' must be at least 2 (batch norm needs "
                          "2 images per group), or 0")
    if t.batch_size < 2:
        raise ConfigError(f"config key 'train.batch_size' must be at least 2 per view (batch norm "
                          f"needs 2 images per batch), got {t.batch_size}")
    k = m.moco
    if m.method == "mocov2" and k.key_norm == "shuffle_bn" and t.batch_size // k.shuffle_splits < 2:
        raise ConfigError(
            f"config key 'train.batch_size' ({t.batch_size}) split into model.moco.shuffle_splits "
            f"({k.shuffle_splits}) shuffle-BN sub-batches leaves fewer than 2 images in one; "
            "raise the batch size or lower model.moco.shuffle_splits")


def validate(cfg: Config) -> None:
    """Check every value that can be checked without data, a device or the modules that build
    from the config; ``ConfigError`` names the first key that is wrong. Names (``model.method``,
    ``model.arch``, the norms, ``train.m_schedule``, ``data.dataset``) are checked where they
    are built, through :func:`choose`, as Detectron2's and timm's registries do."""
    _check_ranges(cfg)
    _check_batch_norm_batches(cfg)
    bs = cfg.data.blur_sigma
    _check_numbers("data.blur_sigma", bs, 2, "[low, high] with 0 < low <= high")
    if not 0 < bs[0] <= bs[1]:
        raise ConfigError(f"config key 'data.blur_sigma' must be [low, high] with 0 < low <= high, "
                          f"got {bs}")
    _check_numbers("data.mean", cfg.data.mean, 3, "3 numbers (per RGB channel)")
    _check_numbers("data.std", cfg.data.std, 3, "3 positive numbers (per RGB channel)")
    if not all(v > 0 for v in cfg.data.std):
        raise ConfigError(f"config key 'data.std' must be 3 positive numbers (per RGB channel), "
                          f"got {cfg.data.std}")
    if cfg.train.epochs <= 0 and cfg.train.max_steps <= 0:
        raise ConfigError("config key 'train.epochs' must be positive (or set train.max_steps)")


def encoder_kwargs(cfg: Config) -> dict:
    """``timm.create_model`` arguments from ``cfg.model`` (``zero_init_last`` when set)."""
    z = cfg.model.zero_init_last
    return {} if z is None else {"zero_init_last": z}


def bn_groups(cfg: Config) -> int:
    """Virtual devices per view batch (``train.batch_size / train.bn_group_size``, or 1)."""
    g = cfg.train.bn_group_size
    return cfg.train.batch_size // g if g > 0 else 1


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
