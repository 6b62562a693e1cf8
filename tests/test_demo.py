"""The demo's budget choice, output folders and its verdicts in words (no training)."""

from __future__ import annotations

import math

import pytest
import torch

from m2_detectron2 import demo


def test_budget_choice_and_output_dirs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.resolve_budget("auto") == "quick"
    assert demo.resolve_budget("full") == "full"
    monkeypatch.setattr(demo, "cpu_has_bf16", lambda: True)
    assert demo.budget_overrides("full") == ["train.amp_cpu=true"]
    assert demo.budget_overrides("quick") == []
    monkeypatch.setattr(demo, "cpu_has_bf16", lambda: False)
    assert demo.budget_overrides("full") == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo.resolve_budget("auto") == "full"
    assert demo.budget_overrides("full") == []  # CUDA runs bf16 anyway
    with pytest.raises(ValueError, match="budget must be"):
        demo.resolve_budget("long")
    assert demo.default_output_dir("quick", 0) == "demo_output"
    assert demo.default_output_dir("full", 0) == "demo_output/full"
    assert demo.default_output_dir("quick", 2) == "demo_output/seed2"
    assert demo.default_output_dir("full", 1) == "demo_output/full/seed1"


def test_pretraining_configs_of_the_budgets():
    from m2_pretrain.config import load_config

    quick = load_config(demo.PRETRAIN_CONFIGS["quick"])
    full = load_config(demo.PRETRAIN_CONFIGS["full"])
    assert quick.model.zero_init_last is False and full.model.zero_init_last is False
    steps = {k: c.train.epochs * c.data.num_images // c.train.batch_size
             for k, c in (("quick", quick), ("full", full))}
    assert steps == {"quick": 240, "full": 3000}


def _summary(t_knn, u_knn, t_box, u_box, t_mask, u_mask, budget="quick"):
    return {"budget": budget, "convert": {"verify_max_abs_diff": 0.0},
            "pretrain": {"steps": 240,
                         "knn": {"M2 Teacher (pretrained)": {"top1": t_knn, "top5": 99.0},
                                 "untrained (paper init)": {"top1": u_knn, "top5": 98.0}}},
            "detection": {demo.TEACHER_ARM: {"bbox": {"AP": t_box}, "segm": {"AP": t_mask}},
                          demo.UNTRAINED_ARM: {"bbox": {"AP": u_box}, "segm": {"AP": u_mask}}}}


def test_findings_judge_differences_against_the_spread():
    box, mask = demo.DET_SEED_SPREAD["bbox"], demo.DET_SEED_SPREAD["segm"]
    lines = demo.findings(_summary(77.0, 77.3, 20.0 + box - 0.1, 20.0, 4.0, 4.0 + mask + 0.5))
    assert lines[0].startswith("kNN: teacher 77.0 vs untrained (paper init) 77.3 (-0.3)")
    assert lines[1].startswith("Not shown") and "DEMO_BUDGET=full" in lines[1]
    assert "box AP" in lines[2] and "no difference" in lines[2]
    assert "mask AP" in lines[3] and "behind by more than" in lines[3]
    lines = demo.findings(_summary(84.0, 77.3, 30.0, 20.0, 4.0, math.nan, budget="full"))
    assert lines[1].startswith("Shown: the teacher's features beat")
    assert "ahead by more than" in lines[2]
    assert "not comparable" in lines[3]


def test_printout_states_the_findings(monkeypatch, capsys, tmp_path):
    s = _summary(77.0, 77.3, 20.0, 19.0, 4.0, 4.2)
    for arm in s["detection"].values():
        for task in arm.values():
            task["AP50"] = 2 * task["AP"]
        arm["seconds"] = 100.0
    s["pretrain"].update(pretrain_seconds=150.0, final_loss=0.5, encoder="encoder.pth")
    s.update(detector_seed_spread=demo.DET_SEED_SPREAD, findings=demo.findings(s),
             pretraining_reused=False, total_seconds=420.0)
    seen = {}
    monkeypatch.setattr(demo, "run", lambda out, *a: seen.update(out=out, args=a) or s)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    demo.main(["--seed", "2"])
    out = capsys.readouterr().out
    assert seen["out"] == "demo_output/seed2" and seen["args"][-1] == "quick"
    assert "untrained (paper init)" in out and "box AP: teacher 20.0 vs untrained 19.0" in out
    assert "no difference (inside the detector-seed spread of 5.4)" in out
    assert "Not shown: 240 steps do not beat" in out
