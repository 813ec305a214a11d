"""Packing training rows (planner and worker turns of very different lengths) into THD micro-batches.

Pipeline: rows -> DP ranks (Karmarkar–Karp on token counts) -> micro-batches per rank
(first-fit-decreasing under a token budget) -> equal micro-batch count on every rank -> packed
tensors aligned with `MicroBatch.input_ids`.

Per-row convention (`Row`): index j refers to token j. `loss_mask[j] = 1` when token j was generated
by the policy and must be trained; `old_logprobs[j]` / `ref_logprobs[j]` are the log-probabilities of
token j given tokens < j (entry 0 has no prediction and is ignored).

Packed convention (`PackedMicroBatch`): the model's logits at packed position i predict token i+1 of
the same sequence, so every per-token tensor is shifted to the predicting position:
`labels[i] = token[i+1]`, `loss_mask[i] = row.loss_mask[j+1]`, `old_logprobs[i] = row.old_logprobs[j+1]`
(j = i's index within its row). The last position of each sequence predicts nothing: label
`IGNORE_LABEL` (0, a valid vocab index so a vocab-parallel gather never goes out of range) and mask 0.

Context parallelism (`cp_size` > 1): each row's segment is padded to a multiple of 2·cp (padding
tokens after its last token, row id `PAD_ROW_ID`, mask 0: causal attention keeps them out of the
row's logits) and the packed length to a multiple of `pad_to_multiple`·2·cp, so every CP rank's part
(`shard_for_cp`, model/context_parallel.py's layout) is a multiple of `pad_to_multiple`. The budget
counts the whole packed length, padding included, before the CP split.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
from dataclasses import dataclass

import torch

from megatron_matpo.model.forward import MicroBatch, pack_sequences

IGNORE_LABEL = 0  # label of positions that predict nothing; the loss mask is what excludes them
PAD_ROW_ID = -1  # row id of dummy (padding) tokens


@dataclass
class Row:
    """One training sequence (a planner or worker rollout) with its per-token RL data."""
    token_ids: list[int]
    loss_mask: list[int]
    old_logprobs: list[float]
    advantage: float | list[float]  # one per row, broadcast to its tokens, or one per token (GAE)
    ref_logprobs: list[float] | None = None
    row_id: int | None = None  # defaults to the row's index in the list given to `pack_rows`
    role: str | None = None  # "planner" / "worker" / "single" / "agent<i>"; per-role metrics ("policy" if None)
    # tokens whose `old_logprobs` came from an unconstrained engine distribution (train/rollout
    # parity is measured there); defaults to `loss_mask`
    parity_mask: list[int] | None = None
    # the row's scalar reward (GAE puts it on the last generated token), or one per turn (a maximal run of
    # loss tokens) for a row holding several turns (MAPoRL), each its own GAE episode
    reward: float | list[float] | None = None
    returns: list[float] | None = None  # per token: the critic's regression target (GAE)
    old_values: list[float] | None = None  # per token: the critic's value before this step's update
    # the engines' weights that sampled every generated token of the row: those after step `policy_version`
    # (train/pipeline.py; a sync never overlaps a rollout, so one version holds for the whole row)
    policy_version: int | None = None
    # the rollout the row belongs to (a MATPO planner sample and its workers share one; loss.agg rollout-mean)
    rollout_id: int | None = None
    # the weight of each of its loss tokens in its mini-batch's loss (algo.loss.row_loss_weights); None: the
    # token mean over the mini-batch's global token count
    loss_weight: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class PackedMicroBatch:
    """A THD micro-batch plus the loss inputs, each [1, t] and aligned with `micro_batch.input_ids`.

    `micro_batch.extras` holds the same tensors (by name) so a megatron loss function that only sees
    the `MicroBatch` can read them.
    """
    micro_batch: MicroBatch
    labels: torch.Tensor  # long; token predicted at each position (IGNORE_LABEL at sequence ends)
    loss_mask: torch.Tensor  # float32; 1 where the predicted token is trained
    old_logprobs: torch.Tensor  # float32; rollout-policy logprob of the predicted token
    advantages: torch.Tensor  # float32; advantage of the predicted token (a row scalar: on every position)
    ref_logprobs: torch.Tensor | None  # float32 or None when no row had them
    row_ids: torch.Tensor  # long; owning row, PAD_ROW_ID for dummy tokens
    num_loss_tokens: int
    parity_mask: torch.Tensor | None = None  # float32; positions counted in train/rollout parity
    roles: dict[int, str] | None = None  # row id → its role, for per-role metrics
    returns: torch.Tensor | None = None  # float32; critic target of the predicted token (GAE rows)
    old_values: torch.Tensor | None = None  # float32; critic value at the position, before the update
    # the engine's sampling logprobs once `old_logprobs` were recomputed by the actor (the behaviour
    # policy of the off-policy correction); None: `old_logprobs` still are the engine's
    rollout_logprobs: torch.Tensor | None = None
    loss_weights: torch.Tensor | None = None  # float32; the row's `loss_weight` on each of its positions

    @property
    def behaviour_logprobs(self) -> torch.Tensor:
        return self.old_logprobs if self.rollout_logprobs is None else self.rollout_logprobs

    @property
    def num_tokens(self) -> int:
        """Packed length, padding included."""
        return self.micro_batch.seq_length

    @property
    def num_real_tokens(self) -> int:
        return int((self.row_ids != PAD_ROW_ID).sum())


# ---------------------------------------------------------------- validation


def _check_rows(rows: list[Row], capacity: int, budget: int, seq_multiple: int = 1) -> None:
    for idx, r in enumerate(rows):
        rid = r.row_id if r.row_id is not None else idx
        n = len(r.token_ids)
        if n == 0:
            raise ValueError(f"row {rid} (index {idx}) is empty")
        for name in ("loss_mask", "old_logprobs", "ref_logprobs", "parity_mask", "returns", "old_values"):
            v = getattr(r, name)
            if v is not None and len(v) != n:
                raise ValueError(f"row {rid} (index {idx}): {name} has {len(v)} entries, token_ids has {n}")
        if isinstance(r.advantage, list) and len(r.advantage) != n:
            raise ValueError(f"row {rid} (index {idx}): advantage has {len(r.advantage)} entries, token_ids has {n}")
        if _padded_len(n, seq_multiple) > capacity:
            extra = "" if capacity == budget else f" (budget rounded down to the pad multiple: {capacity})"
            padded = "" if seq_multiple == 1 else f" ({_padded_len(n, seq_multiple)} padded to 2*cp)"
            raise ValueError(
                f"row {rid} (index {idx}) has {n} tokens{padded}, more than max_tokens_per_micro_batch={budget}"
                f"{extra}; raise the budget or truncate the row")
    ids = [r.row_id if r.row_id is not None else i for i, r in enumerate(rows)]
    if len(set(ids)) != len(ids):
        raise ValueError("row ids must be unique")
    if any(i < 0 for i in ids):
        raise ValueError("row ids must be >= 0 (negative ids mark padding)")


# ---------------------------------------------------------------- assignment


def partition_karmarkar_karp(sizes: list[int], k: int) -> list[list[int]]:
    """Split item indices into k groups with near-equal size sums (largest differencing method).

    Each heap entry is a k-way partial partition; the two with the largest spread are merged by
    pairing the heaviest groups of one with the lightest of the other, which cancels their spreads.
    """
    if not sizes:
        return [[] for _ in range(k)]
    counter = itertools.count()  # tie-breaker: deterministic and never compares the lists
    heap = []
    for i, s in enumerate(sizes):
        groups = [(s, [i])] + [(0, []) for _ in range(k - 1)]
        heapq.heappush(heap, (-s, next(counter), groups))
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        a = sorted(a, key=lambda g: g[0], reverse=True)
        b = sorted(b, key=lambda g: g[0])
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, b)]
        spread = max(g[0] for g in merged) - min(g[0] for g in merged)
        heapq.heappush(heap, (-spread, next(counter), merged))
    groups = sorted(heap[0][2], key=lambda g: g[0], reverse=True)
    return [sorted(ix) for _, ix in groups]


def partition_longest_first(sizes: list[int], k: int) -> list[list[int]]:
    """Greedy: each item, longest first, onto the currently least-loaded group."""
    heap = [(0, g) for g in range(k)]
    groups: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(range(len(sizes)), key=lambda i: sizes[i], reverse=True):
        load, g = heapq.heappop(heap)
        groups[g].append(i)
        heapq.heappush(heap, (load + sizes[i], g))
    return [sorted(g) for g in groups]


def balance_ranks(sizes: list[int], k: int) -> list[list[int]]:
    """The better (lower max load) of Karmarkar–Karp and longest-first; neither dominates on small
    inputs and both are cheap next to a training step."""
    def max_load(parts: list[list[int]]) -> int:
        return max(sum(sizes[i] for i in p) for p in parts)

    return min(partition_karmarkar_karp(sizes, k), partition_longest_first(sizes, k), key=max_load)


def first_fit_decreasing(indices: list[int], sizes: list[int], capacity: int) -> list[list[int]]:
    """Bin-pack items (all <= capacity) into bins of total size <= capacity."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(indices, key=lambda i: sizes[i], reverse=True):
        for b, load in enumerate(loads):
            if load + sizes[i] <= capacity:
                bins[b].append(i)
                loads[b] += sizes[i]
                break
        else:
            bins.append([i])
            loads.append(sizes[i])
    return bins


