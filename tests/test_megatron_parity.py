"""Megatron model == transformers, across TP/PP layouts, packed and padded; conversion round trip;
one-step training equality across layouts. Multi-process on gloo (CPU) or NCCL (GPU)."""
from __future__ import annotations

import pytest
import torch

from megatron_matpo.dist import launch_local
from megatron_matpo.model.layout import ParallelLayout as L
from tests.conftest import ARCHS
from tests.dist_checks import world_checks

pytestmark = pytest.mark.slow
LOGIT_TOL = 1e-5


@pytest.fixture(scope="module")
def world1(tiny_models):
    phases = [("logits", L()), ("packed_backward", L()), ("train", L()), ("train_packed", L()), ("actor", L()),
              ("critic", L())]
    return launch_local(world_checks, 1, tiny_models, phases)


@pytest.fixture(scope="module")
def world2(tiny_models, odd_vocab_model, tmp_path_factory):
    phases = [("logits", L(tp=2)), ("logits", L(pp=2)), ("packed_backward", L(tp=2)),
              ("train", L(tp=2)), ("train", L(dp=2)), ("train_recompute", L(tp=2)), ("output_lr", L(tp=2)),
              ("actor", L(tp=2)), ("critic", L(tp=2)), ("critic", L(pp=2)), ("vocab_padding", L(tp=2)),
              ("vocab_padding_reshard", L(pp=2)), ("verifier", L(tp=2)), ("verifier", L(pp=2)),
              ("reshard", L(tp=2)), ("reshard", L(pp=2)),
              ("logits", L(cp=2)), ("train_packed", L(cp=2)), ("actor", L(cp=2)),
              ("logits", L(tp=2, sp=True)), ("train_packed", L(tp=2, sp=True)), ("train_recompute", L(tp=2, sp=True)),
              ("critic", L(cp=2))]
    return launch_local(world_checks, 2, {**tiny_models, "qwen3-odd": odd_vocab_model}, phases,
                        str(tmp_path_factory.mktemp("world2")))


