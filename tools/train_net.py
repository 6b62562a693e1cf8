#!/usr/bin/env python
"""Fine-tune / evaluate a Detectron2 model with the Momentum² Teacher plugin.

    python tools/train_net.py --config-file configs/detectron2/mask_rcnn_R50_FPN_1x.yaml \
        --num-gpus 8 MODEL.WEIGHTS m2_r50.pkl
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS out/model_final.pth
    python tools/train_net.py --config-file ... --register-coco mine=ann.json:images \
        DATASETS.TRAIN '("mine",)'
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import m2_detectron2  # noqa: E402,F401  (installs the detectron2._C stand-in when needed)
from detectron2.engine import default_argument_parser, launch  # noqa: E402

from m2_detectron2.safe_load import UnsafePickleError  # noqa: E402
from m2_detectron2.stop import RunInterrupted, install_signal_handlers  # noqa: E402
from m2_detectron2.train import SetupError, main, validate_setup  # noqa: E402
from m2_pretrain.engine.distributed import REQUEUE_EXIT  # noqa: E402


def parse_args(argv=None):
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument("--register-coco", action="append", default=[], metavar="NAME=JSON:IMAGES",
                        help="register a COCO-format dataset (repeatable)")
    return parser.parse_args(argv)


def run(args):
    """``main`` in each launched process; a run stopped by a signal (after its checkpoint)
    exits with ``REQUEUE_EXIT``: run the same command with ``--resume`` to continue."""
    try:
        return main(args)
    except RunInterrupted as e:
        logging.getLogger("m2_detectron2").warning("%s: checkpoint saved, exit status %d",
                                                   e, REQUEUE_EXIT)
        sys.exit(REQUEUE_EXIT)


if __name__ == "__main__":
    args = parse_args()
    try:
        validate_setup(args)  # once here: errors inside launched workers escape as tracebacks
        # a stop signal to this process is noted, not fatal: under SLURM it reaches every
        # process of the task, and the launcher must outlive its workers' checkpoint
        install_signal_handlers()
        launch(run, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except (SetupError, UnsafePickleError) as e:
        sys.exit(f"error: {e}")
    except Exception as e:  # a launched worker's exit status (torch's ProcessExitedException)
        if getattr(e, "exit_code", None) == REQUEUE_EXIT:
            sys.exit(REQUEUE_EXIT)
        raise