def _split_in_two(bin_: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
    """Greedy two-way balanced split of a bin with >= 2 items."""
    halves: tuple[list[int], list[int]] = ([], [])
    loads = [0, 0]
    for i in sorted(bin_, key=lambda i: sizes[i], reverse=True):
        h = 0 if loads[0] <= loads[1] else 1
        halves[h].append(i)
        loads[h] += sizes[i]
    return halves


def equalize_bins(rank_bins: list[list[list[int]]], sizes: list[int]) -> list[list[list[int] | None]]:
    """Give every rank the same number of bins; `None` stands for a padding micro-batch.

    Ranks short of bins first split their largest multi-row bin in two: this keeps every slot a real
    token (no wasted compute) and only shrinks micro-batches, so the budget still holds. Only when a
    rank has no bin left with two rows (a sequence cannot be cut without changing its attention)
    does it get a padding micro-batch: a short dummy sequence with loss mask 0, which contributes
    nothing to the gradient but lets the pipeline schedule and the DP all-reduce line up.
    """
    target = max((len(b) for b in rank_bins), default=0)
    out: list[list[list[int] | None]] = []
    for bins in rank_bins:
        bins = [list(b) for b in bins]
        while len(bins) < target:
            splittable = [b for b in bins if len(b) >= 2]
            if not splittable:
                break
            big = max(splittable, key=lambda b: sum(sizes[i] for i in b))
            bins.remove(big)
            bins.extend(_split_in_two(big, sizes))
        bins.sort(key=lambda b: sum(sizes[i] for i in b), reverse=True)
        out.append(bins + [None] * (target - len(bins)))
    return out


# ---------------------------------------------------------------- tensors


def _shifted(values: list, fill) -> list:
    """Values of token j+1 at position j; the last position gets `fill`."""
    return list(values[1:]) + [fill]


def _padded_len(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def cp_row_multiple(cp_size: int) -> int:
    """What each row is padded to under context parallelism (2·cp; 1 without)."""
    return 2 * cp_size if cp_size > 1 else 1


def packed_capacity(max_tokens_per_micro_batch: int, pad_to_multiple: int = 1, cp_size: int = 1) -> int:
    """The packing budget as `pack_rows` uses it: rounded down to the micro-batch pad multiple."""
    multiple = pad_to_multiple * cp_row_multiple(cp_size)
    return max_tokens_per_micro_batch // multiple * multiple


def padded_row_len(n: int, cp_size: int = 1) -> int:
    """A row of `n` tokens as packed: padded to 2·cp under context parallelism."""
    return _padded_len(n, cp_row_multiple(cp_size))


def _pad_values(n: int, labels, mask, old, ref, adv, ret, val, wts, owner, parity) -> None:
    """Append `n` padding positions (predict nothing, train nothing) to the per-position lists."""
    labels += [IGNORE_LABEL] * n
    mask += [0] * n
    parity += [0] * n
    owner += [PAD_ROW_ID] * n
    for xs in (old, ref, adv, ret, val, wts):
        if xs is not None:
            xs += [0.0] * n


def _build(rows: list[Row], ids: list[int], pad_to_multiple: int, pad_token_id: int,
           with_ref: bool, with_weights: bool, seq_multiple: int = 1) -> PackedMicroBatch:
    seqs, labels, mask, old, ref, adv, owner, parity = [], [], [], [], [], [], [], []
    with_values = any(r.returns is not None for r in rows)
    ret, val, wts = [], [], []
    for r, rid in zip(rows, ids):
        n = len(r.token_ids)
        seqs.append(torch.tensor(r.token_ids, dtype=torch.long))
        labels += _shifted(r.token_ids, IGNORE_LABEL)
        mask += _shifted(r.loss_mask, 0)
        parity += _shifted(r.parity_mask if r.parity_mask is not None else r.loss_mask, 0)
        old += _shifted(r.old_logprobs, 0.0)
        ref += _shifted(r.ref_logprobs, 0.0) if r.ref_logprobs is not None else [0.0] * n
        adv += _shifted(r.advantage, 0.0) if isinstance(r.advantage, list) else [float(r.advantage)] * n
        if with_values:
            if r.returns is None or r.old_values is None:
                raise ValueError(f"row {rid}: a batch with critic targets needs returns and old_values on every row")
            ret += _shifted(r.returns, 0.0)
            val += _shifted(r.old_values, 0.0)
        if with_weights:
            if r.loss_weight is None:
                raise ValueError(f"row {rid}: a batch with loss weights needs one on every row")
            wts += [float(r.loss_weight)] * n
        owner += [rid] * n
        extra = _padded_len(n, seq_multiple) - n  # CP: the row's segment to a multiple of 2·cp
        if extra:
            seqs[-1] = torch.cat([seqs[-1], torch.full((extra,), pad_token_id, dtype=torch.long)])
            _pad_values(extra, labels, mask, old, ref, adv, ret if with_values else None,
                        val if with_values else None, wts if with_weights else None, owner, parity)
    total = len(owner)
    # Dummy segment (own cu_seqlens entry so it attends to nothing real): rounds the packed length
    # up to the TP / sequence-parallel multiple, or is the whole micro-batch of a padding one.
    pad = (-total) % pad_to_multiple if total else pad_to_multiple
    if pad:
        seqs.append(torch.full((pad,), pad_token_id, dtype=torch.long))
        _pad_values(pad, labels, mask, old, ref, adv, ret if with_values else None, val if with_values else None,
                    wts if with_weights else None, owner, parity)
    mb = pack_sequences(seqs)

    def t(x, dtype):
        return torch.tensor(x, dtype=dtype).unsqueeze(0)

    loss_mask = t(mask, torch.float32)
    pmb = PackedMicroBatch(
        micro_batch=mb, labels=t(labels, torch.long), loss_mask=loss_mask,
        old_logprobs=t(old, torch.float32), advantages=t(adv, torch.float32),
        ref_logprobs=t(ref, torch.float32) if with_ref else None, row_ids=t(owner, torch.long),
        num_loss_tokens=int(loss_mask.sum()), parity_mask=t(parity, torch.float32),
        roles={rid: r.role or "policy" for r, rid in zip(rows, ids)},
        returns=t(ret, torch.float32) if with_values else None,
        old_values=t(val, torch.float32) if with_values else None,
        loss_weights=t(wts, torch.float32) if with_weights else None)
    mb.extras = {"labels": pmb.labels, "loss_mask": pmb.loss_mask, "old_logprobs": pmb.old_logprobs,
                 "advantages": pmb.advantages, "ref_logprobs": pmb.ref_logprobs, "row_ids": pmb.row_ids,
                 "num_loss_tokens": pmb.num_loss_tokens, "loss_weights": pmb.loss_weights}
    return pmb


# ---------------------------------------------------------------- public API


def pack_rows(rows: list[Row], max_tokens_per_micro_batch: int, dp_size: int, pad_to_multiple: int = 1,
              equalize_micro_batches: bool = True, pad_token_id: int = 0,
              cp_size: int = 1) -> list[list[PackedMicroBatch]]:
    """Pack `rows` into THD micro-batches for each DP rank; returns `[rank][micro_batch]`.

    Every packed length, padding included, is <= `max_tokens_per_micro_batch` (when padding, rows are
    binned against the budget rounded down to a multiple of `pad_to_multiple`, × 2·`cp_size` with
    context parallelism). A row longer than that raises ValueError: nothing is truncated silently.
    With `equalize_micro_batches` all ranks return the same number of micro-batches (see
    `equalize_bins`). The micro-batches are whole: each CP rank takes its part with `shard_for_cp`.
    """
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    seq_multiple = cp_row_multiple(cp_size)
    multiple = pad_to_multiple * seq_multiple
    capacity = packed_capacity(max_tokens_per_micro_batch, pad_to_multiple, cp_size)
    if capacity < 1:
        raise ValueError(f"max_tokens_per_micro_batch={max_tokens_per_micro_batch} is smaller than"
                         f" the pad multiple {multiple} (pad_to_multiple={pad_to_multiple}, cp={cp_size})")
    _check_rows(rows, capacity, max_tokens_per_micro_batch, seq_multiple)
    sizes = [_padded_len(len(r), seq_multiple) for r in rows]
    ids = [r.row_id if r.row_id is not None else i for i, r in enumerate(rows)]
    with_ref = any(r.ref_logprobs is not None for r in rows)
    with_weights = any(r.loss_weight is not None for r in rows)  # then padding micro-batches carry zeros too

    ranks = balance_ranks(sizes, dp_size)
    rank_bins = [first_fit_decreasing(ix, sizes, capacity) for ix in ranks]
    if equalize_micro_batches:
        rank_bins = equalize_bins(rank_bins, sizes)
    return [[_build([rows[i] for i in b or []], [ids[i] for i in b or []], multiple,
                    pad_token_id, with_ref, with_weights, seq_multiple) for b in bins] for bins in rank_bins]


_PER_POSITION = ("labels", "loss_mask", "old_logprobs", "advantages", "ref_logprobs", "row_ids", "parity_mask",
                 "returns", "old_values", "rollout_logprobs", "loss_weights")


def shard_for_cp(p: PackedMicroBatch, cp: int, rank: int) -> PackedMicroBatch:
    """CP rank `rank`'s part of a whole packed micro-batch: two chunks of every sequence
    (model/context_parallel.py), every per-position tensor alike; `cu_seqlens` stay global."""
    if cp == 1:
        return p
    from megatron_matpo.model.context_parallel import zigzag_index

    idx = zigzag_index(p.micro_batch.cu_seqlens.tolist(), cp, rank)  # once for every tensor below
    part = {name: None if getattr(p, name) is None else getattr(p, name).index_select(1, idx)
            for name in _PER_POSITION}
    mb = MicroBatch(p.micro_batch.input_ids.index_select(1, idx), p.micro_batch.position_ids.index_select(1, idx),
                    p.micro_batch.cu_seqlens, cp_size=cp)
    out = dataclasses.replace(p, micro_batch=mb, num_loss_tokens=int(part["loss_mask"].sum()), **part)
    mb.extras = {**(p.micro_batch.extras or {}), **{k: part[k] for k in ("labels", "loss_mask", "old_logprobs",
                 "advantages", "ref_logprobs", "row_ids", "loss_weights")}, "num_loss_tokens": out.num_loss_tokens}
    return out


def set_loss_weights(rows: list[Row], agg: str) -> None:
    """Each row's `loss_weight` for one mini-batch's `rows` under `loss.agg` (algo.loss.row_loss_weights),
    counted over the tokens packing trains (a row's first token is never predicted)."""
    from megatron_matpo.algo.loss import row_loss_weights

    weights = row_loss_weights([sum(r.loss_mask[1:]) for r in rows], agg, [r.rollout_id for r in rows])
    for r, w in zip(rows, weights):
        r.loss_weight = w


def packing_stats(packed: list[list[PackedMicroBatch]]) -> dict:
    """Efficiency of a packing: real-token fraction, DP imbalance, micro-batch counts and sizes."""
    slots = [mb.num_tokens for rank in packed for mb in rank]
    real_per_rank = [sum(mb.num_real_tokens for mb in rank) for rank in packed]
    total_real, total_slots = sum(real_per_rank), sum(slots)
    mean_rank = total_real / len(packed) if packed else 0.0
    return {
        "real_tokens": total_real,
        "packed_tokens": total_slots,
        "real_token_fraction": total_real / total_slots if total_slots else 1.0,
        "loss_tokens": sum(mb.num_loss_tokens for rank in packed for mb in rank),
        "tokens_per_rank": real_per_rank,
        "dp_imbalance": max(real_per_rank) / mean_rank if mean_rank else 1.0,
        "micro_batches_per_rank": [len(rank) for rank in packed],
        "tokens_per_micro_batch_min": min(slots, default=0),
        "tokens_per_micro_batch_mean": total_slots / len(slots) if slots else 0.0,
        "tokens_per_micro_batch_max": max(slots, default=0),
    }
