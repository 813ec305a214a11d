"""Checks that run inside launched Megatron worlds (see test_megatron_parity.py).

Each function runs on every rank and returns a dict of measurements from rank 0; values measured on
other ranks (the last pipeline stage holds the logits) are brought to rank 0 with an all-reduce.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from megatron_matpo.model.layout import ParallelLayout

SEQ_LENS = [7, 13, 4]  # deliberately unequal, as packed planner/worker rows are


def _sequences(vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in SEQ_LENS]


def _hf_logits(hf_dir: str, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(s.unsqueeze(0)).logits[0] for s in seqs]


def _max_over_world(values: dict[str, float]) -> dict[str, float]:
    keys = sorted(values)
    from megatron_matpo import platform

    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=platform.device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return dict(zip(keys, t.cpu().tolist()))


def logits_vs_hf(hf_dirs: dict[str, str], layout: ParallelLayout,
                 dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Max |megatron − transformers| logits per architecture, padded and packed (THD) batches."""
    from megatron.core import parallel_state

    from megatron_matpo import platform
    from megatron_matpo.model.builder import build_model
    from megatron_matpo.model.forward import full_logits, pack_sequences, pad_sequences

    out: dict[str, float] = {}
    for arch, hf_dir in hf_dirs.items():
        built = build_model(hf_dir, layout, load_weights=True, dtype=dtype)
        seqs = _sequences(built.provider.vocab_size)
        ref = _hf_logits(hf_dir, seqs)
        if layout.cp > 1 or layout.sp:  # packed only, as the trainer packs for CP (2*cp) and SP (tp)
            out[f"{arch}/packed"] = _split_logits_diff(built, seqs, ref, layout)
            continue
        padded = full_logits(built.chunks, [pad_sequences(seqs)], platform.device())
        packed = full_logits(built.chunks, [pack_sequences(seqs)], platform.device())
        d_pad = d_pack = 0.0
        if parallel_state.is_pipeline_last_stage():
            offs = 0
            for i, (s, r) in enumerate(zip(seqs, ref)):
                n = len(s)
                d_pad = max(d_pad, (padded[0][i, :n, : r.shape[-1]] - r).abs().max().item())
                d_pack = max(d_pack, (packed[0][0, offs:offs + n, : r.shape[-1]] - r).abs().max().item())
                offs += n
        out[f"{arch}/padded"], out[f"{arch}/packed"] = d_pad, d_pack
    return _max_over_world(out)


def _split_logits_diff(built, seqs: list[torch.Tensor], ref: list[torch.Tensor], layout: ParallelLayout) -> float:
    """Max |megatron − transformers| over the real tokens of a micro-batch packed as the trainer packs it
    (pack_rows: each row to 2*cp, the whole to the TP multiple) and split over the CP group."""
    from megatron.core import parallel_state as ps

    from megatron_matpo import platform
    from megatron_matpo.model.context_parallel import unshard
    from megatron_matpo.model.forward import full_logits
    from megatron_matpo.train.packing import Row, pack_rows, shard_for_cp

    rows = [Row(s.tolist(), [1] * len(s), [0.0] * len(s), 0.0, row_id=i) for i, s in enumerate(seqs)]
    ((whole,),) = pack_rows(rows, 1024, 1, pad_to_multiple=layout.tp, cp_size=layout.cp)  # longest row first
    part = shard_for_cp(whole, layout.cp, ps.get_context_parallel_rank())
    logits = full_logits(built.chunks, [part.micro_batch], platform.device())
    if logits is None:
        return 0.0
    full = unshard(logits[0], whole.micro_batch.cu_seqlens.tolist(), layout.cp, ps.get_context_parallel_group())
    return max((full[0, whole.row_ids[0] == i, : r.shape[-1]] - r).abs().max().item() for i, r in enumerate(ref))


