"""One process of a distributed-evaluation test: run as a plain script (one process) or under
``torchrun --nproc_per_node=N`` (N gloo processes); every process saves what it computed to
``OUT/rank<r>.pt``.

    python eval_dist_worker.py protocols WEIGHTS OUT [key=value ...]
    python eval_dist_worker.py exactly_once - OUT N_IMAGES
    python eval_dist_worker.py bn - OUT
"""

import os
import sys

import torch
import torch.nn as nn

from m2_pretrain.config import load_config
from m2_pretrain.eval import protocols
from m2_pretrain.eval.common import load_encoder
from m2_pretrain.eval.distributed import eval_context, evaluate_sharded

ARCH = "resnet10t"


def config(extra=()):
    return load_config(None, [
        "data.dataset=embedded", "data.res=32", "data.num_images=240", "data.workers=0",
        "data.knn_train_split=train", "data.knn_test_split=test", "train.device=cpu",
        "train.seed=3", "eval.batch_size=40", "eval.linear_epochs=2", "eval.linear_lr=1.0",
        "eval.semi_batch_size=24", "eval.semi_epochs=8", "eval.semi_lr=0.1", "knn.k=10",
        *extra])


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def run_protocols(weights: str, out: str, extra: list[str]) -> None:
    if os.environ.get("GPU_LIKE") == "1":  # lay out channels-last on the CPU, as on CUDA
        from m2_pretrain.engine import trainer

        trainer.CHANNELS_LAST_DEVICES = ("cuda", "cpu")
    cfg = config(extra)
    ctx = eval_context(cfg)
    result = {"world_size": ctx.world_size}
    heads = {}
    orig = protocols.train_linear_head

    def keep_head(head, *a, **kw):  # the trained head, whatever wraps it
        trained = orig(head, *a, **kw)
        heads[len(heads)] = snapshot(getattr(trained, "module", trained))
        return trained

    protocols.train_linear_head = keep_head
    for name, over in (("linear_aug", {"linear_augment": True}),
                       ("linear_pre", {"linear_augment": False})):
        cfg.eval.linear_augment = over["linear_augment"]
        torch.manual_seed(cfg.train.seed)
        enc, _ = load_encoder(weights)
        result[name] = protocols.linear_probe(enc, cfg, ctx.device, False, ctx)
        result[name + "_head"] = heads[len(heads) - 1]
    torch.manual_seed(cfg.train.seed)
    enc, _ = load_encoder(weights)
    result["knn"] = protocols.knn_eval(enc, cfg, ctx.device, False, ctx)
    torch.manual_seed(cfg.train.seed)
    enc, _ = load_encoder(weights)
    # 49 images at a global batch of 24: the recount's last batch holds one image, so with 2
    # processes, process 1 holds none of it
    indices = list(range(0, 240, 4))[:49]
    result["semi"] = protocols.semi_finetune(enc, cfg, indices, ctx.device, False, ctx)
    result["semi_encoder"] = snapshot(enc)
    result["semi_channels_last"] = all(
        p.is_contiguous(memory_format=torch.channels_last) for p in enc.parameters()
        if p.dim() == 4)
    cfg.eval.semi_global_bn = False  # per-process batch statistics, recounts averaged
    torch.manual_seed(cfg.train.seed)
    enc, _ = load_encoder(weights)
    result["semi_local_bn"] = protocols.semi_finetune(enc, cfg, indices, ctx.device, False, ctx)
    result["semi_local_bn_encoder"] = snapshot(enc)
    torch.save(result, f"{out}/rank{ctx.rank}.pt")
    ctx.close()


class IndexImages(torch.utils.data.Dataset):
    """``n`` one-pixel images whose pixel holds the index (base 256); label ``i % 10``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        x = torch.tensor([[[i // 256]], [[i % 256]]], dtype=torch.uint8)
        return x, i % 10


class RightWhenSeven(nn.Module):
    """Logits that are right (top-1) exactly for the images whose index is a multiple of 7,
    and put the right class second otherwise (top-5 always right)."""

    def forward(self, x):
        i = x[:, 0, 0, 0].long() * 256 + x[:, 1, 0, 0].long()
        label = i % 10
        logits = torch.zeros(len(i), 10)
        logits[torch.arange(len(i)), label] = 1.0
        wrong = i % 7 != 0
        logits[torch.arange(len(i))[wrong], ((label + 1) % 10)[wrong]] = 2.0
        seen = getattr(self, "seen", [])
        self.seen = seen + i.tolist()
        return logits


def run_exactly_once(out: str, n: int) -> None:
    cfg = config()
    ctx = eval_context(cfg)
    model = RightWhenSeven()
    res = evaluate_sharded(model, IndexImages(n), nn.Identity(), ctx, batch_size=64)
    torch.save({"result": res, "seen": model.seen, "world_size": ctx.world_size},
               f"{out}/rank{ctx.rank}.pt")
    ctx.close()


def run_bn(out: str) -> None:
    """GlobalBatchNorm on this process's share of a fixed batch of 5 (rank 1 of 2 gets none of
    the last batch) against nn.BatchNorm2d on the whole batch."""
    import torch.distributed as dist

    from m2_pretrain.eval.distributed import GlobalBatchNorm

    cfg = config()
    ctx = eval_context(cfg)
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 2, 2) * 3 + 1, torch.randn(5, 3, 2, 2), torch.randn(1, 3, 2, 2)]
    for b in batches:  # a channel whose mean is large against its spread (E[x^2] - E[x]^2 in
        b[:, 2] = 100 + 0.1 * b[:, 2]  # fp32 would be off by about 10 % in its variance)
    gbn = GlobalBatchNorm(3, momentum=None)
    ref = nn.BatchNorm2d(3, momentum=None)
    with torch.no_grad():
        gbn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        ref.weight.copy_(gbn.weight)
    record = {"out": [], "grad_x": [], "ref_out": [], "ref_grad_x": []}
    for b in batches:
        x = b.clone().requires_grad_(True)
        mine = x[ctx.rank:: ctx.world_size]
        y = gbn(mine)
        # each process's loss is its share of one global loss: sum of (y * (index + 1))
        w = torch.arange(1, len(b) + 1, dtype=torch.float32).view(-1, 1, 1, 1)
        (y * w[ctx.rank:: ctx.world_size]).sum().backward()
        record["out"].append(y.detach())
        record["grad_x"].append(x.grad[ctx.rank:: ctx.world_size].clone())
        xr = b.clone().requires_grad_(True)
        yr = ref(xr)
        (yr * w).sum().backward()
        record["ref_out"].append(yr.detach()[ctx.rank:: ctx.world_size])
        record["ref_grad_x"].append(xr.grad[ctx.rank:: ctx.world_size].clone())
    grads = torch.cat([gbn.weight.grad, gbn.bias.grad])
    dist.all_reduce(grads)  # what DDP would sum (it averages; the loss here is a sum)
    record.update(weight_grads=grads, ref_weight_grads=torch.cat([ref.weight.grad, ref.bias.grad]),
                  stats=snapshot(gbn), ref_stats=snapshot(ref))
    torch.save(record, f"{out}/rank{ctx.rank}.pt")
    ctx.close()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, weights, out, *rest = sys.argv[1:]
    if mode == "protocols":
        run_protocols(weights, out, rest)
    elif mode == "bn":
        run_bn(out)
    elif mode == "exactly_once":
        run_exactly_once(out, int(rest[0]))
    else:
        raise SystemExit(f"unknown mode {mode}")
