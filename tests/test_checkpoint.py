"""Training checkpoints: exact resume at TP=2 with the distributed optimizer, atomic writes and
crash leftovers, keep-last-k, `matpo convert` on a training checkpoint, resharded resume, clear
errors; the LR schedule and `latest_checkpoint` without processes."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_matpo.model.layout import ParallelLayout as L
from megatron_matpo.train import checkpoint as ckpt
from megatron_matpo.train.optim import OptimConfig, build_scheduler
from tests import ckpt_checks


# ---- multi-process: one launch for the uninterrupted run, one for every resume --------------------

@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    from megatron_matpo.dist import launch_local

    work = tmp_path_factory.mktemp("ckpt")
    hf = tiny_models["qwen3"]
    full = launch_local(ckpt_checks.train_and_save, 2, hf, str(work), L(tp=2))
    # leftovers of a crash (a temp dir with garbage), a damaged dir and a stale pointer: resume ignores them
    root = work / ckpt_checks.RUN / ckpt.CHECKPOINTS_DIR
    (root / "step_000006.tmp-garbage" / "model").mkdir(parents=True)
    (root / "step_000006.tmp-garbage" / ckpt.META_FILE).write_text("{not json")
    (root / "step_000007").mkdir()
    shutil.copy(root / "step_000002" / ckpt.META_FILE, root / "step_000007" / ckpt.META_FILE)  # no shards
    (root / ckpt.LATEST_FILE).write_text("step_000009\n")
    resumed = launch_local(ckpt_checks.resume, 2, hf, str(work), L(tp=2), L(dp=2))
    return work, full, resumed


def _equal_params(work: Path, a: str, b: str) -> None:
    for rank in range(2):
        x, y = torch.load(work / f"{a}_rank{rank}.pt"), torch.load(work / f"{b}_rank{rank}.pt")
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (rank, k, (x[k] - y[k]).abs().max().item())


@pytest.mark.slow
def test_resume_is_bit_exact(runs):
    work, full, res = runs
    assert res["extra"] == {"step": 2, "cursor": 10, "history": [full["loss1"], full["loss2"]]}
    assert res["sched_steps_loaded"] == 2.0
    for step in (3, 4):  # bit-exact: same layout, same kernels, same reduction order
        for k in ("loss", "grad_norm", "lr", "skipped"):
            assert res[f"{k}{step}"] == full[f"{k}{step}"], (k, step, res[f"{k}{step}"], full[f"{k}{step}"])
    assert full["lr1"] == 0.0 and full["lr3"] == 1e-3 and full["lr4"] < full["lr3"]  # warmup, then decay
    assert res["sched_steps"] == full["sched_steps"] == 4.0
    _equal_params(work, "full", "resumed")
    assert full["loss4"] != full["loss3"]  # the steps really trained


@pytest.mark.slow
def test_crash_leftovers_keep_last_and_latest(runs):
    work, full, res = runs
    assert full["before_first_step"].startswith("CheckpointError")
    assert full["after_keep_last"] == ["latest", "step_000002", "step_000003", "step_000004"]
    assert "simulated crash" in full["crashed"]  # reported on every rank, rank 0's own error here
    assert [n.split(".tmp-")[0] for n in full["after_crash"] if ".tmp-" in n] == ["step_000005"]
    assert full["latest_after_crash"] == "step_000004"
    # despite the garbage temp dir, the shard-less step_000007 and `latest` naming a missing dir
    assert res["latest"] == "step_000004"
    assert res["latest_extra"]["step"] == 4 and res["latest_sched_steps"] == 4.0
    _equal_params(work, "full", "latest")
    # the re-save of step 4 replaced it in place and cleared every temp dir; damage that is not ours stays
    assert res["after_resave"] == ["latest", "step_000002", "step_000003", "step_000004", "step_000007"]
    root = work / ckpt_checks.RUN / ckpt.CHECKPOINTS_DIR
    assert json.loads((root / "step_000004" / ckpt.STATE_FILE).read_text())["extra"]["resaved"] is True
    assert (root / ckpt.LATEST_FILE).read_text().strip() == "step_000004"
    meta = json.loads((root / "step_000004" / ckpt.META_FILE).read_text())
    assert meta["step"] == 4 and meta["layout"] == {"tp": 2, "pp": 1, "dp": 1} and meta["kind"] == "training"
    assert sorted(p.name for p in (root / "step_000004" / ckpt.RNG_DIR).iterdir()) == ["rank_00000.pt",
                                                                                      "rank_00001.pt"]


@pytest.mark.slow
def test_convert_exports_training_checkpoint(runs, tiny_models):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    work, _, _ = runs
    live = load_file(work / "hf-live-step2" / "model.safetensors")
    exported = load_file(work / "hf-from-ckpt-step2" / "model.safetensors")
    init = load_file(Path(tiny_models["qwen3"]) / "model.safetensors")
    assert live.keys() == exported.keys() == init.keys()
    assert all(torch.equal(live[k], exported[k]) for k in live)
    assert any(not torch.equal(init[k], exported[k]) for k in init)  # trained weights, not the initial ones
    model = AutoModelForCausalLM.from_pretrained(work / "hf-from-ckpt-step2", dtype=torch.float32)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.slow
def test_errors_and_resharded_resume(runs):
    _, full, res = runs
    assert res["err_layout"].startswith("CheckpointError") and "tp=2 pp=1" in res["err_layout"]
    assert "optimizer=None" in res["err_layout"]
    assert res["err_missing"].startswith("FileNotFoundError") and "step_000099" in res["err_missing"]
    assert res["err_tmp"].startswith("CheckpointError") and "unfinished" in res["err_tmp"]
    assert res["err_incomplete"].startswith("CheckpointError") and "incomplete" in res["err_incomplete"]
    assert res["weights_only_extra"]["step"] == 2
    # TP=2 checkpoint (fully_reshardable optimizer state) resumed at DP=2: the same training up to
    # reduction order (TP vs DP sums), as test_megatron_parity finds for one step
    assert res["reshard_extra"]["step"] == 2
    for step in (3, 4):
        assert res[f"reshard_lr{step}"] == full[f"lr{step}"]
        assert abs(res[f"reshard_loss{step}"] - full[f"loss{step}"]) <= 1e-5, (step, res, full)
        assert abs(res[f"reshard_grad_norm{step}"] - full[f"grad_norm{step}"]) <= 1e-5


# ---- no processes -------------------------------------------------------------------------------

def _fake_ckpt(root: Path, step: int) -> Path:
    d = root / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_name(step)
    for sub in (ckpt.MODEL_DIR, ckpt.OPTIM_DIR, ckpt.RNG_DIR):
        (d / sub).mkdir(parents=True)
    for f in (ckpt.META_FILE, ckpt.STATE_FILE, f"{ckpt.MODEL_DIR}/metadata.json", f"{ckpt.OPTIM_DIR}/metadata.json"):
        (d / f).write_text("{}")
    return d


def test_latest_checkpoint_scans_and_ignores_partial(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    _fake_ckpt(tmp_path, 2)
    three = _fake_ckpt(tmp_path, 3)
    root = tmp_path / ckpt.CHECKPOINTS_DIR
    (root / "step_000010.tmp-abc").mkdir()  # an interrupted save
    (root / "step_000011").mkdir()  # damaged: no files
    assert ckpt.latest_checkpoint(tmp_path) == three  # no pointer: scan
    (root / ckpt.LATEST_FILE).write_text("step_000002\n")
    assert ckpt.latest_checkpoint(tmp_path) == three  # pointer behind a committed newer dir
    (root / ckpt.LATEST_FILE).write_text("step_000077\n")
    assert ckpt.latest_checkpoint(tmp_path) == three  # pointer to a missing dir
    shutil.rmtree(three / ckpt.OPTIM_DIR)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000002"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000002"]


def _lrs(optim: OptimConfig, total: int) -> list[float]:
    opt = SimpleNamespace(param_groups=[{"lr": 0.0, "weight_decay": 0.0}])
    sched = build_scheduler(opt, optim, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        sched.step(1)
    return out


def test_scheduler_styles_and_state():
    assert _lrs(OptimConfig(), 3) == [1e-5] * 3  # MATPO: constant 1e-5
    assert _lrs(OptimConfig(lr=1.0, lr_warmup_steps=2), 4) == [0.0, 0.5, 1.0, 1.0]
    assert _lrs(OptimConfig(lr=1.0, min_lr=0.0, lr_decay_style="linear"), 4) == [1.0, 0.75, 0.5, 0.25]
    cos = _lrs(OptimConfig(lr=1.0, lr_decay_style="cosine"), 4)
    assert all(math.isclose(a, b, abs_tol=1e-12) for a, b in zip(cos, [1.0, 0.8535533905932737, 0.5,
                                                                       0.14644660940672627]))
    # state round trip: a fresh scheduler continues where the saved one stopped
    cfg = OptimConfig(lr=1.0, lr_warmup_steps=1, lr_decay_style="linear")
    a, b = (SimpleNamespace(param_groups=[{"lr": 0.0, "weight_decay": 0.0}]) for _ in range(2))
    s1 = build_scheduler(a, cfg, 5)
    s1.step(1), s1.step(1)
    s2 = build_scheduler(b, cfg, 5)
    s2.load_state_dict(json.loads(json.dumps(s1.state_dict())))
    assert s2.num_steps == 2 and b.param_groups[0]["lr"] == a.param_groups[0]["lr"] == 0.75


@pytest.mark.parametrize("kw,total,msg", [
    ({"lr_decay_style": "exp"}, 4, "lr_decay_style"),
    ({"lr_warmup_steps": 4}, 4, "lr_warmup_steps: 4 must be < total_steps=4"),
    ({"lr_warmup_steps": -1}, 4, "lr_warmup_steps: -1"),
    ({"min_lr": 1.0}, 4, "min_lr"),
    ({}, 0, "total_steps=0"),
])
def test_optim_config_validation(kw, total, msg):
    with pytest.raises(ValueError, match=msg):
        build_scheduler(SimpleNamespace(param_groups=[]), OptimConfig(**kw), total)