def packed_backward(hf_dir: str, layout: ParallelLayout) -> dict[str, float]:
    """Packed THD forward+backward: loss equals the per-sequence loss; every grad is finite."""
    from megatron.core import tensor_parallel

    from megatron_matpo import platform
    from megatron_matpo.model.builder import build_model
    from megatron_matpo.model.forward import pack_sequences, pad_sequences, run_schedule
    from megatron_matpo.train.optim import OptimConfig, ddp_config

    built = build_model(hf_dir, layout, load_weights=True, ddp_config=ddp_config(OptimConfig()))
    seqs = _sequences(built.provider.vocab_size, seed=1)

    def ce(out, mb):  # next-token CE summed over real tokens
        labels = torch.roll(mb.input_ids, -1, dims=1).to(out.device)
        loss = tensor_parallel.vocab_parallel_cross_entropy(out.float().contiguous(),
                                                             labels)
        mask = mb.extras["mask"].to(out.device)
        total = (loss * mask).sum()
        return total, {"loss": total.detach()}

    def last_token_mask(mb, lens, packed):
        m = torch.ones_like(mb.input_ids, dtype=torch.float32)
        if packed:
            ends = torch.cumsum(torch.tensor(lens), 0) - 1
            m[0, ends] = 0.0  # the last token of each sequence has no next token
        else:
            for i, n in enumerate(lens):
                m[i, n - 1:] = 0.0
        return m

    lens = [len(s) for s in seqs]
    pk, pd = pack_sequences(seqs), pad_sequences(seqs)
    pk.extras = {"mask": last_token_mask(pk, lens, True)}
    pd.extras = {"mask": last_token_mask(pd, lens, False)}
    device = platform.device()
    for c in built.chunks:
        c.train()
        c.zero_grad_buffer()
    rep_packed = run_schedule(built.chunks, [pk], ce, forward_only=False, device=device)
    grads_finite = all(torch.isfinite(p.main_grad).all().item() for c in built.chunks for p in c.parameters())
    grad_norm = sum(p.main_grad.float().pow(2).sum().item() for c in built.chunks for p in c.parameters())
    rep_padded = run_schedule(built.chunks, [pd], ce, forward_only=True, device=device)
    diff = abs(rep_packed[0]["loss"].item() - rep_padded[0]["loss"].item()) if rep_packed else 0.0
    return _max_over_world({"loss_diff": diff, "grads_nonfinite": float(not grads_finite),
                            "grad_sq_norm": grad_norm})


def _differ(got: dict, want: dict) -> float:
    """1.0 unless the two name -> tensor maps hold the same names, shapes and values."""
    return float(set(got) != set(want) or any(
        got[k].shape != want[k].shape or not torch.equal(got[k], want[k]) for k in want))


def vocab_padding(hf_dir: str, layout: ParallelLayout, work_dir: str) -> dict[str, float]:
    """A vocabulary TP does not divide (model/vocab.py): logits, log-probabilities and entropy equal
    transformers' over the original vocabulary, the padding columns are masked and get no gradient,
    and the HF tensors leaving the model (in memory, as the weight sync streams them, and through a
    Megatron checkpoint on disk) are the HF model's, bit for bit."""
    from megatron.core import parallel_state
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_matpo import platform
    from megatron_matpo.convert import hf_tensors, hf_to_megatron_on_ranks, megatron_to_hf_on_ranks
    from megatron_matpo.model.builder import build_model
    from megatron_matpo.model.forward import full_logits, pack_sequences, run_schedule
    from megatron_matpo.train.actor import token_logprobs, vocab_parallel_entropy
    from megatron_matpo.train.optim import OptimConfig, ddp_config

    built = build_model(hf_dir, layout, load_weights=True, ddp_config=ddp_config(OptimConfig()))
    vocab = built.provider.vocab_size
    seqs = _sequences(vocab, seed=2)
    mb = pack_sequences(seqs)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.cat([hf(s.unsqueeze(0)).logits[0] for s in seqs])  # packed order
    ref_lp = torch.log_softmax(ref, -1)
    labels = torch.roll(mb.input_ids, -1, dims=1)
    ref_tok = ref_lp.gather(-1, labels[0].unsqueeze(-1)).squeeze(-1)
    ref_ent = -(ref_lp.exp() * ref_lp).sum(-1)
    device = platform.device()
    out = {"logits": 0.0, "pad_logit_max": -float("inf"), "padded_width": 0.0, "logprobs": 0.0, "entropy": 0.0,
           "pad_grad": 0.0}
    logits = full_logits(built.chunks, [mb], device)
    if logits is not None:
        got = logits[0][0]
        out["logits"] = (got[:, :vocab] - ref).abs().max().item()
        out["pad_logit_max"] = got[:, vocab:].max().item()
        out["padded_width"] = float(got.shape[-1])

    def lp_and_entropy(o, m):  # the actor's own shard-wise functions, then a loss to backpropagate
        ent = vocab_parallel_entropy(o)
        lp = token_logprobs(o, labels.to(o.device))
        return -lp.sum(), {"lp": lp.detach().cpu(), "ent": ent.detach().cpu()}

    for c in built.chunks:
        c.train()
        c.zero_grad_buffer()
    reported = run_schedule(built.chunks, [mb], lp_and_entropy, forward_only=False, device=device)
    if reported:
        out["logprobs"] = (reported[0]["lp"][0] - ref_tok).abs().max().item()
        out["entropy"] = (reported[0]["ent"][0] - ref_ent).abs().max().item()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for c in built.chunks:
        for name, p in c.named_parameters():
            if name.endswith(("output_layer.weight", "word_embeddings.weight")):
                width = p.shape[0]
                pad = torch.arange(rank * width, (rank + 1) * width) >= vocab
                out["pad_grad"] = max(out["pad_grad"], p.main_grad[pad].abs().max().item() if pad.any() else 0.0)
    # out of the model: what the weight sync streams, then HF -> Megatron checkpoint -> HF on disk
    src = load_file(f"{hf_dir}/model.safetensors")
    out["export_mismatch"] = _differ(dict(hf_tensors(built)), src)
    ckpt, back = f"{work_dir}/odd-mcore", f"{work_dir}/odd-hf"
    hf_to_megatron_on_ranks(hf_dir, ckpt, layout)
    megatron_to_hf_on_ranks(ckpt, back, layout)
    rank0 = torch.distributed.get_rank() == 0
    out["roundtrip_mismatch"] = _differ(load_file(f"{back}/model.safetensors"), src) if rank0 else 0.0
    return _max_over_world(out)


