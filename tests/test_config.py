from pathlib import Path

import pytest

from m2_pretrain.config import ConfigError, load_config, save_config


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 10\n  batchsize: 32\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.batchsize'"):
        load_config(p)
    with pytest.raises(ConfigError, match="unknown config key 'nonsense'"):
        load_config(None, ["nonsense.x=1"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="'train.batch_size' expects an integer"):
        load_config(None, ["train.batch_size=abc"])
    with pytest.raises(ConfigError, match="'train.amp' expects true/false"):
        load_config(None, ["train.amp=3"])


@pytest.mark.parametrize("override,message", [
    ("model.method=simclr", r"'model.method' must be one of \('m2', 'mocov2', 'simsiam'\)"),
    ("model.teacher_norm=shuffle_bn", "'model.teacher_norm' must be one of"),
    ("model.student_norm=momentum", "'model.student_norm' must be one of"),
    ("train.m_schedule=linear", "'train.m_schedule' must be one of"),
    ("data.dataset=imagenet21k", "'data.dataset' must be one of"),
    ("model.arch=not_a_model", "'model.arch' names no timm model"),
    ("optim.name=adamw", r"'optim.name' must be one of \('sgd', 'lars'\)"),
])
def test_names_are_checked_where_they_are_built_before_anything_is_written(
        tmp_path, override, message):
    """The config loads any name (it imports no builder); the trainer builds model, data,
    schedules and optimizer, each checking its own name, before it claims the directory."""
    from helpers import tiny_config

    from m2_pretrain.engine.trainer import Trainer

    key, value = override.split("=")
    sec, _, rest = key.partition(".")
    cfg = tiny_config(**{sec: {rest: value}})
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_bn_group_size_must_divide_batch():
    cfg = load_config(None, ["train.batch_size=64", "train.bn_group_size=16",
                             "model.student_norm=sync", "model.teacher_norm=bn"])
    assert cfg.train.bn_group_size == 16 and cfg.model.student_norm == "sync"
    with pytest.raises(ConfigError, match="'train.bn_group_size' \\(24\\) must divide"):
        load_config(None, ["train.batch_size=64", "train.bn_group_size=24"])
    with pytest.raises(ConfigError, match="'train.bn_group_size' is supported for model.method=m2"):
        load_config(None, ["model.method=mocov2", "train.bn_group_size=16"])


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config(None, ["train.epochs=3", "optim.base_lr=0.3", "data.mean=[0.5,0.5,0.5]",
                             "optim.weight_decay=1e-4"])
    assert cfg.optim.weight_decay == 1e-4
    assert cfg.train.epochs == 3.0 and isinstance(cfg.train.epochs, float)
    assert cfg.optim.base_lr == 0.3 and cfg.data.mean == [0.5, 0.5, 0.5]
    save_config(cfg, tmp_path / "r.yaml")
    assert load_config(tmp_path / "r.yaml") == cfg


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("configs/pretrain/*.yaml")))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.batch_size > 0


def test_augmentation_knobs_reach_both_views():
    from m2_pretrain.models.build import build_augmentation

    cfg = load_config(None, ["data.res=48", "data.blur_sigma=[0.1,0.43]", "data.solarize_p=0"])
    aug = build_augmentation(cfg)
    assert aug.student_cfg.blur_sigma == aug.teacher_cfg.blur_sigma == (0.1, 0.43)
    assert aug.teacher_cfg.solarize_p == 0.0 and aug.student_cfg.solarize_p == 0.0
    # defaults are BYOL's: sigma (0.1, 2.0), solarisation only in the teacher view, p 0.2
    aug = build_augmentation(load_config(None))
    assert aug.teacher_cfg.blur_sigma == (0.1, 2.0)
    assert (aug.student_cfg.solarize_p, aug.teacher_cfg.solarize_p) == (0.0, 0.2)
    moco = build_augmentation(load_config(None, ["model.method=mocov2",
                                                 "data.blur_sigma=[0.2,1.0]"]))
    assert moco.student_cfg.blur_sigma == moco.teacher_cfg.blur_sigma == (0.2, 1.0)
    with pytest.raises(ConfigError, match="'data.blur_sigma' must be"):
        load_config(None, ["data.blur_sigma=[2.0,0.1]"])
    with pytest.raises(ConfigError, match="'data.solarize_p' must be in"):
        load_config(None, ["data.solarize_p=1.5"])


@pytest.mark.parametrize("method", ["m2", "mocov2"])
def test_zero_init_last_reaches_the_encoder(method):
    """``model.zero_init_last``: None keeps timm's init (each block's last BN weight 0);
    False is torchvision's (1), which the paper's ResNets use."""
    import torch

    from m2_pretrain.models.build import build_model

    def last_bn_weights(cfg):
        torch.manual_seed(0)
        model = build_model(cfg)
        enc = model.student.encoder
        return torch.cat([b.bn2.weight.detach() for stage in (enc.layer1, enc.layer4)
                          for b in stage])

    base = [f"model.method={method}", "model.arch=resnet18", "model.moco_queue=256"]
    assert torch.all(last_bn_weights(load_config(None, base)) == 0)
    assert torch.all(last_bn_weights(load_config(None, base + ["model.zero_init_last=false"])) == 1)


PRETRAIN_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "pretrain")
                          .glob("*.yaml"))


