"""Speed benchmark plumbing (not timings), fused vs reference Momentum BN, compiled step."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

from m2_pretrain.models import M2Teacher

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from speed import ReferenceM2Teacher  # noqa: E402


def test_speed_benchmark_runs_on_cpu_and_writes_json(tmp_path):
    out = tmp_path / "speed.json"
    r = subprocess.run([sys.executable, "benchmarks/speed.py", "--device", "cpu", "--arch", "resnet10t",
                        "--res", "32", "--batch", "4", "--repeats", "2", "--inner", "1", "--warmup", "1",
                        "--moco", "--cpu-bf16", "--pipeline", "--pipeline-seconds", "0.5", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["arms"]) == {"ceiling", "byol_bn", "m2", "m2_reference", "m2_grouped", "mocov2_shuffle",
                                "mocov2_momentum", "m2_bf16"}
    for arm in res["arms"].values():
        assert arm["median_s"] > 0 and len(arm["all_s"]) == 2
    assert set(res["ratios"]) == {"m2/ceiling", "m2/byol_bn", "m2_reference/m2", "m2_grouped/m2",
                                  "mocov2_momentum/mocov2_shuffle", "m2_bf16/m2"}
    assert res["pipeline"]["96px_pairs_per_s_per_core"] > 0
    assert res["pipeline"]["96px_pairs_per_s_per_core_torchvision_blur"] > 0
    assert res["pipeline"]["96px_pairs_per_s_per_core_geometric"] > 0
    assert res["pipeline"]["224px_pairs_per_s_per_core_device_half_on_cpu"] > 0
    assert "m2_reference/m2" in r.stdout


def test_speed_real_runs_the_trainer_on_generated_stl10(tmp_path):
    out = tmp_path / "real.json"
    args = ["--device", "cpu", "--arch", "resnet10t", "--res", "32", "--batch", "4",
            "--repeats", "1", "--inner", "1", "--warmup", "1", "--real", "stl10",
            "--real-images", "40", "--real-steps", "6", "--workers", "0",
            "--augment-device", "cuda", "--json", str(out)]
    r = subprocess.run([sys.executable, "benchmarks/speed.py", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (real,) = json.loads(out.read_text())["real"]
    assert real["dataset"] == "stl10" and real["augment_device"] == "device"
    assert real["steps_timed"] == 5  # log rows every step; the first window is dropped
    assert real["images_per_s"] > 0 and 0 <= real["data_wait_share"] < 1
    rate = real["fraction_of_m2_step_rate"] * real["m2_step_images_per_s"]
    assert abs(rate - real["images_per_s"]) < 1e-6
    rate = real["fraction_of_m2_augment_rate"] * real["m2_augment_images_per_s"]
    assert abs(rate - real["images_per_s"]) < 1e-6
    assert "of the m2 step + device augmentation rate" in r.stdout
    assert "of the m2 step rate" in r.stdout


def test_fused_and_reference_momentum_bn_agree():
    torch.manual_seed(0)
    fused = M2Teacher("resnet10t", proj_hidden=32, proj_out=16, pred_hidden=32)
    ref = ReferenceM2Teacher("resnet10t", proj_hidden=32, proj_out=16, pred_hidden=32)
    # same teacher weights (the reference keeps BN params under the same names)
    ref.teacher.load_state_dict({k: v for k, v in fused.teacher.state_dict().items()
                                 if not k.endswith(("alpha", "num_batches_tracked"))})
    for k, alpha in enumerate([1.0, 0.8, 0.3, 0.05]):
        v1, v2 = torch.randn(4, 3, 32, 32) + k, torch.randn(4, 3, 32, 32) * 2
        fused.set_alpha(alpha)
        ref.set_alpha(alpha)
        a1, a2 = fused.teacher_targets(v1, v2)
        b1, b2 = ref.teacher_targets(v1, v2)
        torch.testing.assert_close(a1, b1, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(a2, b2, atol=2e-4, rtol=1e-4)
    fs, rs = fused.teacher.state_dict(), ref.teacher.state_dict()
    stats = [k for k in rs if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 10
    for k in stats:
        torch.testing.assert_close(fs[k], rs[k], atol=1e-4, rtol=1e-4)


def test_compiled_step_matches_eager_without_recompiling(monkeypatch):
    import torch._dynamo as dynamo

    import m2_pretrain.layers.momentum_bn as MB
    from m2_pretrain.layers.fused_bn import momentum_bn_train_composite

    # Compiled, Momentum BN is the composite math; the eager model takes the same math here,
    # not the CPU's native-kernel path, whose different rounding (about 2e-6 per teacher
    # forward) grows through five training steps at 4 images per view.
    monkeypatch.setattr(MB, "momentum_bn_train_fused", momentum_bn_train_composite)
    torch.manual_seed(0)
    eager = M2Teacher("resnet10t", proj_hidden=32, proj_out=16, pred_hidden=32)
    comp_model = copy.deepcopy(eager)
    compiled = torch.compile(comp_model, backend="aot_eager")
    opt_e = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    opt_c = torch.optim.SGD([p for p in comp_model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    dynamo.reset()
    with dynamo.config.patch(error_on_recompile=True):
        for k in range(5):
            v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
            alpha = 1.0 - k / 5  # alpha changes every step: a buffer, so no recompilation
            losses = []
            for model, fwd, opt in ((eager, eager, opt_e), (comp_model, compiled, opt_c)):
                model.set_alpha(alpha)
                loss = fwd(v1, v2)["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                model.update_teacher(0.01)
                losses.append(loss.detach())
            torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)
    for (n, a), (_, b) in zip(eager.teacher.state_dict().items(), comp_model.teacher.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=n)