def reshard_vs_hf(hf_dirs: dict[str, str], layout: ParallelLayout) -> dict[str, float]:
    """The weight sync's own export (bridge/reshard.py: each rank writes only its slices) assembled
    over the world equals every HF file bit for bit: fused QKV and gate/up split, TP/PP/DP slices,
    a tied head left out, a padded vocabulary cut back (qwen3-odd)."""
    from safetensors.torch import load_file

    from megatron_matpo.bridge.reshard import Resharder
    from megatron_matpo.model.builder import build_model
    from megatron_matpo.train.optim import OptimConfig, ddp_config

    out = {}
    for arch, hf_dir in hf_dirs.items():
        built = build_model(hf_dir, layout, load_weights=True, ddp_config=ddp_config(OptimConfig()))
        rs = Resharder(built)
        got = {}
        for t in rs.tensors:
            buf = torch.zeros(t.shape, dtype=t.dtype)
            rs.fill(t, buf)
            torch.distributed.all_reduce(buf)  # slices are disjoint and each written once: the sum is the tensor
            got[t.name] = buf
        out[arch] = _differ(got, load_file(f"{hf_dir}/model.safetensors"))
        out[f"{arch}/tensors"] = float(len(got))
    return _max_over_world(out)


def vocab_padding_reshard(hf_dir: str, layout: ParallelLayout, work_dir: str) -> dict[str, float]:
    """The TP=2 checkpoint of `vocab_padding` (one padding row) loaded at another layout (no padding:
    megatron-core loads embedding and output rows across shapes) and exported: the HF model again."""
    from safetensors.torch import load_file

    from megatron_matpo.convert import megatron_to_hf_on_ranks

    back = f"{work_dir}/odd-hf-tp{layout.tp}pp{layout.pp}"
    megatron_to_hf_on_ranks(f"{work_dir}/odd-mcore", back, layout)
    mismatch = (_differ(load_file(f"{back}/model.safetensors"), load_file(f"{hf_dir}/model.safetensors"))
                if torch.distributed.get_rank() == 0 else 0.0)
    return _max_over_world({"roundtrip_mismatch": mismatch})


