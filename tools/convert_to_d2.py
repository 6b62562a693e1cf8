#!/usr/bin/env python
"""Convert a pretrained ResNet (training checkpoint, exported encoder, or torchvision/timm
state_dict) to Detectron2 weights.

    python tools/convert_to_d2.py INPUT OUTPUT.pkl [--which teacher|student] [--verify] [--force]

INPUT: a training checkpoint (ckpt_*.pth), an exported encoder (.safetensors, or .pth with or
without its .json sidecar) or a torchvision/timm ResNet state_dict. OUTPUT must end in .pkl;
an existing OUTPUT is replaced only with --force.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2_detectron2.convert import ConversionError, convert_file, verify  # noqa: E402
from m2_detectron2.safe_load import UnsafePickleError  # noqa: E402
from m2_pretrain.checkpoint import CheckpointError  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--which", choices=("teacher", "student"),
                    help="branch of a training checkpoint (default: teacher for M2, query for MoCo)")
    ap.add_argument("--verify", action="store_true",
                    help="check Detectron2's ResNet features against timm's on a random image")
    ap.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    args = ap.parse_args()
    try:
        info = convert_file(args.input, args.output, args.which, overwrite=args.force)
        counters = [k for k in info["dropped"] if k.endswith("num_batches_tracked")]
        others = [k for k in info["dropped"] if k not in counters]
        note = ", ".join(others + ([f"{len(counters)} BN counters"] if counters else []))
        print(f"wrote {info['out']}: ResNet-{info['depth']}, {info['keys']} tensors"
              + (f" (dropped {note})" if note else ""))
        if args.verify:
            diff = verify(args.input, args.output, args.which)
            print(f"verify: res2..res5 max abs diff {diff:.3e}")
            if diff > 1e-3:
                print("error: features differ: the conversion is wrong", file=sys.stderr)
                return 1
    except (ConversionError, CheckpointError, UnsafePickleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output folder is not writable, the disk is full, ...
        print(f"error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
