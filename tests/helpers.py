"""Small configs for fast CPU tests."""

from m2_pretrain.config import load_config


def tiny_config(**sections):
    overrides = [
        "model.arch=resnet18", "model.proj_hidden=32", "model.proj_out=16", "model.pred_hidden=32",
        "data.dataset=embedded", "data.res=32", "data.num_images=64", "data.workers=0",
        "train.batch_size=8", "train.max_steps=6", "train.log_every=1", "train.device=cpu",
        "optim.warmup_epochs=0.25", "optim.lr_reference_batch=8",
        "checkpoint.every_steps=2", "checkpoint.keep_last=10",
    ]
    for sec, kv in sections.items():
        for k, v in kv.items():
            overrides.append(f"{sec}.{k}={v}")
    return load_config(None, overrides)
