"""MoCo v2 with a selectable key-encoder normalisation (paper Table 3).

Query encoder + 2-layer MLP head, momentum key encoder, a queue of negatives, InfoNCE.
The key encoder's BN is one of:

* ``shuffle_bn`` — MoCo's shuffling BN. Under DDP the batch is shuffled across processes as
  MoCo does; on one process it is permuted and split into ``shuffle_splits`` sub-batches, each
  normalised with its own statistics, and the permutation is undone.
* ``momentum`` — Momentum BN with a fixed current-batch weight (α = 0.064 by default).
* ``bn`` — plain train-mode BN over the whole key batch.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..layers import KEY_NORMS, apply_norm
from ..config import choose, encoder_kwargs as _encoder_kwargs
from ..data.augment import TwoViewTransform
from .base import Branch, EmaPairs, Method
from .encoder import create_encoder


class MoCoHead(nn.Sequential):
    """MoCo v2's projection head: Linear -> ReLU -> Linear."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def _dist_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 (no gradient); identity on one process."""
    rank, world = _dist_world()
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class MoCoV2(Method):
    """MoCo v2.

    Args:
        arch: timm architecture.
        dim: output dimension of the head (128).
        hidden: hidden width of the head (2048).
        queue_size: number of negatives kept (65536).
        temperature: InfoNCE temperature (0.2).
        key_norm: ``shuffle_bn``, ``momentum`` or ``bn``.
        key_alpha: fixed Momentum BN current-batch weight for ``momentum``.
        shuffle_splits: sub-batches for single-process shuffle BN.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        dim: int = 128,
        hidden: int = 2048,
        queue_size: int = 65536,
        temperature: float = 0.2,
        key_norm: str = "shuffle_bn",
        key_alpha: float = 0.064,
        shuffle_splits: int = 2,
        encoder_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if key_norm not in KEY_NORMS:
            raise ValueError(f"key_norm must be one of {KEY_NORMS}, got {key_norm!r}")
        if shuffle_splits < 1:
            raise ValueError(f"shuffle_splits must be >= 1, got {shuffle_splits}")
        self.arch, self.key_norm, self.temperature = arch, key_norm, temperature
        self.shuffle_splits = shuffle_splits
        encoder = create_encoder(arch, **(encoder_kwargs or {}))
        self.student = Branch(encoder, MoCoHead(encoder.num_features, hidden, dim))  # query
        self.teacher = copy.deepcopy(self.student)  # key
        if key_norm == "momentum":  # shuffle_bn and bn keep plain BN layers
            apply_norm(self.teacher, "momentum", num_views=1, alpha=key_alpha)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._ema = EmaPairs(self.student, self.teacher)

    export_branch = "student"  # the query encoder, as MoCo's own transfer uses

    @classmethod
    def from_config(cls, cfg, distributed: bool = False) -> "MoCoV2":  # noqa: ARG003
        m = cfg.model.moco
        choose("model.moco.key_norm", m.key_norm, dict.fromkeys(KEY_NORMS))
        return cls(cfg.model.arch, m.dim, m.hidden, m.queue, m.temperature, m.key_norm, m.key_alpha,
                   m.shuffle_splits, encoder_kwargs=_encoder_kwargs(cfg))

    @staticmethod
    def augmentation(data_cfg) -> TwoViewTransform:
        """MoCo v2's symmetric pipeline: jitter (0.4, 0.4, 0.4, 0.1), blur p 0.5 on both views,
        no solarisation."""
        d = data_cfg
        return TwoViewTransform(d.res, d.crop_scale_min, jitter=(0.4, 0.4, 0.4, 0.1),
                                blur_sigma=tuple(d.blur_sigma), student_blur_p=0.5,
                                teacher_blur_p=0.5, teacher_solarize_p=0.0)

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def update_teacher(self, one_minus_m: float) -> None:
        """Key encoder ``k <- m k + (1 - m) q``, paired by parameter name."""
        self._ema.update(self.student, self.teacher, one_minus_m)

    def checkpoint_parts(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher}

    def metadata(self) -> dict:
        return {"key_norm": self.key_norm}

    def log_scalars(self, one_minus_m: float, alpha: float) -> dict[str, float]:
        """The key encoder's EMA ``m`` (its Momentum BN keeps a fixed alpha)."""
        return {"m": 1 - one_minus_m}

    # ------------------------------------------------------------------ queue
    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest entries with ``keys`` gathered from all processes (ring buffer)."""
        keys = concat_all_gather(keys.float())
        n, size = keys.shape[0], self.queue.shape[0]
        if n > size:
            raise ValueError(f"{n} keys per step exceed the queue size {size}")
        # the pointer stays on the device: index arithmetic, no read to the host
        idx = torch.arange(n, device=keys.device).add_(self.queue_ptr).remainder_(size)
        self.queue.index_copy_(0, idx, keys)
        self.queue_ptr.add_(n).remainder_(size)

    # ------------------------------------------------------------------ keys
    @torch.no_grad()
    def _keys_shuffle_single(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        perm = torch.randperm(n, device=x.device)
        chunks = torch.tensor_split(x[perm], min(self.shuffle_splits, n))
        k = torch.cat([self.teacher(c) for c in chunks])
        return k[torch.argsort(perm)]

    @torch.no_grad()
    def _keys_shuffle_ddp(self, x: torch.Tensor) -> torch.Tensor:
        rank, world = _dist_world()
        local = x.shape[0]
        x_all = concat_all_gather(x)
        perm = torch.randperm(x_all.shape[0], device=x.device)
        dist.broadcast(perm, src=0)
        mine = perm.view(world, -1)[rank]
        k = self.teacher(x_all[mine])
        k_all = concat_all_gather(k)
        unshuffled = torch.empty_like(k_all)
        unshuffled[perm] = k_all
        return unshuffled[rank * local : (rank + 1) * local]

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        if self.key_norm == "shuffle_bn":
            _, world = _dist_world()
            k = self._keys_shuffle_ddp(x) if world > 1 else self._keys_shuffle_single(x)
        else:
            k = self.teacher(x)
        return F.normalize(k.float(), dim=1)

    # ------------------------------------------------------------------ forward
    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> dict[str, torch.Tensor]:
        """InfoNCE of queries ``v1`` against keys ``v2`` (positives) and the queue (negatives);
        the keys are enqueued afterwards.

        Returns:
            ``{"loss": scalar, "accuracy": top-1 of the positive among 1 + K logits}``.
        """
        q = F.normalize(self.student(v1).float(), dim=1)
        k = self.keys(v2)
        l_pos = (q * k).sum(1, keepdim=True)
        l_neg = q @ self.queue.clone().detach().T
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            acc = (logits.argmax(1) == 0).float().mean()
        self.enqueue(k)
        return {"loss": loss, "accuracy": acc}
