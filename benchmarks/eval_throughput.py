"""Feature-extraction throughput of the evaluation protocols: images per second through a
frozen timm encoder in eval mode, as ``m2-pretrain knn`` and the linear probe's forward run it
(``m2_pretrain.eval.distributed.sharded_features``: uint8 batch -> device -> normalise ->
encoder under the context's autocast -> fp32 features), fp32 and bf16, and the memory the
features of a split take.

Images are generated uint8 tensors already at the crop size: the rate is the encoder's, not
JPEG decoding's (on ImageNet, decoding and resizing in DataLoader workers must keep up with it).

    python benchmarks/eval_throughput.py                      # CPU: resnet18 and resnet50, 224 px
    python benchmarks/eval_throughput.py --device cuda --batch 256 --seconds 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2_pretrain.data.augment import Normalizer  # noqa: E402
from m2_pretrain.engine.distributed import DistInfo  # noqa: E402
from m2_pretrain.eval.distributed import EvalContext, sharded_features  # noqa: E402

# the splits the docs estimate the cost of: (images, what)
SPLITS = {"imagenet_train": 1_281_167, "imagenet_val": 50_000, "stl10_train": 5_000,
          "stl10_test": 8_000}


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int, res: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (min(n, 64), 3, res, res), dtype=torch.uint8, generator=g)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return self.x[i % len(self.x)], 0


def measure(arch: str, res: int, precision: str, device: torch.device, batch: int,
            seconds: float, channels_last: bool) -> dict:
    import timm

    torch.manual_seed(0)
    enc = timm.create_model(arch, num_classes=0).to(device).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    enc = enc.to(memory_format=fmt)
    ctx = EvalContext(device, DistInfo(), torch.bfloat16 if precision == "bf16" else None, fmt)
    norm = Normalizer([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).to(device)

    def run(n_batches: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        f, _, _ = sharded_features(enc, Images(n_batches * batch, res), norm, ctx, batch)
        assert f.shape == (n_batches * batch, enc.num_features) and f.dtype == torch.float32
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run(1)  # warm-up (allocator, kernels, oneDNN primitives)
    n, took = 1, run(1)
    while took < seconds / 4:  # grow until one timed run takes a quarter of the budget
        n *= 2
        took = run(n)
    rate = n * batch / took
    return {"arch": arch, "res": res, "precision": precision, "batch": batch,
            "images": n * batch, "seconds": round(took, 3), "images_per_s": round(rate, 2),
            "feature_dim": enc.num_features, "channels_last": channels_last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--archs", default="resnet18,resnet50")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=8.0, help="about this long per row")
    ap.add_argument("--channels-last", action="store_true", help="default on CUDA")
    ap.add_argument("--out", help="JSON file (default benchmarks/results/eval_throughput_"
                                  "<device>.json)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cl = args.channels_last or device.type == "cuda"
    name = f"{device.type}{'' if device.index is None else device.index}"
    meta = {"date": dt.date.today().isoformat(), "device": (torch.cuda.get_device_name(device)
                                                            if device.type == "cuda"
                                                            else platform.processor() or "cpu"),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "command": " ".join(sys.argv), "rows": []}
    out = Path(args.out or Path(__file__).parent / "results" / f"eval_throughput_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = meta["rows"]
    for arch in args.archs.split(","):
        for prec in args.precisions.split(","):
            row = measure(arch, args.res, prec, device, args.batch, args.seconds, cl)
            row["hours"] = {k: round(n / row["images_per_s"] / 3600, 3) for k, n in SPLITS.items()}
            row["feature_gib"] = {k: round(n * row["feature_dim"] * 4 / 2**30, 3)
                                  for k, n in SPLITS.items()}
            rows.append(row)
            print(f"{arch:10s} {args.res}px {prec:5s} batch {args.batch}: "
                  f"{row['images_per_s']:9.1f} images/s  (ImageNet train features: "
                  f"{row['hours']['imagenet_train']:.2f} h on this device, "
                  f"{row['feature_gib']['imagenet_train']:.1f} GiB fp32)", flush=True)
            out.write_text(json.dumps(meta, indent=2))  # after every row: a cap keeps them
    print(f"-> {out}")


if __name__ == "__main__":
    main()
