"""Teacher-target noise benchmark: the measure, its floor and ordering, and the training link."""

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import target_noise as tn  # noqa: E402

from m2_pretrain.engine.trainer import Trainer  # noqa: E402

BATCH = 16
TINY = ["--dataset", "embedded", "--dataset-size", "96", "--arch", "test_resnet", "--res", "16",
        "--batch", str(BATCH), "--groups", "4", "8", "16", "--run-group", "4", "--steps", "2",
        "--noise-every", "1", "--snapshots", "0", "2", "--pool", "64", "--probes", "8",
        "--batches-per-draw", "2", "--draws", "3", "--seeds", "2", "--workers", "0",
        "--warmup-steps", "1", "--alphas", "0.1", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny convolutions run faster on one thread (and do not stall on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(_one_thread):
    args = tn.parse(TINY)
    cfg = tn.run_config(args, "momentum")
    pool = tn.build_pool(cfg, args.pool, args.probes)
    plain = tn.plain_teacher(cfg)
    assert tn.recount_population_statistics(plain, pool, BATCH, "cpu") > 0
    return args, cfg, pool, plain


def _targets(setup, row, seed=0, draws=3):
    _, _, pool, plain = setup
    return tn.collect_targets(tn.row_teacher(plain, row, BATCH), pool, BATCH, 2, draws, seed,
                              "cpu")


def _noise(setup, row, seed=0):
    return tn.summarise_targets(*_targets(setup, row, seed))


def test_pairwise_noise_and_relative_variance_match_plain_loops():
    t = torch.randn(4, 5, 7)
    t[:, 0] = t[0, 0]  # an item whose targets never change
    want = []
    for i in range(5):
        cos = [F.cosine_similarity(t[r, i], t[s, i], dim=0) for r in range(4) for s in range(4)
               if r != s]
        want.append(1 - torch.stack(cos).mean())
    torch.testing.assert_close(tn.pairwise_noise(t).float(), torch.stack(want), atol=1e-6, rtol=0)
    assert abs(float(tn.pairwise_noise(t)[0])) < 1e-12
    mean = t.mean(0)
    rv = ((t - mean) ** 2).sum(-1).sum(0) / 3 / (t ** 2).sum(-1).mean(0)
    torch.testing.assert_close(tn.relative_variance(t).float(), rv, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2 draws"):
        tn.pairwise_noise(t[:1])


def test_compositions_hold_every_probe_once_and_change_the_mates(setup):
    _, _, pool, _ = setup
    g = torch.Generator().manual_seed(0)
    a, b = (tn.compositions(pool, BATCH, 2, g) for _ in range(2))
    for idx in (a, b):
        assert idx.shape == (2, BATCH) and idx.unique().numel() == 2 * BATCH
        assert sorted(idx[idx < pool.probes].tolist()) == list(range(pool.probes))
    assert set(a[a >= pool.probes].tolist()) != set(b[b >= pool.probes].tolist())


def test_eval_teacher_has_zero_noise_and_train_bn_in_groups_has_noise(setup):
    ev = _noise(setup, tn.Row("eval", "", "bn", BATCH, mode="eval"))
    bn = _noise(setup, tn.Row("bn@4", "", "bn", 4))
    for k in ("z_noise", "h_noise", "z_relvar", "h_relvar"):
        assert abs(ev[k]) < 1e-6, (k, ev[k])
        assert bn[k] > 1e-2, (k, bn[k])
    assert ev["loss_floor"] < 1e-5 < 0.1 < bn["loss_floor"]


def test_momentum_bn_at_alpha_0_is_the_eval_floor_and_at_alpha_1_is_bn(setup):
    ev_z, ev_h = _targets(setup, tn.Row("eval", "", "bn", BATCH, mode="eval"))
    m0_z, m0_h = _targets(setup, tn.Row("m0", "", "momentum", 4, 0.0))
    torch.testing.assert_close(m0_z, ev_z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m0_h, ev_h, atol=1e-4, rtol=1e-4)
    bn_z, bn_h = _targets(setup, tn.Row("bn@4", "", "bn", 4))
    m1_z, m1_h = _targets(setup, tn.Row("m1", "", "momentum", 4, 1.0))
    torch.testing.assert_close(m1_z, bn_z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m1_h, bn_h, atol=1e-4, rtol=1e-4)
    assert abs(tn.summarise_targets(m0_z, m0_h)["z_noise"]) < 1e-6


def test_noise_ordering_groups_and_alpha(setup):
    z = {key: _noise(setup, row)["z_noise"] for key, row in {
        "bn@4": tn.Row("", "", "bn", 4), "bn@8": tn.Row("", "", "bn", 8),
        "bn@16": tn.Row("", "", "bn", 16), "sync": tn.Row("", "", "sync", BATCH),
        "m.5": tn.Row("", "", "momentum", 4, 0.5), "m.1": tn.Row("", "", "momentum", 4, 0.1),
        "m.01": tn.Row("", "", "momentum", 4, 0.01)}.items()}
    assert z["bn@4"] > z["bn@8"] > z["bn@16"] > 1e-3
    assert z["sync"] == pytest.approx(z["bn@16"], rel=1e-6)  # the whole batch of a view
    assert z["bn@4"] > z["m.5"] > z["m.1"] > z["m.01"] > 1e-7
    assert z["m.01"] < 0.01 * z["bn@4"]


def test_measurement_leaves_the_teacher_as_it_was(setup):
    _, _, _, plain = setup
    for row in (tn.Row("", "", "momentum", 4, 0.3), tn.Row("", "", "bn", 4)):
        model = tn.row_teacher(plain, row, BATCH)
        with torch.no_grad():  # distinct running statistics per group, as after training
            for name, buf in model.teacher.named_buffers():
                if name.endswith("running_mean"):
                    buf.add_(torch.randn_like(buf) * 0.1)
        before = copy.deepcopy(model.teacher.state_dict())
        _, _, pool, _ = setup
        tn.measure(model, pool, BATCH, 2, 2, [0], "cpu")
        after = model.teacher.state_dict()
        assert before.keys() == after.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), k
        assert model.teacher.training


def test_group_running_statistics_make_momentum_bn_noisy_at_alpha_0(setup):
    """Momentum BN normalises each group with that group's running statistics: at alpha 0
    the target still depends on the group an image lands in when the groups' statistics
    differ (a multi-GPU teacher's per-device buffers), and not when they are equal."""
    _, _, pool, plain = setup
    model = tn.row_teacher(plain, tn.Row("", "", "momentum", 4, 0.0), BATCH)
    with torch.no_grad():
        for name, buf in model.teacher.named_buffers():
            if name.endswith("running_mean"):
                buf[1:].add_(torch.randn_like(buf[1:]) * 0.5)
    noisy = tn.measure(model, pool, BATCH, 2, 3, [0], "cpu")["z_noise"]["mean"]
    assert noisy > 1e-4


def test_noise_recorder_logs_noise_without_changing_the_run(setup, tmp_path):
    args, cfg, pool, _ = setup
    probe = lambda m: tn.measure(m, pool, BATCH, 2, 2, [0], "cpu")  # noqa: E731
    tr = tn.NoiseRecorder(probe, every=1, snapshot_steps=[0, 2])
    hist = tn.noise_run(cfg, tmp_path / "a", tr, progress=False)["history"]
    ref = Trainer(cfg, tmp_path / "b", progress=False).fit()["history"]
    assert [h["loss"] for h in hist] == [h["loss"] for h in ref]
    assert [n["step"] for n in tr.noise] == [0, 1, 2]
    assert [n["alpha"] for n in tr.noise] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert tr.noise[0]["z_noise"]["mean"] > 1e-3
    assert sorted(tr.snapshots) == [0, 2]
    assert tr.snapshots[2]["encoder.bn1.alpha"].item() == 0.0
    assert tr.snapshots[2]["encoder.bn1.running_mean"].shape[0] == BATCH // 4


def test_script_writes_results_and_keeps_them_without_force(tmp_path):
    argv = TINY + ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    res = tn.main(argv)
    out = tmp_path / "out"
    data = json.loads((out / "target_noise.json").read_text())
    assert {"meta", "table", "runs", "checks"} <= set(data)
    keys = {r["key"] for r in data["table"]}
    assert {"bn@4", "bn@16", "sync", "eval", "momentum@4,a=1", "momentum@4,a=0",
            "momentum@8,a=0.1", "momentum@4,own"} <= keys
    assert set(data["runs"]) == {"bn/bn@4", "bn/momentum@4"}
    assert [n["step"] for n in data["runs"]["bn/momentum@4"]] == [0, 1, 2]
    for step in ("0", "2"):
        c = data["checks"][step]
        assert c["max_abs_floor_z_noise"] < 1e-6
        assert c["sync_over_bn_at_batch"] == pytest.approx(1.0, rel=1e-6)
        assert c["momentum_a1_over_bn"]["4"] == pytest.approx(1.0, rel=1e-3)
    assert res["meta"]["groups"] == [4, 8, 16]
    for name in ("target_noise.png", "target_noise_training.png", "target_noise_table.md"):
        assert (out / name).stat().st_size > 0
    with pytest.raises(SystemExit, match="--force"):
        tn.main(argv)
    (out / "target_noise.png").unlink()
    again = tn.main(argv + ["--replot", str(out / "target_noise.json"), "--force"])
    assert again["checks"] == data["checks"] and (out / "target_noise.png").stat().st_size > 0
    shutil.rmtree(tmp_path / "work")
