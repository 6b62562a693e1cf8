"""Evaluation on several processes (gloo, CPU): the same numbers as one process, every
validation image counted exactly once, bad input refused before any feature is computed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from m2_pretrain.config import load_config
from m2_pretrain.engine.distributed import DistInfo
from m2_pretrain.eval import protocols
from m2_pretrain.eval.common import EvalInputError
from m2_pretrain.eval.distributed import (
    EvalContext,
    GlobalBatchNorm,
    SeededViews,
    aligned_batches,
    convert_global_bn,
    global_batch,
    shard_indices,
)

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "eval_dist_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PORTS = iter(range(29651, 29700))


def run_worker(out: Path, args: list[str], nproc: int = 1, env: dict = {}) -> list[dict]:
    """The worker on ``nproc`` processes (torchrun for more than one); what each saved."""
    out.mkdir(parents=True, exist_ok=True)
    launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={next(PORTS)}"] if nproc > 1 else [sys.executable])
    r = subprocess.run([*launch, str(WORKER), *args[:1], *args[1:2], str(out), *args[2:]],
                       capture_output=True, text=True, cwd=REPO, env={**ENV, **env}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(out / f"rank{k}.pt", weights_only=False) for k in range(nproc)]


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A resnet10t briefly trained with labels on the embedded data (so that accuracies are
    far from chance and a wrong sharding would show)."""
    import torch.nn.functional as F

    from m2_pretrain.data.augment import Normalizer
    from m2_pretrain.data.datasets import build_dataset

    sys.path.insert(0, str(REPO / "tests"))
    from eval_dist_worker import config

    cfg = config()
    torch.manual_seed(0)
    ds = build_dataset(cfg.data, "train", protocols.train_transform(32))
    norm = Normalizer(cfg.data.mean, cfg.data.std)
    model = timm.create_model("resnet10t", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(20):
        for x, y in torch.utils.data.DataLoader(ds, batch_size=30, shuffle=True, drop_last=True):
            loss = F.cross_entropy(model(norm(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.reset_classifier(0)
    path = tmp_path_factory.mktemp("enc") / "enc.pth"
    torch.save(model.state_dict(), path)
    Path(str(path) + ".json").write_text(json.dumps({"arch": "resnet10t"}))
    return path


def test_shards_partition_the_dataset():
    for n in (0, 1, 7, 1001):
        for world in (1, 2, 3, 8):
            shards = [shard_indices(n, r, world) for r in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_gather_ordered_refuses_repeats_and_gaps():
    ctx = EvalContext.single()
    rows = torch.arange(6.0).view(3, 2)
    out = ctx.gather_ordered(rows, torch.tensor([2, 0, 1]), 3)
    assert out.tolist() == [[2.0, 3.0], [4.0, 5.0], [0.0, 1.0]]
    with pytest.raises(RuntimeError, match="1 missing, 1 repeated"):
        ctx.gather_ordered(rows, torch.tensor([0, 0, 1]), 3)


def test_two_processes_give_the_numbers_of_one(encoder_file, tmp_path):
    """linear (augmented and on precomputed features), kNN and semi on 2 gloo processes
    against 1 process. The global batch, the image order, each image's crop and the BN
    statistics are the same; what differs is float summation order (DDP's gradient mean of
    two half-batches, per-process sums in GlobalBatchNorm): about 1e-6 on the linear heads and
    1e-5 on the fine-tuned encoder here, and the accuracies agree exactly."""
    one = run_worker(tmp_path / "one", ["protocols", str(encoder_file)])[0]
    two = run_worker(tmp_path / "two", ["protocols", str(encoder_file)], nproc=2)
    for name in ("linear_aug", "linear_pre", "knn", "semi"):
        assert one[name]["top1"] > 20, (name, one[name])  # 10 classes: twice chance or more
        for rank in two:
            assert rank[name]["world_size"] == 2
            assert (rank[name]["top1"], rank[name]["top5"]) == (one[name]["top1"],
                                                               one[name]["top5"]), name
    assert one["semi"]["global_bn"] is False and two[0]["semi"]["global_bn"] is True
    assert two[0]["linear_aug"]["evaluated"] == one["linear_aug"]["val_images"]
    for key in ("linear_aug_head", "linear_pre_head"):
        for k, v in one[key].items():
            torch.testing.assert_close(two[0][key][k], v, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(two[1][key][k], two[0][key][k], rtol=0, atol=0)
    # eval.semi_global_bn=false: each process normalises by its own half-batch, so the
    # weights differ from one process's; the processes still agree with each other (DDP)
    # and hold the same, averaged, recounted statistics
    assert two[0]["semi_local_bn"]["global_bn"] is False
    for k, v in two[0]["semi_local_bn_encoder"].items():
        torch.testing.assert_close(two[1]["semi_local_bn_encoder"][k], v, rtol=0, atol=0)
    gap = max((two[0]["semi_local_bn_encoder"][k].float() - v.float()).abs().max().item()
              for k, v in one["semi_encoder"].items() if "running" not in k)
    assert gap > 1e-3, gap
    for k, v in one["semi_encoder"].items():  # weights and recounted statistics; 16 steps
        # of the whole network at lr 0.1 grow the rounding differences to about 1e-5 (at lr
        # 0.3, to 1e-2 after 16 steps: the growth is that of the training, not the sharding)
        torch.testing.assert_close(two[0]["semi_encoder"][k], v, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(two[1]["semi_encoder"][k], two[0]["semi_encoder"][k],
                                   rtol=0, atol=0)


def test_two_processes_as_gpus_run_the_default_config(encoder_file, tmp_path):
    """The CUDA default on the CPU: bf16 autocast (`train.amp_cpu`) and channels-last (the
    trainer's CHANNELS_LAST_DEVICES with the CPU added), on 2 processes: every protocol runs
    through GlobalBatchNorm and DDP in that mode, records it, fine-tunes channels-last weights,
    and lands within 5 points of top-1 of one fp32 process (bf16 rounding; 60 test images)."""
    fp32 = run_worker(tmp_path / "fp32", ["protocols", str(encoder_file)])[0]
    ranks = run_worker(tmp_path / "bf16", ["protocols", str(encoder_file), "train.amp_cpu=true"],
                       nproc=2, env={"GPU_LIKE": "1"})
    for name in ("linear_aug", "linear_pre", "knn", "semi"):
        got = ranks[0][name]
        assert (got["precision"], got["channels_last"], got["world_size"]) == ("bf16", True, 2)
        assert abs(got["top1"] - fp32[name]["top1"]) <= 5.0, (name, got, fp32[name])
        assert ranks[1][name]["top1"] == got["top1"]
    assert ranks[0]["semi_channels_last"] and not fp32["semi_channels_last"]


@pytest.mark.parametrize("nproc", [2, 3])
def test_every_validation_image_counts_exactly_once(tmp_path, nproc):
    """1,001 images on 2 and 3 processes (a DistributedSampler would pad to 1,002 with a
    repeat): the model is right exactly on multiples of 7, 143 of 1,001."""
    ranks = run_worker(tmp_path, ["exactly_once", "-", "1001"], nproc=nproc)
    seen = sorted(i for r in ranks for i in r["seen"])
    assert seen == list(range(1001))
    for r in ranks:
        assert r["result"]["evaluated"] == 1001
        assert r["result"]["top1"] == pytest.approx(100.0 * 143 / 1001, abs=1e-9)
        assert r["result"]["top5"] == 100.0


def test_global_batch_norm_matches_batch_norm_on_the_whole_batch(tmp_path):
    """Outputs, input gradients, summed weight gradients and running statistics (momentum
    None) of 2 processes' shares against nn.BatchNorm2d on the whole batch; the last batch has
    one image, so process 1 holds none of it. One channel has mean 100 and spread 0.1, where
    the one-pass variance E[x^2] - E[x]^2 in fp32 is 28 % off on these numbers; the tolerances
    are the rounding of values near 100 (1e-5) divided by that spread."""
    for r, rec in enumerate(run_worker(tmp_path, ["bn", "-"], nproc=2)):
        for got, want in zip(rec["out"], rec["ref_out"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for got, want in zip(rec["grad_x"], rec["ref_grad_x"]):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        assert rec["out"][2].shape[0] == (1 if r == 0 else 0)
        torch.testing.assert_close(rec["weight_grads"], rec["ref_weight_grads"], rtol=1e-3,
                                   atol=1e-3)
        for k, v in rec["ref_stats"].items():
            torch.testing.assert_close(rec["stats"][k], v, rtol=1e-5, atol=1e-6)
        assert int(rec["stats"]["num_batches_tracked"]) == 3


def test_convert_global_bn_keeps_state_and_leaves_subclasses():
    m = timm.create_model("resnet10t", num_classes=0)
    m.bn1.running_mean.fill_(0.25)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out, n, skipped = convert_global_bn(m)
    assert n == sum(1 for x in out.modules() if isinstance(x, GlobalBatchNorm)) > 10
    assert skipped == []
    for k, v in out.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = torch.randn(4, 3, 32, 32)
    ref = timm.create_model("resnet10t", num_classes=0)
    ref.load_state_dict(before)
    out.train(), ref.train()
    torch.testing.assert_close(out(x), ref(x))  # one process: torch's batch norm
    act = timm.layers.BatchNormAct2d(8)
    _, n2, skipped2 = convert_global_bn(torch.nn.Sequential(act))
    assert (n2, skipped2) == (0, ["0"])


def test_seeded_views_depend_on_image_and_epoch_only():
    from m2_pretrain.data.datasets import build_dataset

    cfg = load_config(None, ["data.dataset=embedded", "data.res=32", "data.num_images=40"])
    ds = SeededViews(build_dataset(cfg.data, "train", protocols.train_transform(16)), seed=5)
    a = ds[3][0]
    torch.rand(100)  # the global RNG does not matter, nor is it consumed
    state = torch.get_rng_state()
    assert torch.equal(ds[3][0], a)
    assert torch.equal(torch.get_rng_state(), state)
    ds.set_epoch(1)
    assert not torch.equal(ds[3][0], a)
    assert not torch.equal(SeededViews(ds.dataset, seed=6)[3][0], a)


def test_aligned_batches_give_every_process_a_share_of_every_global_batch():
    data = torch.utils.data.TensorDataset(torch.arange(20.0).view(20, 1), torch.arange(20))
    idx = list(range(20))[::-1][:11]  # 19..9: batches of 3, the short last one joins the third
    expected = [idx[0:3], idx[3:6], idx[6:11]]
    for world in (1, 2, 3):
        parts = [list(aligned_batches(data, idx, 3, _ctx(world, r))) for r in range(world)]
        assert all(len(p) == 3 for p in parts)
        for s, want in enumerate(expected):  # the union of the shares is global batch s
            assert sorted(int(v) for p in parts for v in p[s][1]) == sorted(want)
    with pytest.raises(EvalInputError, match="leave a process of 4 without images"):
        list(aligned_batches(data, idx[:3], 3, _ctx(4, 3)))


def _ctx(world: int, rank: int = 0) -> EvalContext:
    return EvalContext(torch.device("cpu"), DistInfo(rank=rank, world_size=world))


def test_bad_input_is_refused_before_any_feature(monkeypatch):
    """More processes than validation images; a global batch that the processes cannot
    share. One line each, before the encoder sees an image."""
    calls = []
    monkeypatch.setattr(protocols, "sharded_features", lambda *a, **k: calls.append(1))
    cfg = load_config(None, ["data.dataset=embedded", "data.res=32", "data.num_images=40",
                             "data.knn_train_split=train", "data.knn_test_split=test",
                             "train.device=cpu", "eval.linear_augment=false"])
    enc = timm.create_model("resnet10t", num_classes=0)
    with pytest.raises(EvalInputError, match=r"evaluated split 'test' has 10 images, fewer "
                                             r"than the 16 processes"):
        protocols.linear_probe(enc, cfg, torch.device("cpu"), False, _ctx(16))
    with pytest.raises(EvalInputError, match=r"'eval.batch_size' \(256\) is the global batch "
                                             r"and must be a multiple of the 3 processes"):
        protocols.linear_probe(enc, cfg, torch.device("cpu"), False, _ctx(3))
    with pytest.raises(EvalInputError, match="evaluated split 'test' has 10 images"):
        protocols.knn_eval(enc, cfg, torch.device("cpu"), False, _ctx(16))
    with pytest.raises(EvalInputError, match="evaluated split 'test' has 10 images"):
        protocols.semi_finetune(enc, cfg, [0, 1], torch.device("cpu"), False, _ctx(16))
    assert calls == []
    assert global_batch(256, 1000, _ctx(8), "eval.batch_size", "x") == (32, 256)
    assert global_batch(256, 101, _ctx(2), "eval.batch_size", "x") == (50, 100)
    with pytest.raises(EvalInputError, match="x has 1 images, fewer than the 2 processes"):
        global_batch(256, 1, _ctx(2), "eval.batch_size", "x")


def test_cli_under_torchrun_writes_one_result_with_the_world_size(encoder_file, tmp_path):
    """`torchrun --nproc_per_node=2 -m m2_pretrain.cli knn`: rank 0 alone prints and writes
    results.json (world_size 2), with the numbers of the one-process command."""
    common = ["knn", "--weights", str(encoder_file), "--no-progress", "data.dataset=embedded",
              "data.res=32", "data.num_images=240", "data.workers=0",
              "data.knn_train_split=train", "data.knn_test_split=test", "train.device=cpu",
              "knn.k=10"]
    one = subprocess.run([sys.executable, "-m", "m2_pretrain.cli", *common, "--output-dir",
                          str(tmp_path / "one")], capture_output=True, text=True, env=ENV,
                         cwd=REPO, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={next(PORTS)}", "-m", "m2_pretrain.cli", *common,
                          "--output-dir", str(tmp_path / "two")], capture_output=True,
                         text=True, env=ENV, cwd=REPO, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("knn: top-1") == 1 and "(2 processes, fp32)" in two.stdout
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert (b["results"]["top1"], b["results"]["top5"]) == (a["results"]["top1"],
                                                            a["results"]["top5"])
    assert b["results"]["train_images"] == a["results"]["train_images"] == 240


def _knn_scores_one_hot(train, labels, test, num_classes, k, temperature):
    """The weighted kNN scores written plainly: one-hot labels of the k nearest training
    features times exp(sim / T), summed."""
    import torch.nn.functional as F

    top_sim, top_idx = (test @ train.T).topk(min(k, len(train)), dim=1)
    onehot = F.one_hot(labels[top_idx], num_classes).float()
    return (onehot * (top_sim / temperature).exp().unsqueeze(-1)).sum(1)


def test_sharded_knn_scores_match_the_one_hot_reference():
    """One process: the scatter-add class scores, chunked, equal the plain one-hot sum."""
    import torch.nn.functional as F

    from m2_pretrain.eval.distributed import knn_scores_sharded

    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    labels = torch.randint(0, 7, (300,), generator=g)
    test = F.normalize(torch.randn(50, 16, generator=g), dim=1)
    want = _knn_scores_one_hot(train, labels, test, 7, k=20, temperature=0.1)
    got = knn_scores_sharded(train, labels, test, 7, 20, 0.1, EvalContext.single(), 300,
                             chunk=16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_tensor_batches_are_the_dataloaders_batches():
    from m2_pretrain.eval.distributed import TensorBatches, train_sampler

    data = torch.utils.data.TensorDataset(torch.randn(23, 4), torch.arange(23))
    for world in (1, 2):
        for rank in range(world):
            ctx = _ctx(world, rank)
            ours, theirs = train_sampler(data, ctx, 7), train_sampler(data, ctx, 7)
            batches = TensorBatches(data.tensors, ours, 5)
            loader = torch.utils.data.DataLoader(data, batch_size=5, sampler=theirs,
                                                 drop_last=True)
            for epoch in (0, 1):
                ours.set_epoch(epoch), theirs.set_epoch(epoch)
                got, want = list(batches), list(loader)
                assert len(got) == len(want) == len(batches) == (23 // world) // 5
                for (a, b), (c, d) in zip(got, want):
                    assert torch.equal(a, c) and torch.equal(b, d)
