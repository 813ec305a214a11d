"""The CPU suite's invariants on a CUDA device (NCCL, CUDA kernels, bf16). Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def gpu_world(tiny_models):
    from megatron_matpo.dist import launch_local
    from megatron_matpo.model.layout import ParallelLayout as L
    from tests.dist_checks import world_checks

    n = torch.cuda.device_count()
    phases = [("logits", L()), ("packed_backward", L()), ("train", L()), ("logits_bf16", L()),
              ("train_bf16", L())]
    res = {"world1": launch_local(world_checks, 1, tiny_models, phases)}
    if n >= 2:
        res["world2"] = launch_local(world_checks, 2, tiny_models,
                                     [("logits", L(tp=2)), ("train", L(tp=2)), ("train", L(dp=2))])
    return res


def test_logits_match_transformers_on_cuda(gpu_world):
    for key, val in gpu_world["world1"]["logits@tp1pp1dp1"].items():
        assert val <= 1e-4, key  # CUDA fp32 GEMMs vs CPU transformers (TF32 off)


def test_packed_backward_on_cuda(gpu_world):
    res = gpu_world["world1"]["packed_backward@tp1pp1dp1"]
    assert res["grads_nonfinite"] == 0.0 and res["grad_sq_norm"] > 0
    assert res["loss_diff"] <= 1e-3


def test_bf16_logits_close_to_fp32_transformers(gpu_world):
    for key, val in gpu_world["world1"]["logits_bf16@tp1pp1dp1"].items():
        assert val <= 0.1, key  # bf16 weights and activations vs the fp32 reference


def test_bf16_training_steps(gpu_world):
    ref, got = gpu_world["world1"]["train@tp1pp1dp1"], gpu_world["world1"]["train_bf16@tp1pp1dp1"]
    assert all(got[f"ok{i}"] == 1.0 for i in range(3))
    assert got["loss2"] < got["loss0"]
    assert abs(got["loss0"] - ref["loss0"]) < 0.05  # same weights, bf16 forward


def test_train_steps_on_cuda(gpu_world):
    ref = gpu_world["world1"]["train@tp1pp1dp1"]
    assert ref["loss2"] < ref["loss0"]
    for key in ("train@tp2pp1dp1", "train@tp1pp1dp2"):
        if "world2" in gpu_world:
            got = gpu_world["world2"][key]
            assert abs(got["loss2"] - ref["loss2"]) <= 1e-4, key
