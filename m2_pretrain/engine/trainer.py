"""The pretraining loop and its state: schedules, AMP, gradient accumulation, DDP, checkpoints,
logging, and the hooks handed to it."""

from __future__ import annotations

import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

from ..checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_MARKER,
    capture_rng_state,
    restore_rng_state,
    save_rotating,
)
from ..config import Config, bn_groups, config_from_dict, save_config
from ..data.feed import TwoViewFeed
from ..layers.fused_bn import fused_bn_status
from ..models.schedules import RunSchedule, Schedule
from ..models.build import build_augmentation, build_model
from ..models.encoder import check_encoder
from .distributed import (
    STOP_SIGNALS,
    StopAgreement,
    check_sync_norms,
    init_distributed,
    resolve_device,
    wrap_ddp,
)
from .health import DivergedStateError, NonFiniteLossError, StateGuard
from .hooks import PeriodicHook
from .optim import build_optimizer
from .run_log import RunLog
from .run_dir import (
    ResumeConfigError,
    check_resume_config,
    claim_output_dir,
    find_resume_checkpoint,
)

logger = logging.getLogger(__name__)

__all__ = ["DivergedStateError", "NonFiniteLossError", "Schedule", "Trainer"]

# Devices on which ``train.channels_last`` lays out the model and the views channels-last (the
# GPU-like test mode adds "cpu").
CHANNELS_LAST_DEVICES = ("cuda",)


@dataclass
class _FitState:
    """What exists only while ``fit()`` runs."""

    log: RunLog
    first_bad: torch.Tensor  # first step whose loss was non-finite, -1 if none (on the device)
    batches: Optional[Iterator] = None


