"""Running Megatron model chunks on batches: padded (BSHD) or packed (THD, `cu_seqlens`), through
megatron-core's pipeline schedules so the same call works for any TP × PP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class MicroBatch:
    """One micro-batch as the model consumes it.

    Padded: `input_ids`/`position_ids` are [b, s] and `cu_seqlens` is None.
    Packed: they are [1, t] (all sequences concatenated, positions restarting at 0) and `cu_seqlens`
    holds the sequence boundaries [0, l0, l0+l1, ...].
    """
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    extras: dict | None = None  # labels, masks, old logprobs... for the loss function
    # > 1: a context-parallel rank's part (two chunks of every sequence, model/context_parallel.py);
    # `cu_seqlens` are then the whole micro-batch's boundaries
    cp_size: int = 1

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def seq_length(self) -> int:
        return self.input_ids.shape[1]

    def packed_seq_params(self):
        if self.cu_seqlens is None:
            return None
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = self.cu_seqlens.to(torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        padded = cu if self.cp_size > 1 else None  # TE's CP attention reads the padded boundaries
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=padded,
                               cu_seqlens_kv_padded=padded, max_seqlen_q=max_len, max_seqlen_kv=max_len)


def pack_sequences(seqs: list[torch.Tensor]) -> MicroBatch:
    """Concatenate 1-D token sequences into one THD micro-batch."""
    lens = torch.tensor([len(s) for s in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    ids = torch.cat(seqs).unsqueeze(0)
    pos = torch.cat([torch.arange(len(s)) for s in seqs]).unsqueeze(0)
    return MicroBatch(ids, pos, cu)


def pad_sequences(seqs: list[torch.Tensor], pad_id: int = 0) -> MicroBatch:
    """Right-pad 1-D token sequences into a [b, s] micro-batch (causal attention, so the padding
    after a sequence never changes that sequence's logits)."""
    s = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), s), pad_id, dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = x
    pos = torch.arange(s).unsqueeze(0).expand(len(seqs), -1).contiguous()
    return MicroBatch(ids, pos)


def model_forward(chunk, mb: MicroBatch, device: torch.device):
    return chunk(input_ids=mb.input_ids.to(device), position_ids=mb.position_ids.to(device),
                 attention_mask=None, packed_seq_params=mb.packed_seq_params())


LossFn = Callable[[torch.Tensor, MicroBatch], tuple]


def run_schedule(chunks: list, micro_batches: list[MicroBatch], loss_fn: LossFn, *, forward_only: bool,
                 device: torch.device, with_each: list | None = None) -> list:
    """Forward (and backward unless `forward_only`) over `micro_batches` with megatron's schedule.

    `loss_fn(output, mb)` runs on the last pipeline stage with the vocab-parallel logits and
    returns what megatron expects from a loss function: `(loss, num_tokens, reported)` or
    `(loss, reported)`; with `with_each` (one item per micro-batch, e.g. the packed batch it came
    from) it gets that item instead of `mb`. Returns the list of `reported` values (last stage only;
    empty elsewhere). All micro-batches must have the same shape when PP > 1 (the pipeline's p2p
    buffers are sized once per call).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if with_each is not None and len(with_each) != len(micro_batches):
        raise ValueError(f"with_each: {len(with_each)} items for {len(micro_batches)} micro-batches")
    it = iter(zip(micro_batches, with_each if with_each is not None else micro_batches))

    def step(data_iterator, model):
        mb, item = next(data_iterator)
        return model_forward(model, mb, device), lambda out: loss_fn(out, item)

    first = micro_batches[0]
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=it, model=chunks, num_microbatches=len(micro_batches),
        seq_length=first.seq_length, micro_batch_size=first.input_ids.shape[0], forward_only=forward_only)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from vocab-parallel shards (tests, evaluation; training avoids this)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)


def full_logits(chunks: list, micro_batches: list[MicroBatch], device: torch.device) -> list[torch.Tensor] | None:
    """Full-vocabulary logits per micro-batch on the last pipeline stage, None on other stages."""
    from megatron.core import parallel_state

    def keep(out, mb):
        return torch.zeros((), device=out.device), {"logits": gather_vocab(out).detach().float().cpu()}

    for c in chunks:
        c.eval()
    with torch.no_grad():
        reported = run_schedule(chunks, micro_batches, keep, forward_only=True, device=device)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return [r["logits"] for r in reported]