def train_losses(hf_dir: str, layout: ParallelLayout, steps: int = 3,
                 dtype: torch.dtype = torch.float32, recompute: str = "none") -> dict[str, float]:
    """Losses of `steps` optimizer steps (DDP + distributed Adam) on one fixed global batch."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_matpo import platform
    from megatron_matpo.model.builder import build_model
    from megatron_matpo.model.forward import MicroBatch, run_schedule
    from megatron_matpo.train.optim import OptimConfig, build_optimizer, ddp_config

    optim = OptimConfig(lr=1e-3, use_distributed_optimizer=True)
    built = build_model(hf_dir, layout, load_weights=True, ddp_config=ddp_config(optim), dtype=dtype,
                        recompute=recompute)
    opt = build_optimizer(built.chunks, optim, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    global_ids = torch.randint(0, built.provider.vocab_size, (4, 16), generator=g)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    ids = global_ids.chunk(dp)[dp_rank]  # equal token counts per rank: DDP's mean == global mean
    mb = MicroBatch(ids, torch.arange(16).unsqueeze(0).expand(ids.shape[0], -1).contiguous())

    def ce(out, mb):
        labels = mb.input_ids[:, 1:].to(out.device)
        loss = tensor_parallel.vocab_parallel_cross_entropy(out[:, :-1].float().contiguous(),
                                                             labels).mean()
        return loss, {"loss": loss.detach()}

    losses = {}
    for step in range(steps):
        for c in built.chunks:
            c.train()
            c.zero_grad_buffer()
        opt.zero_grad()
        rep = run_schedule(built.chunks, [mb], ce, forward_only=False, device=platform.device())
        ok, grad_norm, _ = opt.step()
        loss = rep[0]["loss"].clone() if rep else torch.zeros(())
        # mean over DP replicas, taken on the last stage; then shared with the whole world
        if parallel_state.is_pipeline_last_stage():
            loss = loss.to(platform.device())
            torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            loss /= dp
        losses[f"loss{step}"] = loss.item() if parallel_state.is_pipeline_last_stage() else float("-inf")
        losses[f"grad_norm{step}"] = float(grad_norm or 0.0)
        losses[f"ok{step}"] = float(bool(ok))
    return _max_over_world(losses)


def train_packed(hf_dir: str, layout: ParallelLayout, steps: int = 3) -> dict[str, float]:
    """Losses and grad norms of `steps` PPO steps (DDP + distributed Adam) on packed rows through the
    trainer's path (pack_rows -> actor.train_step), any TP × PP × CP × DP: equal to a single process."""
    from megatron.core import parallel_state as ps

    from megatron_matpo import platform
    from megatron_matpo.algo.loss import LossConfig
    from megatron_matpo.model.builder import build_model
    from megatron_matpo.train.actor import compute_logprobs, train_step
    from megatron_matpo.train.optim import OptimConfig, build_optimizer, ddp_config
    from megatron_matpo.train.packing import Row, pack_rows

    # adam_eps 1e-6, not 1e-8: Adam divides by sqrt(v) + eps, so a weight whose gradient is ~0 up to float
    # rounding moves by up to ~lr with the sign of that rounding, which differs between a TP x CP world and
    # one process (summation order; CPU SIMD width): step 1's grad norm then differed by 1.5e-5 of itself on
    # a 2-core Intel Xeon (step 0 within 1e-5, every loss within 1e-6; within 1e-5 on a 2-core AMD EPYC)
    optim = OptimConfig(lr=1e-3, clip_grad=1.0, use_distributed_optimizer=True, adam_eps=1e-6)
    built = build_model(hf_dir, layout, load_weights=True, ddp_config=ddp_config(optim))
    opt = build_optimizer(built.chunks, optim)
    g = torch.Generator().manual_seed(11)
    rows = []
    for i, n in enumerate([9, 14, 5, 11]):
        ids = torch.randint(0, built.provider.vocab_size, (n,), generator=g).tolist()
        rows.append(Row(ids, [0] * (n // 3) + [1] * (n - n // 3), [0.0] * n, advantage=(1.0, -1.0, 0.5, -0.5)[i],
                        row_id=i))
    n_tok = sum(sum(r.loss_mask[1:]) for r in rows)
    mbs = pack_rows(rows, 64, layout.dp, pad_to_multiple=layout.tp, cp_size=layout.cp)[ps.get_data_parallel_rank()]
    dev = platform.device()
    first = compute_logprobs(built.chunks, mbs, dev)  # the initial policy's: ratio 1 at the first step
    for p, lp in zip(mbs, first or []):
        p.old_logprobs = lp.float()
    reports = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 \
        and ps.get_context_parallel_rank() == 0
    out = {}
    for step in range(steps):
        stats = train_step(built.chunks, opt, mbs, LossConfig(), global_token_count=n_tok, device=dev)
        loss = torch.tensor([stats["loss"] if reports else 0.0], dtype=torch.float64)
        torch.distributed.all_reduce(loss)  # the DP ranks' shares of the global token mean
        out[f"loss{step}"] = loss.item()
        out[f"grad_norm{step}"] = stats["grad_norm"]
        out[f"ok{step}"] = 1.0 - stats["step_skipped"]
    return _max_over_world(out)


def output_layer_lr_step(hf_dir: str, layout: ParallelLayout) -> dict[str, float]:
    """`optim.output_layer_lr` through megatron's param-group overrides (and its LR scheduler): with
    lr=0 one Adam step moves the output layer by ~output_layer_lr per weight and nothing else."""
    from megatron.core import tensor_parallel

    from megatron_matpo import platform
    from megatron_matpo.model.builder import build_model
    from megatron_matpo.model.forward import MicroBatch, run_schedule
    from megatron_matpo.train.optim import OptimConfig, build_optimizer, build_scheduler, ddp_config

    optim = OptimConfig(lr=0.0, output_layer_lr=1e-2, weight_decay=0.0, clip_grad=0.0)
    built = build_model(hf_dir, layout, load_weights=True, ddp_config=ddp_config(optim))
    opt = build_optimizer(built.chunks, optim)
    build_scheduler(opt, optim, total_steps=4)
    ids = torch.randint(0, built.provider.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    mb = MicroBatch(ids, torch.arange(16).unsqueeze(0).expand(2, -1).contiguous())

    def ce(out, mb):
        loss = tensor_parallel.vocab_parallel_cross_entropy(out[:, :-1].float().contiguous(),
                                                             mb.input_ids[:, 1:].to(out.device)).mean()
        return loss, {}

    before = {n: p.detach().clone() for c in built.chunks for n, p in c.named_parameters()}
    for c in built.chunks:
        c.train()
        c.zero_grad_buffer()
    opt.zero_grad()
    run_schedule(built.chunks, [mb], ce, forward_only=False, device=platform.device())
    opt.step()
    out = {"output_moved_max": 0.0, "others_moved_max": 0.0, "output_params": 0.0}
    for c in built.chunks:
        for n, p in c.named_parameters():
            d = (p.detach() - before[n]).abs().max().item()
            key = "output_moved_max" if n.endswith("output_layer.weight") else "others_moved_max"
            out[key] = max(out[key], d)
            out["output_params"] += float(n.endswith("output_layer.weight"))
    return _max_over_world(out)


def actor_step(hf_dir: str, layout: ParallelLayout) -> dict[str, float]:
    """Actor logprobs on packed rows equal transformers'; the first PPO step (with a reference-KL term)
    has ratio 1 (no clipping, zero approx KL); positive-advantage rows gain logprob, negative ones lose
    it; taking the old logprobs from the update's own forward gives the same step."""
    from megatron.core import parallel_state

    from megatron_matpo import platform
    from megatron_matpo.algo.loss import LossConfig
    from megatron_matpo.train.packing import Row, pack_rows
    from megatron_matpo.model.builder import build_model
    from megatron_matpo.train.actor import compute_logprobs, train_step
    from megatron_matpo.train.optim import OptimConfig, build_optimizer, ddp_config

    optim = OptimConfig(lr=1e-3, clip_grad=1.0)
    built = build_model(hf_dir, layout, load_weights=True, ddp_config=ddp_config(optim))
    opt = build_optimizer(built.chunks, optim)
    seqs = _sequences(built.provider.vocab_size, seed=5)
    hf = [torch.log_softmax(x, -1) for x in _hf_logits(hf_dir, seqs)]
    rows = []
    for i, (s, logp) in enumerate(zip(seqs, hf)):
        n = len(s)
        old = [0.0] + [logp[j - 1, s[j]].item() for j in range(1, n)]  # row convention: token j's logprob
        mask = [0] * (n // 2) + [1] * (n - n // 2)  # the "generated" half
        rows.append(Row(s.tolist(), mask, old, advantage=(1.0 if i != 1 else -1.0), row_id=i))
    pack = {"max_tokens_per_micro_batch": 64, "dp_size": 1, "cp_size": layout.cp}
    (mbs,) = pack_rows(rows, **pack)
    kl = LossConfig(kl_coef=0.05)  # a small reference-KL term in the loss: the trainer fuses with it on too

    def with_reference(packed):  # a reference policy 0.05 nats below the old one on the generated tokens
        for p in packed:
            p.ref_logprobs = p.old_logprobs - 0.05 * p.loss_mask
        return packed

    dev = platform.device()
    before = compute_logprobs(built.chunks, mbs, dev)
    stats = train_step(built.chunks, opt, with_reference(mbs), kl,
                       global_token_count=sum(sum(r.loss_mask) for r in rows), device=dev)
    after = compute_logprobs(built.chunks, mbs, dev)
    out = {"old_vs_actor": 0.0, "clip_frac": stats.get("clip_frac", 0.0), "approx_kl": stats.get("approx_kl", 0.0),
           "skipped": stats["step_skipped"], "gain_pos": 0.0, "gain_neg": 0.0}
    if parallel_state.is_pipeline_last_stage():
        gains = {}
        for p, b, a in zip(mbs, before, after):
            m = p.loss_mask.bool()
            out["old_vs_actor"] = max(out["old_vs_actor"], (b[m] - p.old_logprobs[m]).abs().max().item())
            for rid in p.row_ids[m].unique().tolist():
                sel = m & (p.row_ids == rid)
                gains[rid] = (a[sel] - b[sel]).mean().item()
        out["gain_pos"] = -min(gains[0], gains[2])  # reported negated: max over world keeps the worst
        out["gain_neg"] = gains[1]
    # the same first step with the old logprobs taken from the update's own forward (one mini-batch):
    # the same loss and gradient, and the parity against the batch's (here transformers') logprobs
    built2 = build_model(hf_dir, layout, load_weights=True, ddp_config=ddp_config(optim))
    (mbs2,) = pack_rows(rows, **pack)
    fused = train_step(built2.chunks, build_optimizer(built2.chunks, optim), with_reference(mbs2), kl,
                       global_token_count=sum(sum(r.loss_mask) for r in rows), device=dev, old_from_forward=True)
    out["kl_term"] = stats.get("kl", 0.0)
    out["fused_grad_norm_diff"] = abs(fused["grad_norm"] - stats["grad_norm"])
    out["fused_loss_diff"] = abs(fused.get("loss", 0.0) - stats.get("loss", 0.0))
    out["fused_ratio_off"] = abs(fused.get("ratio_mean", 1.0) - 1.0)
    out["fused_parity_max"] = fused.get("abs_diff_max", 0.0)
    out["fused_parity_tokens"] = fused.get("parity_tokens", 0.0)  # on the last stage
    out["grad_norm"] = stats["grad_norm"]
    # the off-policy correction (loss.off_policy, TIS at c = 2) on an engine that sampled from another
    # policy: its logprobs are the old ones minus 0.3 / 1.0 / -0.2 nats on the rows' generated tokens, so
    # at ratio 1 (fused) the loss is -sum_r A_r n_r min(e^d_r, 2) / N with the proximal policy from the
    # update's own forward (transformers' logprobs to 1e-5)
    from megatron_matpo.algo.off_policy import OffPolicyConfig

    built3 = build_model(hf_dir, layout, load_weights=True, ddp_config=ddp_config(optim))
    (mbs3,) = pack_rows(rows, **pack)
    shift = {0: 0.3, 1: 1.0, 2: -0.2}
    for p in mbs3:
        d = torch.tensor([shift.get(int(r), 0.0) for r in p.row_ids[0]]).unsqueeze(0)
        p.old_logprobs = p.old_logprobs - d * p.loss_mask
    n_tok = sum(sum(r.loss_mask) for r in rows)
    tis = train_step(built3.chunks, build_optimizer(built3.chunks, optim), mbs3,
                     LossConfig(off_policy=OffPolicyConfig(mode="tis", c=2.0)), global_token_count=n_tok, device=dev,
                     old_from_forward=True)
    out.update(tis_loss_err=0.0, tis_truncated_off=0.0, tis_ratio_mean_err=0.0, tis_tokens_off=0.0, tis_reported=0.0)
    if parallel_state.is_pipeline_last_stage() and "loss" in tis:
        out["tis_reported"] = 1.0
        want = -sum(r.advantage * sum(r.loss_mask) * min(math.exp(shift[r.row_id]), 2.0) for r in rows) / n_tok
        out["tis_loss_err"] = abs(tis["loss"] - want)
        out["tis_truncated_off"] = abs(tis["is_truncated_frac"] - sum(rows[1].loss_mask) / n_tok)
        want_mean = sum(sum(r.loss_mask) * math.exp(shift[r.row_id]) for r in rows) / n_tok
        out["tis_ratio_mean_err"] = abs(tis["is_ratio_mean"] - want_mean)
        out["tis_tokens_off"] = abs(tis["is_tokens"] - n_tok)
    # the paper's normalization (loss.agg=rollout-mean-token-mean) through the loss weights the trainer sets:
    # rows 0 and 1 one rollout (a planner and its worker), the others one each; at ratio 1 (the update's own
    # forward) the loss is -mean over rollouts of (sum_r A_r n_r / the rollout's tokens), whatever the weights
    import dataclasses

    from megatron_matpo.train.packing import set_loss_weights

    owner = {r.row_id: max(r.row_id - 1, 0) for r in rows}
    paper_rows = [dataclasses.replace(r, rollout_id=owner[r.row_id]) for r in rows]
    set_loss_weights(paper_rows, "rollout-mean-token-mean")
    (mbs4,) = pack_rows(paper_rows, **pack)
    paper = train_step(built3.chunks, build_optimizer(built3.chunks, optim), mbs4,
                       LossConfig(agg="rollout-mean-token-mean"), global_token_count=n_tok, device=dev,
                       old_from_forward=True)
    out.update(paper_loss_err=0.0, paper_reported=0.0)
    if parallel_state.is_pipeline_last_stage() and "loss" in paper:
        out["paper_reported"] = 1.0
        per: dict[int, list[float]] = {}
        for r in rows:
            n = sum(r.loss_mask[1:])
            got = per.setdefault(owner[r.row_id], [0.0, 0.0])
            got[0] += r.advantage * n
            got[1] += n
        want = -sum(a / n for a, n in per.values()) / len(per)
        out["paper_loss_err"] = abs(paper["loss"] - want)
    # rollouts sampled at temperature 0.7, whose engine logprobs are softmax(logits / 0.7)'s (SGLang 0.5.23):
    # the actor's logprobs at that temperature equal transformers' log_softmax(logits / 0.7), and the
    # update's own forward (temperature passed) matches them; at temperature 1 they would be far off
    temp = 0.7
    hot_lp = [torch.log_softmax(x / temp, -1) for x in _hf_logits(hf_dir, seqs)]
    hot_rows = [dataclasses.replace(r, old_logprobs=[0.0] + [lp[j - 1, s[j]].item() for j in range(1, len(s))])
                for r, s, lp in zip(rows, seqs, hot_lp)]
    built5 = build_model(hf_dir, layout, load_weights=True, ddp_config=ddp_config(optim))
    (mbs5,) = pack_rows(hot_rows, **pack)
    at_t, at_1 = compute_logprobs(built5.chunks, mbs5, dev, temperature=temp), compute_logprobs(built5.chunks, mbs5, dev)
    out.update(tempered_vs_hf=0.0, untempered_vs_hf=float("-inf"))  # the latter negated: the world's smallest
    if parallel_state.is_pipeline_last_stage():
        off = 0.0
        for p, a, b in zip(mbs5, at_t, at_1):
            m = p.loss_mask.bool()
            out["tempered_vs_hf"] = max(out["tempered_vs_hf"], (a[m] - p.old_logprobs[m]).abs().max().item())
            off = max(off, (b[m] - p.old_logprobs[m]).abs().max().item())
        out["untempered_vs_hf"] = -off
    hot = train_step(built5.chunks, build_optimizer(built5.chunks, optim), mbs5, LossConfig(), global_token_count=n_tok,
                     device=dev, old_from_forward=True, temperature=temp)
    out["tempered_fused_parity_max"] = hot.get("abs_diff_max", 0.0)
    return _max_over_world(out)


def critic_step(hf_dir: str, layout: ParallelLayout) -> dict[str, float]:
    """CriticWorker: its values equal transformers' final hidden states through the same head (an
    independent reference), at the loss positions of packed rows; three clipped value-loss steps
    (compared across layouts by the test) lower the loss."""
    from megatron.core import parallel_state

    from megatron_matpo.algo.loss import LossConfig
    from megatron_matpo.train.packing import Row, pack_rows
    from megatron_matpo.train.critic import CriticWorker
    from megatron_matpo.train.optim import OptimConfig
    from megatron_matpo.train.worker import WorkerSpec
    from transformers import AutoModelForCausalLM

    w = CriticWorker(WorkerSpec(model=hf_dir, layout=layout, optim=OptimConfig(lr=1e-4, weight_decay=0.0),
                                loss=LossConfig(value_clip=0.2)))
    w.build()
    hidden = w.built.provider.hidden_size
    g = torch.Generator().manual_seed(7)
    head_w, head_b = torch.randn(1, hidden, generator=g) * 0.2, torch.tensor([0.3])
    for c in w.built.chunks:
        inner = c.module if hasattr(c, "module") else c
        if inner.post_process:  # a random head, so the values are not trivially 0
            inner.output_layer.weight.data.copy_(head_w)
            inner.output_layer.bias.data.copy_(head_b)
    seqs = _sequences(w.built.provider.vocab_size, seed=5)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # V at position i = value of the state before token i+1
        ref_v = [(hf.model(s.unsqueeze(0)).last_hidden_state[0] @ head_w.T + head_b)[:, 0] for s in seqs]
    rows = []
    for i, s in enumerate(seqs):
        n = len(s)
        mask = [0] * (n // 2) + [1] * (n - n // 2)
        old_v = [0.0] + ref_v[i][:-1].tolist()  # row convention: token j's value sits at position j-1
        rows.append(Row(s.tolist(), mask, [0.0] * n, advantage=0.0, row_id=i, reward=1.0,
                        returns=[float(i) - 1.0] * n, old_values=old_v))
    packed = pack_rows(rows, max_tokens_per_micro_batch=64, dp_size=1, pad_to_multiple=layout.tp, cp_size=layout.cp)
    w.load_batch([packed[0]])
    got = w.values()
    out = {"value_vs_hf": 0.0, "rows": float(len(got))}
    for rid, v in got.items():
        pos = [j for j, m in enumerate(rows[rid].loss_mask) if m]
        expect = ref_v[rid][[j - 1 for j in pos]]
        out["value_vs_hf"] = max(out["value_vs_hf"], (torch.as_tensor(v) - expect).abs().max().item())
    count = sum(sum(r.loss_mask) for r in rows)
    for step in range(3):
        w.load_batch([packed[0]])
        (stats,) = w.train([count])
        out[f"value_loss{step}"] = stats.get("value_loss", 0.0)
        out[f"skipped{step}"] = stats.get("step_skipped", 0.0)  # ranks other than 0 and the reporters: {}
    # checkpoint round trip: a fresh critic loading the saved step gives the trained critic's values
    import tempfile

    from megatron_matpo.train.checkpoint import latest_checkpoint

    where = [tempfile.mkdtemp(prefix="critic-ckpt-") if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(where, src=0)
    w.save(where[0], 3, {"step": 3}, keep_last=1)
    w.load_batch([packed[0]])
    trained = w.values()
    w2 = CriticWorker(w.spec)
    w2.build()
    w2.load(str(latest_checkpoint(where[0])))
    w2.load_batch([packed[0]])
    restored = w2.values()
    out["resume_diff"] = max((float(abs(torch.as_tensor(trained[k]) - torch.as_tensor(restored[k])).max())
                              for k in trained), default=0.0)
    out["trained_vs_initial"] = max((float(abs(torch.as_tensor(trained[k]) - torch.as_tensor(got[k])).max())
                                     for k in trained), default=0.0)
    if not parallel_state.is_pipeline_last_stage():
        out["rows"] = 0.0
    return _max_over_world(out)


def verifier_step(hf_dir: str, layout: ParallelLayout, work_dir: str) -> dict[str, float]:
    """`matpo train-verifier`'s model (VerifierWorker: the bias-free score head): three BCE steps on packed
    rows, then its HF sequence-classification export; transformers on the export scores the rows as the
    Megatron model does (an independent reference for the sharded forward and the export)."""
    import json

    from megatron.core import parallel_state
    from transformers import AutoModelForSequenceClassification

    from megatron_matpo.train.actor import optimizer_step
    from megatron_matpo.train.optim import OptimConfig
    from megatron_matpo.train.packing import pack_rows
    from megatron_matpo.train.worker import WorkerSpec
    from megatron_matpo.verifier.export import export_verifier_hf
    from megatron_matpo.verifier.train import VerifierWorker, answer_rows, bce_loss, score_rows

    w = VerifierWorker(WorkerSpec(model=hf_dir, layout=layout, optim=OptimConfig(lr=1e-2, weight_decay=0.0)))
    w.build()
    pad = json.loads((Path(hf_dir) / "config.json").read_text()).get("pad_token_id")
    seqs = [torch.where(s == pad, 0, s) for s in _sequences(w.built.provider.vocab_size, seed=9)]  # no pad token
    rows = answer_rows([{"input_ids": s.tolist(), "label": i % 2} for i, s in enumerate(seqs)])
    labels = {r.row_id: float(r.advantage) for r in rows}
    out = {}
    for step in range(3):
        packed = pack_rows(rows, 256, layout.dp, pad_to_multiple=layout.tp)[parallel_state.get_data_parallel_rank()]
        reported, _ = optimizer_step(w.built.chunks, w.optimizer, packed, bce_loss(labels, len(rows)), w.device)
        out[f"bce{step}"] = sum(float(r["bce_sum"]) for r in reported) / len(rows)  # the reporting rank's
    got = score_rows(w, rows, 256)
    where = f"{work_dir}/verifier-tp{layout.tp}pp{layout.pp}"
    export_verifier_hf(w.built, where, hf_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(where, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [hf(s.unsqueeze(0)).logits.item() for s in seqs]
    out["score_vs_hf"] = max(abs(a - b) for a, b in zip(got, ref))
    out["score_spread"] = max(got) - min(got)
    out["rows"] = float(len(got))
    return _max_over_world(out)


def world_checks(hf_dirs: dict[str, str], phases: list[tuple[str, ParallelLayout]],
                 work_dir: str = "") -> dict[str, dict]:
    """Run several checks in one launched world, re-forming megatron's groups for each layout
    (one process start-up, which dominates on CPU, serves every layout of this world size)."""
    from megatron.core import parallel_state

    from megatron_matpo.dist import init_megatron

    results = {}
    for name, layout in phases:
        init_megatron(layout)
        if name == "logits":
            res = logits_vs_hf(hf_dirs, layout)
        elif name == "logits_bf16":
            res = logits_vs_hf(hf_dirs, layout, torch.bfloat16)
        elif name == "train_bf16":
            res = train_losses(hf_dirs["qwen3"], layout, dtype=torch.bfloat16)
        elif name == "packed_backward":
            res = packed_backward(hf_dirs["qwen3"], layout)
        elif name == "roundtrip":  # HF -> megatron dist ckpt -> HF, every architecture
            from megatron_matpo.convert import hf_to_megatron_on_ranks, megatron_to_hf_on_ranks

            for arch, hf_dir in hf_dirs.items():
                if arch == "qwen3-odd":  # its round trip is vocab_padding's (a world of 2)
                    continue
                ckpt, back = f"{work_dir}/{arch}-mcore", f"{work_dir}/{arch}-hf"
                hf_to_megatron_on_ranks(hf_dir, ckpt, layout)
                megatron_to_hf_on_ranks(ckpt, back, layout)
            res = {}
        elif name == "vocab_padding":
            res = vocab_padding(hf_dirs["qwen3-odd"], layout, work_dir)
        elif name == "reshard":
            res = reshard_vs_hf(hf_dirs, layout)
        elif name == "vocab_padding_reshard":  # after vocab_padding
            res = vocab_padding_reshard(hf_dirs["qwen3-odd"], layout, work_dir)
        elif name == "train":
            res = train_losses(hf_dirs["qwen3"], layout)
        elif name == "train_recompute":  # full activation recompute: same losses, less memory
            res = train_losses(hf_dirs["qwen3"], layout, recompute="full")
        elif name == "train_packed":
            res = train_packed(hf_dirs["qwen3"], layout)
        elif name == "output_lr":
            res = output_layer_lr_step(hf_dirs["qwen3"], layout)
        elif name == "actor":
            res = actor_step(hf_dirs["qwen3"], layout)
        elif name == "critic":
            res = critic_step(hf_dirs["qwen3"], layout)
        elif name == "verifier":
            res = verifier_step(hf_dirs["qwen3"], layout, work_dir)
        else:
            raise ValueError(name)
        results[f"{name}@{layout.tag}"] = res
        parallel_state.destroy_model_parallel()
    return results


def die_on_rank_1() -> str:
    """Rank 1 exits without reporting (as an OOM kill would); rank 0 would wait for it for ever."""
    if int(os.environ["RANK"]) == 1:
        os._exit(3)
    time.sleep(600)
    return "unreachable"
