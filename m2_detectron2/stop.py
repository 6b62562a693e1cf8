"""Stop a Detectron2 training run on a signal, with a checkpoint all its processes agree on.

SIGUSR1 (SLURM's warning before the time limit), SIGTERM (preemption) or SIGINT reaching any
process makes every process finish the same iteration; process 0 writes
``model_<iteration>.pth`` with Detectron2's checkpointer (which ``--resume`` continues from),
and :func:`m2_detectron2.train.main` raises :class:`RunInterrupted`; ``tools/train_net.py``
turns it into the exit status ``REQUEUE_EXIT`` that ``scripts/slurm/detectron2.sbatch``
requeues on.
"""

from __future__ import annotations

import logging
import signal

from detectron2.engine import HookBase
from detectron2.utils import comm

from m2_pretrain.engine.distributed import STOP_SIGNALS, DistInfo, StopAgreement

logger = logging.getLogger("m2_detectron2")

_received: list[int] = []  # stop signals this process received (note_signal)


def note_signal(signum, frame) -> None:  # noqa: ARG001
    """Signal handler: remember a stop signal; the hook acts on it after the iteration."""
    _received.append(signum)


def install_signal_handlers() -> dict:
    """Make :data:`STOP_SIGNALS` call :func:`note_signal`; returns the previous handlers."""
    old = {}
    for sig in STOP_SIGNALS:
        try:
            old[sig] = signal.signal(sig, note_signal)
        except ValueError:  # not in the main thread
            pass
    return old


class RunInterrupted(BaseException):
    """Training stopped on a signal after its checkpoint. A ``BaseException``, so that
    Detectron2's training loop (which logs every ``Exception`` as a failure) lets it through
    after running its ``after_train`` hooks."""

    def __init__(self, iteration: int, signum: int | None) -> None:
        self.iteration, self.signum = iteration, signum
        super().__init__(f"stopped after iteration {iteration} on signal "
                         f"{signum if signum is not None else 'of another process'}")


class StopOnSignal(HookBase):
    """After each iteration, stop when a stop signal reached any process (one all-reduce of a
    flag per iteration): save ``model_<iteration>`` and raise :class:`RunInterrupted`."""

    def __init__(self, checkpointer) -> None:
        self.checkpointer = checkpointer
        self._old: dict = {}

    def before_train(self) -> None:
        self._old = install_signal_handlers()
        self._agreement = StopAgreement(DistInfo(comm.get_rank(), comm.get_world_size()))

    def after_step(self) -> None:
        if not self._agreement.agree(bool(_received)):
            return
        it = self.trainer.iter
        if it + 1 >= self.trainer.max_iter:
            return  # the last iteration: the run completes as usual
        self.checkpointer.save(f"model_{it:07d}", iteration=it)
        comm.synchronize()  # no process leaves before process 0 has written the checkpoint
        raise RunInterrupted(it, _received[0] if _received else None)

    def after_train(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