@pytest.fixture(scope="module")
def world4(tiny_models, odd_vocab_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("roundtrip")
    phases = [("logits", L(tp=2, pp=2)), ("roundtrip", L(tp=2, pp=2)), ("reshard", L(tp=2, pp=2)),
              ("reshard", L(tp=2, dp=2)),
              ("logits", L(tp=2, cp=2)), ("logits", L(pp=2, cp=2)), ("train_packed", L(tp=2, cp=2)),
              ("train_packed", L(pp=2, cp=2)), ("train_packed", L(cp=2, dp=2)), ("actor", L(tp=2, cp=2)),
              ("reshard", L(tp=2, cp=2)), ("logits", L(tp=2, pp=2, sp=True)), ("train_packed", L(tp=2, cp=2, sp=True))]
    return launch_local(world_checks, 4, {**tiny_models, "qwen3-odd": odd_vocab_model}, phases, str(work)), work


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("world,key", [("world1", "logits@tp1pp1dp1"), ("world2", "logits@tp2pp1dp1"),
                                       ("world2", "logits@tp1pp2dp1"), ("world4", "logits@tp2pp2dp1")])
def test_logits_match_transformers(request, arch, world, key):
    res = request.getfixturevalue(world)
    res = res[0] if world == "world4" else res
    assert res[key][f"{arch}/padded"] <= LOGIT_TOL
    assert res[key][f"{arch}/packed"] <= LOGIT_TOL  # THD packed == per-sequence transformers


CP_WORLDS = [("world2", "tp1pp1cp2dp1"), ("world4", "tp2pp1cp2dp1"), ("world4", "tp1pp2cp2dp1")]
SP_WORLDS = [("world2", "tp2pp1dp1sp"), ("world4", "tp2pp2dp1sp")]


def _world(request, name):
    res = request.getfixturevalue(name)
    return res[0] if name == "world4" else res


@pytest.mark.parametrize("world,tag", CP_WORLDS + SP_WORLDS)
def test_context_and_sequence_parallel_logits_match_transformers(request, world, tag):
    # CP: each packed sequence split in 2*cp chunks, rank r holding chunks r and 2cp-1-r; SP: the activations
    # outside attention and MLP split over the TP ranks. Every token's logits equal transformers' on the whole
    # sequence, every architecture
    res = _world(request, world)[f"logits@{tag}"]
    assert {f"{a}/packed" for a in ARCHS} <= set(res)  # world2 also has the odd-vocabulary model
    assert max(res.values()) <= LOGIT_TOL, res


@pytest.mark.parametrize("world,tag", CP_WORLDS + [("world4", "tp1pp1cp2dp2"), ("world2", "tp2pp1dp1sp"),
                                      ("world4", "tp2pp1cp2dp1sp")])
def test_context_and_sequence_parallel_train_steps_match_single_process(request, world1, world, tag):
    # three PPO steps on packed rows (pack_rows(cp_size) -> shard_for_cp -> actor.train_step): the same losses
    # and grad norms as one process (SP: the norms' partial weight gradients summed over TP)
    ref, got = world1["train_packed@tp1pp1dp1"], _world(request, world)[f"train_packed@{tag}"]
    for step in range(3):
        assert got[f"ok{step}"] == 1.0
        assert abs(got[f"loss{step}"] - ref[f"loss{step}"]) <= 1e-6, (step, got, ref)
        assert abs(got[f"grad_norm{step}"] - ref[f"grad_norm{step}"]) <= 1e-5 * ref[f"grad_norm{step}"], (step, got)
    assert ref["loss2"] < ref["loss0"]  # the optimizer really stepped


@pytest.mark.parametrize("world,key", [("world1", "packed_backward@tp1pp1dp1"),
                                       ("world2", "packed_backward@tp2pp1dp1")])
def test_packed_backward(request, world, key):
    res = request.getfixturevalue(world)[key]
    assert res["grads_nonfinite"] == 0.0
    assert res["grad_sq_norm"] > 0.0
    assert res["loss_diff"] <= 1e-6 * 200  # summed CE over ~21 tokens (~150): relative 1e-6


@pytest.mark.parametrize("key", ["train@tp2pp1dp1", "train@tp1pp1dp2", "train_recompute@tp2pp1dp1",
                                 "train_recompute@tp2pp1dp1sp"])
def test_train_steps_match_single_process(world1, world2, key):
    ref, got = world1["train@tp1pp1dp1"], world2[key]
    for step in range(3):
        assert got[f"ok{step}"] == 1.0
        assert abs(got[f"loss{step}"] - ref[f"loss{step}"]) <= 1e-6, (step, got, ref)
    assert ref["loss2"] < ref["loss0"]  # the optimizer really stepped


def test_output_layer_lr_moves_only_the_output_layer(world2):
    """lr=0, output_layer_lr=1e-2: Adam's first step is ±lr per weight, so the (TP-split) output
    layer moves by 1e-2 at most and every other parameter stays bit-identical."""
    got = world2["output_lr@tp2pp1dp1"]
    assert got["output_params"] >= 1
    assert 0.9e-2 <= got["output_moved_max"] <= 1.0001e-2, got
    assert got["others_moved_max"] == 0.0, got


@pytest.mark.parametrize("arch", ARCHS)
def test_roundtrip_bit_exact_and_loadable(world4, tiny_models, arch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, work = world4
    src, back = tiny_models[arch], work / f"{arch}-hf"
    a, b = load_file(f"{src}/model.safetensors"), load_file(f"{back}/model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(3))
    m1 = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    m2 = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)
    assert (back / "tokenizer.json").is_file() and (back / "config.json").is_file()


@pytest.mark.parametrize("world,key", [("world1", "actor@tp1pp1dp1"), ("world2", "actor@tp2pp1dp1"),
                                       ("world2", "actor@tp1pp1cp2dp1"), ("world4", "actor@tp2pp1cp2dp1")])
def test_actor_logprobs_and_first_ppo_step(request, world, key):
    res = _world(request, world)[key]
    assert res["old_vs_actor"] <= 1e-5  # actor logprobs (vocab-parallel) == transformers'
    assert res["clip_frac"] == 0.0 and abs(res["approx_kl"]) <= 1e-9  # first step: ratio == 1
    assert res["skipped"] == 0.0
    assert res["gain_pos"] < 0.0  # (negated) positive-advantage rows gained logprob
    assert res["gain_neg"] < 0.0  # the negative-advantage row lost logprob
    # old logprobs from the update's own forward (trainer: one mini-batch; a KL term in the loss): same
    # step, ratio 1, train/rollout parity measured in that forward
    assert res["kl_term"] > 0  # the reference term was in both losses
    assert res["fused_loss_diff"] <= 1e-6 and res["fused_grad_norm_diff"] <= 1e-5 * res["grad_norm"], res
    assert res["fused_ratio_off"] == 0.0 and res["fused_parity_tokens"] > 0 and res["fused_parity_max"] <= 1e-5, res
    # TIS against an engine 0.3 / 1.0 / -0.2 nats off on each row: the loss as computed by hand
    assert res["tis_loss_err"] <= 1e-5 and res["tis_ratio_mean_err"] <= 1e-4, res
    assert res["tis_reported"] == 1.0 and res["tis_truncated_off"] <= 1e-6 and res["tis_tokens_off"] == 0.0, res
    assert res["paper_reported"] == 1.0 and res["paper_loss_err"] <= 1e-5, res  # loss.agg=rollout-mean-token-mean
    # rollouts at temperature 0.7: the actor's logprobs (separate pass and the update's own forward) are
    # log_softmax(logits / 0.7)'s, as the engine reports; untempered ones are off (reported negated)
    assert res["tempered_vs_hf"] <= 1e-5 and res["tempered_fused_parity_max"] <= 1e-5, res
    assert -res["untempered_vs_hf"] > 1e-2, res


@pytest.mark.parametrize("key", ["critic@tp1pp1dp1", "critic@tp2pp1dp1", "critic@tp1pp2dp1", "critic@tp1pp1cp2dp1"])
def test_critic_values_and_value_steps(world1, world2, key):
    """The critic (value head on the Megatron model) == transformers' hidden states · head; its value
    loss steps agree across TP / PP with the single-process run and lower the loss."""
    ref = world1["critic@tp1pp1dp1"]
    got = ref if key == "critic@tp1pp1dp1" else world2[key]
    assert got["rows"] == 3.0 and got["value_vs_hf"] <= 1e-5, got
    for step in range(3):
        assert got[f"skipped{step}"] == 0.0
        assert abs(got[f"value_loss{step}"] - ref[f"value_loss{step}"]) <= 1e-6, (step, got, ref)
    assert ref["value_loss2"] < ref["value_loss0"]
    assert got["trained_vs_initial"] > 1e-4 and got["resume_diff"] == 0.0  # the critic's checkpoint restores it


def test_vocabulary_tp_does_not_divide_is_padded_and_masked(world2, world4, odd_vocab_model):
    """An odd vocabulary at TP=2 (model/vocab.py): one padding column, masked to the lowest float; logits,
    log-probabilities and entropy equal transformers' over the real vocabulary; the padding rows get no
    gradient; the exported tensors (streamed as the sync sends them, and HF -> Megatron -> HF on disk,
    at TP=2 and resharded to PP=2) are the original's, shapes included."""
    import json
    from pathlib import Path

    vocab = json.loads((Path(odd_vocab_model) / "config.json").read_text())["vocab_size"]
    res = world2["vocab_padding@tp2pp1dp1"]
    assert vocab % 2 == 1 and res["padded_width"] == vocab + 1, (vocab, res)
    assert res["pad_logit_max"] == torch.finfo(torch.float32).min, res
    assert res["logits"] <= LOGIT_TOL and res["logprobs"] <= LOGIT_TOL and res["entropy"] <= LOGIT_TOL, res
    assert res["pad_grad"] == 0.0, res
    assert res["export_mismatch"] == 0.0 and res["roundtrip_mismatch"] == 0.0, res
    assert world2["vocab_padding_reshard@tp1pp2dp1"]["roundtrip_mismatch"] == 0.0  # that checkpoint at PP=2
    for key in ("logits@tp2pp1dp1", "logits@tp1pp2dp1"):  # padded (TP=2) and not (PP=2), batches of both kinds
        assert max(world2[key]["qwen3-odd/padded"], world2[key]["qwen3-odd/packed"]) <= LOGIT_TOL, (key, world2[key])
    tp2pp2 = world4[0]["logits@tp2pp2dp1"]  # padded, through the pipeline
    assert max(tp2pp2["qwen3-odd/padded"], tp2pp2["qwen3-odd/packed"]) <= LOGIT_TOL, tp2pp2


@pytest.mark.parametrize("arch", [*ARCHS, "qwen3-odd"])
@pytest.mark.parametrize("world,key", [("world2", "reshard@tp2pp1dp1"), ("world2", "reshard@tp1pp2dp1"),
                                       ("world4", "reshard@tp2pp2dp1"), ("world4", "reshard@tp2pp1dp2"),
                                       ("world4", "reshard@tp2pp1cp2dp1")])
def test_weight_sync_export_is_the_hf_model(request, arch, world, key):
    """What the weight sync sends (bridge/reshard.py, every rank writing only its own slices) is the HF
    file, bit for bit, at every layout: the engines' weights are the model's."""
    res = request.getfixturevalue(world)
    res = (res[0] if world == "world4" else res)[key]
    assert res[arch] == 0.0 and res[f"{arch}/tensors"] > 0, res


def test_verifier_score_head_and_its_export_at_tp2_and_pp2(world2):
    """`matpo train-verifier`'s model (bias-free score head) at TP=2 and at PP=2: BCE steps lower the loss,
    equally at both layouts, and transformers' AutoModelForSequenceClassification on the HF export scores
    the rows as the sharded model does (its training, serving and use in a MAPoRL run are checked in
    tests/test_maporl_train.py)."""
    tp, pp = world2["verifier@tp2pp1dp1"], world2["verifier@tp1pp2dp1"]
    for res in (tp, pp):
        assert res["rows"] == 3.0 and res["score_vs_hf"] <= 1e-5 and res["score_spread"] > 1e-3, res
        assert res["bce0"] == pytest.approx(0.6931, abs=1e-4) and res["bce2"] < res["bce0"], res  # zero head: log 2
    assert all(abs(tp[f"bce{k}"] - pp[f"bce{k}"]) <= 1e-6 for k in range(3)), (tp, pp)