def test_every_pretraining_config_starts_from_the_papers_init():
    """Each shipped pretraining config builds an encoder whose residual blocks' last BN weight
    is 1 (torchvision's init, as the authors' code), not timm's 0."""
    import functools

    import torch

    from m2_pretrain.config import encoder_kwargs
    from m2_pretrain.models.encoder import create_encoder

    @functools.lru_cache(maxsize=None)
    def block_final_bn_weights(arch, kwargs):
        torch.manual_seed(0)
        enc = create_encoder(arch, **dict(kwargs))
        out = []
        for stage in (enc.layer1, enc.layer2, enc.layer3, enc.layer4):
            for block in stage:
                # the block's last BN on the residual branch (not the shortcut's)
                bns = [m for n, m in block.named_modules()
                       if isinstance(m, torch.nn.BatchNorm2d) and "downsample" not in n]
                out.append(bns[-1].weight.detach())
        return torch.cat(out)

    assert len(PRETRAIN_CONFIGS) >= 14
    for path in PRETRAIN_CONFIGS:
        cfg = load_config(path)
        w = block_final_bn_weights(cfg.model.arch, tuple(sorted(encoder_kwargs(cfg).items())))
        assert torch.all(w == 1), f"{path.name}: block-final BN weights are not all 1"


@pytest.mark.parametrize("override, key", [
    ("data.workers=-1", "data.workers"),
    ("train.batch_size=1", "train.batch_size"),
    ("optim.base_lr=-0.1", "optim.base_lr"),
    ("optim.momentum=-0.9", "optim.momentum"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay"),
    ("data.crop_scale_min=-0.5", "data.crop_scale_min"),
    ("data.crop_scale_min=1.5", "data.crop_scale_min"),
    ("data.blur_sigma=[a,b]", "data.blur_sigma"),
    ("data.blur_sigma=[0.1,2,3]", "data.blur_sigma"),
    ("data.mean=[0.5,0.5]", "data.mean"),
    ("data.mean=[a,b,c]", "data.mean"),
    ("data.std=[0.2,0,0.2]", "data.std"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("knn.k=0", "knn.k"),
    ("knn.temperature=0", "knn.temperature"),
    ("eval.linear_epochs=0", "eval.linear_epochs"),
    ("eval.semi_epochs=0.5", "eval.semi_epochs"),
    ("train.bn_group_size=1", "train.bn_group_size"),
    ("optim.base_lr=.nan", "optim.base_lr"),
])
def test_meaningless_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'") as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


def test_shuffle_bn_sub_batches_need_two_images():
    base = ["model.method=mocov2", "model.key_norm=shuffle_bn", "model.shuffle_splits=2"]
    assert load_config(None, base + ["train.batch_size=4"]).train.batch_size == 4
    with pytest.raises(ConfigError, match="leaves fewer than 2 images"):
        load_config(None, base + ["train.batch_size=3"])


def test_moco_keys_live_in_their_section_and_old_flat_keys_still_load(caplog):
    new = load_config(None, ["model.method=mocov2", "model.moco.queue=256",
                             "model.moco.key_norm=momentum"])
    assert (new.model.moco.queue, new.model.moco.key_norm) == (256, "momentum")
    assert "moco" in new.to_dict()["model"] and "moco_queue" not in new.to_dict()["model"]
    with caplog.at_level("WARNING", logger="m2_pretrain.config"):
        old = load_config(None, ["model.method=mocov2", "model.moco_queue=256",
                                 "model.key_norm=momentum"])
    assert old.to_dict() == new.to_dict()
    warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert warnings == ["deprecated config key model.moco_queue: use model.moco.queue",
                        "deprecated config key model.key_norm: use model.moco.key_norm"]
    from m2_pretrain.models.build import build_model

    with pytest.raises(ConfigError, match="'model.moco.key_norm' must be one of"):
        build_model(load_config(None, ["model.method=mocov2", "model.moco.key_norm=sync"]))


def test_list_fields_have_element_types():
    assert load_config(None, ["data.mean=[0,1,0.5]"]).data.mean == [0.0, 1.0, 0.5]
    with pytest.raises(ConfigError, match="'data.std' expects a list of float values"):
        load_config(None, ["data.std=[0.2,x,0.2]"])




EVAL_PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs" / "eval").glob("*.yaml"))


def test_evaluation_presets_hold_the_documented_protocols():
    """The shipped evaluation presets carry the values docs/evaluation.md gives (paper: STL10
    linear lr 0.5 per 256 for 80 epochs; ImageNet linear lr 0.2; semi batch 1024, lr 0.08,
    20 / 15 epochs), kNN over the whole training split, and the page names every preset."""
    repo = Path(__file__).resolve().parents[1]
    doc = (repo / "docs" / "evaluation.md").read_text()
    assert len(EVAL_PRESETS) == 4
    for path in EVAL_PRESETS:
        cfg = load_config(path)
        assert (cfg.knn.max_train, cfg.knn.k, cfg.knn.temperature) == (0, 200, 0.1), path
        assert f"configs/eval/{path.name}" in doc, path
    imagenet = load_config(repo / "configs/eval/imagenet_r50.yaml")
    e = imagenet.eval
    assert (imagenet.data.res, e.linear_lr, e.batch_size, e.linear_epochs) == (224, 0.2, 256, 80)
    assert (e.semi_batch_size, e.semi_lr, e.semi_epochs, e.semi_global_bn) == (1024, 0.08, 20,
                                                                               True)
    assert load_config(repo / "configs/eval/imagenet_r50_semi_10percent.yaml").eval.semi_epochs == 15
    stl = load_config(repo / "configs/eval/stl10_r18.yaml")
    assert (stl.data.res, stl.eval.linear_lr, stl.eval.linear_epochs) == (96, 0.5, 80)
    assert stl.eval.linear_augment and not load_config(
        repo / "configs/eval/fashion_mnist.yaml").eval.linear_augment