class Trainer:
    """Momentum² Teacher (or any registered method's) pretraining.

    Args:
        cfg: resolved configuration.
        output_dir: where checkpoints, the resolved config and TensorBoard logs go.
        resume: continue from the newest loadable checkpoint in ``output_dir``.
        progress: show a tqdm progress bar (main process only).
        allow_config_changes: on resume, accept config changes outside
            ``run_dir.RESUME_CHANGEABLE_KEYS`` (``--resume-allow-changes``); they are logged.
        hooks: :class:`~m2_pretrain.engine.hooks.PeriodicHook` s, e.g. the kNN monitor
            (``m2_pretrain.eval.knn.knn_monitor``); more with :meth:`register_hooks`.

    Raises:
        ConfigError: a config value no builder accepts (before anything is written).
        RunDirError: ``output_dir`` is a file, is used by another process, or holds another
            run (without ``resume``); with ``resume``, all its checkpoints are unreadable or
            the config changed.
    """

    def __init__(self, cfg: Config, output_dir: str | Path, resume: bool = False,
                 progress: bool = True, allow_config_changes: bool = False,
                 hooks: Sequence[PeriodicHook] = ()) -> None:
        self.cfg = cfg
        self.out = Path(output_dir)
        self.allow_config_changes = allow_config_changes
        self.device = resolve_device(cfg.train.device)
        self.cuda = self.device.type == "cuda"
        self.memory_format = (torch.channels_last if cfg.train.channels_last
                              and self.device.type in CHANNELS_LAST_DEVICES
                              else torch.contiguous_format)
        check_encoder(cfg)  # before anything is written
        self.dist = init_distributed(self.device.type, cfg)
        self._stop_agreement = StopAgreement(self.dist)
        torch.manual_seed(cfg.train.seed + self.dist.rank)
        # everything that can fail on a config name (model, optimizer, data feed, schedules)
        # is built before the output directory is claimed
        self._build_model()
        self._build_data()
        self._build_schedule()
        self._run_lock = claim_output_dir(self.out, resume, self.dist.is_main)
        self.progress = progress and self.dist.is_main
        self.amp_dtype = (torch.bfloat16 if cfg.train.amp and (self.cuda or cfg.train.amp_cpu)
                          else None)
        self.hooks: list[PeriodicHook] = []
        self.register_hooks(hooks)

        self.step = 0  # optimizer steps done
        self.micro = 0  # micro-batches consumed (continuous across epochs)
        self.schedule = self.run_schedule.at(0)
        self.history: list[dict] = []
        self._stop_signal: Optional[int] = None  # a stop signal this process received
        self._stopped_by_signal = False  # all processes agreed to stop after this step
        self._fit: Optional[_FitState] = None
        self._resumed_from: Optional[tuple[Path, int]] = None
        self._last_saved: Optional[tuple[Path, int]] = None
        if resume:
            self._resume()
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")

    # ------------------------------------------------------------------ set-up
    def _build_model(self) -> None:
        cfg = self.cfg
        distributed = self.dist.world_size > 1
        check_sync_norms(cfg, distributed, self.cuda)
        self.model = build_model(cfg, distributed).to(self.device)
        if self.memory_format == torch.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # the divergence rule's reference: the freshly built model
        self.guard = StateGuard(self.model)
        # every trainable parameter: student (+ predictor for M2); teachers have requires_grad
        # off. The learning rate is set by the schedule at every step.
        self.optimizer = build_optimizer(cfg, [self.model], cfg.optim.base_lr)
        self.ddp = wrap_ddp(self.model, self.dist, self.cuda)
        self.step_module: nn.Module = self.ddp or self.model
        if cfg.train.compile:
            self.step_module = torch.compile(self.step_module)

    def _build_data(self) -> None:
        self.feed = TwoViewFeed(self.cfg, build_augmentation(self.cfg), self.device,
                                self.dist.rank, self.dist.world_size, self.memory_format)
        self.batches_per_epoch = self.feed.batches_per_epoch

    def _build_schedule(self) -> None:
        self.steps_per_epoch = max(self.batches_per_epoch // self.cfg.train.accum_steps, 1)
        self.run_schedule = r = RunSchedule.from_config(self.cfg, self.steps_per_epoch,
                                                        self.dist.world_size)
        self.total_steps, self.global_batch, self.base_lr = r.total_steps, r.global_batch, r.base_lr

    def register_hooks(self, hooks: Sequence[Optional[PeriodicHook]]) -> None:
        """Add hooks (``None`` entries are skipped); they run in order after each step."""
        self.hooks.extend(h for h in hooks if h is not None)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        cfg = self.cfg
        state = {CHECKPOINT_MARKER: CHECKPOINT_FORMAT}  # what --resume recognises, whatever the name
        state.update({k: m.state_dict() for k, m in self.model.checkpoint_parts().items()})
        state.update({
            # the model's own buffers (MoCo's queue and pointer)
            "extra": {k: v for k, v in self.model.named_buffers(recurse=False)},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "total_steps": self.total_steps,
            "rng": capture_rng_state(),
            "config": cfg.to_dict(),
            "meta": {"arch": cfg.model.arch, "mean": list(cfg.data.mean),
                     "std": list(cfg.data.std), "method": cfg.model.method,
                     "export_branch": self.model.export_branch, **self.model.metadata(),
                     "bn_group_size": cfg.train.bn_group_size, "bn_groups": bn_groups(cfg),
                     "fused_bn": fused_bn_status()},
        })
        return state

    def _resume(self) -> None:
        found = find_resume_checkpoint(self.out, self._diverged_checkpoint)
        if found is None:
            logger.info("--resume: no checkpoint in %s, starting from scratch", self.out)
            return
        path, ckpt = found
        check_resume_config(ckpt["config"], self.cfg, path, self.allow_config_changes)
        saved = config_from_dict(ckpt["config"])
        if bn_groups(saved) != bn_groups(self.cfg):
            raise ResumeConfigError(f"{path} was trained with {bn_groups(saved)} BN groups per batch, the "
                               f"current config has {bn_groups(self.cfg)}; resume with the same "
                               "train.batch_size / train.bn_group_size or a new --output-dir")
        for key, module in self.model.checkpoint_parts().items():
            module.load_state_dict(ckpt[key])
        with torch.no_grad():
            for k, v in ckpt.get("extra", {}).items():
                getattr(self.model, k).copy_(v)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        self.schedule = self.run_schedule.at(self.step)
        restore_rng_state(ckpt["rng"])
        self._restore_rank_state(ckpt, path)
        self._resumed_from = (path, self.step)
        logger.info("resumed from %s at step %d", path, self.step)

    def _diverged_checkpoint(self, ckpt: dict) -> Optional[str]:
        """Why ``--resume`` must not continue from ``ckpt`` (a part this method restores is
        missing, or the divergence rule), or None."""
        parts = list(self.model.checkpoint_parts())
        missing = [k for k in parts if not isinstance(ckpt.get(k), dict)]
        if missing:
            return (f"it lacks {', '.join(missing)}, which resuming model.method="
                    f"{self.cfg.model.method} restores")
        return self.guard.check_checkpoint(ckpt, parts)

    # Under DDP the processes share parameters but not buffers (per-device BN and Momentum BN
    # statistics) nor random state: a checkpoint keeps every process's, so that a resumed run
    # continues exactly on each of them.
    def _rank_state(self) -> dict:
        parts = self.model.checkpoint_parts()
        return {"buffers": {k: {n: b.detach().cpu() for n, b in m.named_buffers()}
                            for k, m in parts.items()},
                "extra": {n: b.detach().cpu() for n, b in self.model.named_buffers(recurse=False)},
                "rng": capture_rng_state()}

    def _restore_rank_state(self, ckpt: dict, path: Path) -> None:
        ranks = ckpt.get("ranks")
        if self.dist.world_size <= 1 and not ranks:
            return
        if not ranks or len(ranks) != self.dist.world_size:
            logger.warning("%s holds per-process state of %s process(es), this run has %d: "
                           "every process starts from process 0's BN statistics and random "
                           "state", path, len(ranks) if ranks else "no", self.dist.world_size)
            return
        mine = ranks[self.dist.rank]
        parts = self.model.checkpoint_parts()
        with torch.no_grad():
            for key, buffers in mine["buffers"].items():
                own = dict(parts[key].named_buffers())
                for name, value in buffers.items():
                    own[name].copy_(value)
            for name, value in mine.get("extra", {}).items():
                getattr(self.model, name).copy_(value)
        restore_rng_state(mine["rng"])

    def save_checkpoint(self) -> Optional[Path]:
        """Write ``ckpt_<step>.pth`` from process 0 (None elsewhere). Under DDP every process
        must call it: it gathers each one's buffers and random state."""
        ranks = None
        if self.dist.world_size > 1:
            ranks = [None] * self.dist.world_size if self.dist.is_main else None
            torch.distributed.gather_object(self._rank_state(), ranks, dst=0,
                                            group=self._stop_agreement.group)
        if not self.dist.is_main:
            return None
        state = self.state_dict()
        if ranks is not None:
            state["ranks"] = ranks
        path = save_rotating(state, self.out, self.step, self.cfg.checkpoint.keep_last)
        self._last_saved = (path, self.step)
        return path

    # ------------------------------------------------------------------ signals
    # distributed.STOP_SIGNALS: checkpoint after the step all processes agree on, then stop
    # (the CLI exits with distributed.REQUEUE_EXIT).
    def _handle_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    # ------------------------------------------------------------------ loop steps
    # fit() = while not done: run_step() (next batch -> augment -> forward/backward, accum
    # times; then the optimizer and EMA step) and after_step() (the host sync, log,
    # checkpoint, hooks). Only after_step() reads device values on the host, and only when it
    # logs, checkpoints or stops.
    def _set_schedules(self, k: int) -> Schedule:
        """Learning rate and Momentum BN alpha of step ``k`` set in place (no host sync)."""
        s = self.run_schedule.at(k)
        for g in self.optimizer.param_groups:
            g["lr"] = s.lr
        self.model.set_alpha(s.alpha)
        return s

    def next_batch(self):
        """The next micro-batch of view pairs from the loader."""
        return next(self._fit.batches)

    def augment(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Views on the device, augmented and normalised (see ``TwoViewFeed.augment``)."""
        return self.feed.augment(batch, self.micro)

    def forward_backward(self, v1: torch.Tensor, v2: torch.Tensor, sync: bool) -> torch.Tensor:
        """Loss of one micro-batch and its backward (scaled by 1/accum). Under DDP, ``sync``
        False skips the gradient all-reduce (micro-batches before the last of a step)."""
        skip_reduce = self.ddp is not None and not sync
        with self.ddp.no_sync() if skip_reduce else contextlib.nullcontext():
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                loss = self.step_module(v1, v2)["loss"]
            (loss / self.cfg.train.accum_steps).backward()
        return loss.detach()

    def optimizer_step(self, one_minus_m: float) -> None:
        """Gradient clipping, optimizer step, zeroing, then the teacher's EMA step."""
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_teacher(one_minus_m)

    def run_step(self) -> None:
        """One optimizer step: ``accum_steps`` micro-batches, then the optimizer and EMA."""
        k, f = self.step, self._fit
        accum = self.cfg.train.accum_steps
        self.schedule = self._set_schedules(k)
        for i in range(accum):
            v1, v2 = self.augment(self.next_batch())
            loss = self.forward_backward(v1, v2, sync=i == accum - 1)
            self.micro += 1
            bad = ~torch.isfinite(loss)
            f.first_bad = torch.where(bad & (f.first_bad < 0), torch.full_like(f.first_bad, k),
                                      f.first_bad)
            f.log.add(loss, 2 * v1.shape[0] * self.dist.world_size)
        self.optimizer_step(self.schedule.one_minus_m)
        self.step += 1

    def _host_sync_checks(self) -> None:
        """Checks that read device values; run only when logging, checkpointing or stopping."""
        fb = int(self._fit.first_bad)
        if fb >= 0:
            raise NonFiniteLossError(
                f"loss became non-finite at step {fb}; stopping without saving that state. "
                f"{self._where_to_go_back()} Likely causes: a learning rate too high for the "
                "batch (optim.base_lr, optim.warmup_epochs), corrupt input data, or weights "
                "that diverged earlier")
        self._check_finite_state()

    def _check_finite_state(self) -> None:
        """The divergence rule (``health.StateGuard``): one fused norm, one host sync."""
        what = self.guard.check()
        if what is not None:
            raise DivergedStateError(
                f"by step {self.step}, {what}; stopping without saving that state. "
                f"{self._where_to_go_back()} Lower optim.base_lr or lengthen optim.warmup_epochs")

    def _where_to_go_back(self) -> str:
        """Which checkpoint holds the last state that passed the checks (for stop messages)."""
        if self._last_saved is not None:
            path, step = self._last_saved
            return (f"The newest checkpoint, {path} (step {step}), passed these checks when "
                    "this run saved it.")
        if self._resumed_from is not None:
            path, step = self._resumed_from
            return (f"No checkpoint holds the broken state: this run resumed from {path} (step "
                    f"{step}), whose state passed the checks, and wrote none since.")
        return "No checkpoint was written."

    def log(self) -> None:
        """One history row (mean loss over the window, images/s, data-wait share)."""
        s = self.schedule
        self.history.append(self._fit.log.row(self.step, self.step / self.steps_per_epoch, s.lr,
                                              self.model.log_scalars(s.one_minus_m, s.alpha)))

    def _run_hooks(self) -> None:
        for hook in self.hooks:
            if (hook.main_only and not self.dist.is_main) or not hook.due(self.step,
                                                                            self.total_steps):
                continue
            numbers = hook.fn(self) or {}
            if numbers and (not self.history or self.history[-1]["step"] != self.step):
                self.history.append({"step": self.step,
                                     "epoch": self.step / self.steps_per_epoch})
            if numbers:  # into this step's history row
                self.history[-1].update({f"{hook.name}_{k}": v for k, v in numbers.items()})
            self._fit.log.scalars(hook.name, numbers, self.step)

    def after_step(self) -> None:
        """Host sync and checks, log row, progress, hooks, checkpoint, as due."""
        done = self.step >= self.total_steps
        log_now = self.step % self.cfg.train.log_every == 0 or done
        ckpt_now = self.step % self.cfg.checkpoint.every_steps == 0 or done
        # one small collective per step: every process stops after the same step
        stop_now = self._stop_agreement.agree(self._stop_signal is not None)
        self._stopped_by_signal = stop_now
        if log_now or ckpt_now or stop_now:
            self._host_sync_checks()
        if log_now:
            self.log()
        self._fit.log.tick()
        self._run_hooks()
        if ckpt_now or stop_now:
            self.save_checkpoint()

    @contextlib.contextmanager
    def _fit_session(self):
        """Signal handlers, TensorBoard writer, progress bar and the data iterator for fit()."""
        old_handlers = {}
        for sig in STOP_SIGNALS:
            try:
                old_handlers[sig] = signal.signal(sig, self._handle_signal)
            except ValueError:  # not in the main thread
                pass
        self.micro = self.step * self.cfg.train.accum_steps
        main = self.dist.is_main
        log = RunLog(self.device, self.out / "tb" if main else None,
                     (self.total_steps, self.step) if self.progress else None)
        self._fit = f = _FitState(log, torch.tensor(-1, device=self.device))
        f.batches = self.feed.micro_batches(self.micro, log.waited)
        try:
            yield
        finally:
            f.batches.close()  # shuts the loader's workers down
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            log.close()
            self._fit = None

    def fit(self) -> dict:
        """Train until ``total_steps``, or until a stop signal (``STOP_SIGNALS``) reaches any
        process: then all stop after the same step, once its checkpoint is written.

        Returns:
            ``{"status", "step", "total_steps", "history"}``.

        A fresh run that fails before its first checkpoint removes its ``config.yaml``, so the
        corrected command can use the same ``--output-dir`` without ``--resume``.

        Raises:
            NonFiniteLossError: when the loss becomes NaN/inf (no checkpoint is written after it).
        """
        status = "completed"
        try:
            with self._fit_session():
                self.model.train()
                while self.step < self.total_steps and not self._stopped_by_signal:
                    self.run_step()
                    self.after_step()
                if self._stopped_by_signal and self.step < self.total_steps:
                    status = (f"interrupted by signal {self._stop_signal}"
                              if self._stop_signal is not None
                              else "interrupted by a signal to another process")
                    logger.warning("%s: stopped after step %d, checkpoint saved in %s", status,
                                   self.step, self.out)
        except BaseException:
            self._forget_unsaved_fresh_run()
            raise
        return {"status": status, "step": self.step, "total_steps": self.total_steps,
                "history": self.history}

    def _forget_unsaved_fresh_run(self) -> None:
        """Remove ``config.yaml`` of a fresh run that failed before writing any checkpoint:
        nothing resumable exists, and the file would block the corrected command."""
        cfg_file = self.out / "config.yaml"
        if (self.dist.is_main and self._resumed_from is None and self._last_saved is None
                and cfg_file.is_file()):
            cfg_file.unlink()
            logger.info("removed %s: the run failed before its first checkpoint", cfg_file)
