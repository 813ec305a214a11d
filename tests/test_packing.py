import random

import pytest
import torch

from megatron_matpo.train.packing import (
    IGNORE_LABEL, PAD_ROW_ID, PackedMicroBatch, Row, balance_ranks, equalize_bins, pack_rows, packing_stats,
    partition_karmarkar_karp, partition_longest_first, shard_for_cp,
)
from megatron_matpo.model.context_parallel import zigzag_index


def make_row(n: int, rng: random.Random, row_id: int | None = None, role: str = "worker",
             with_ref: bool = True) -> Row:
    prompt = rng.randint(1, max(1, n // 2))
    return Row(token_ids=[rng.randrange(1, 50_000) for _ in range(n)],
               loss_mask=[0] * prompt + [1] * (n - prompt),
               old_logprobs=[-rng.random() for _ in range(n)], advantage=rng.uniform(-1, 1),
               ref_logprobs=[-rng.random() for _ in range(n)] if with_ref else None, row_id=row_id, role=role)


def matpo_mix(seed: int = 0, planners: int = 64) -> list[Row]:
    """Planner rows of 1-4k tokens, each with 0-6 worker rows of 0.5-8k tokens (long-tailed)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(planners):
        rows.append(make_row(rng.randint(1000, 4000), rng, len(rows), "planner", with_ref=False))
        for _ in range(rng.randint(0, 6)):
            n = int(min(8000, 500 + rng.lognormvariate(7.0, 0.9)))  # median ~1.6k, tail to 8k
            rows.append(make_row(n, rng, len(rows), "worker", with_ref=False))
    return rows


def unpack(packed: list[list[PackedMicroBatch]]) -> dict[int, dict]:
    """Rebuild each row from the packed stream, undoing the one-position shift."""
    out = {}
    for rank in packed:
        for p in rank:
            cu = p.micro_batch.cu_seqlens.tolist()
            for s, e in zip(cu[:-1], cu[1:]):
                rid = int(p.row_ids[0, s])
                assert (p.row_ids[0, s:e] == rid).all()
                assert p.micro_batch.position_ids[0, s:e].tolist() == list(range(e - s))
                if rid == PAD_ROW_ID:
                    continue
                assert rid not in out, f"row {rid} packed twice"
                ids = p.micro_batch.input_ids[0, s:e].tolist()
                assert p.labels[0, s:e - 1].tolist() == ids[1:]
                mask = p.loss_mask[0, s:e].tolist()
                adv = p.advantages[0, s:e].unique()
                assert len(adv) == 1
                out[rid] = {
                    "token_ids": ids,
                    "loss_mask_tail": [int(m) for m in mask[:-1]],  # entry 0 of the row has no prediction
                    "old_tail": p.old_logprobs[0, s:e - 1],
                    "ref_tail": None if p.ref_logprobs is None else p.ref_logprobs[0, s:e - 1],
                    "advantage": float(adv),
                    "end_label": int(p.labels[0, e - 1]), "end_mask": mask[-1],
                }
    return out


def check_roundtrip(rows: list[Row], packed) -> None:
    got = unpack(packed)
    assert sorted(got) == sorted(r.row_id for r in rows)
    for r in rows:
        g = got[r.row_id]
        assert g["token_ids"] == r.token_ids
        assert g["loss_mask_tail"] == r.loss_mask[1:]
        assert torch.allclose(g["old_tail"], torch.tensor(r.old_logprobs[1:]))
        if r.ref_logprobs is not None:
            assert torch.allclose(g["ref_tail"], torch.tensor(r.ref_logprobs[1:]))
        assert g["advantage"] == pytest.approx(r.advantage)
        assert g["end_label"] == IGNORE_LABEL and g["end_mask"] == 0


@pytest.mark.parametrize("dp,budget,mult", [(1, 300, 1), (3, 257, 1), (4, 512, 8), (8, 100, 4)])
def test_roundtrip_budget_and_equal_counts(dp, budget, mult):
    rng = random.Random(dp * 1000 + budget)
    rows = [make_row(rng.randint(1, budget // mult * mult), rng, 7 * i + 3) for i in range(40)]
    packed = pack_rows(rows, budget, dp, pad_to_multiple=mult)
    assert len(packed) == dp
    check_roundtrip(rows, packed)
    counts = {len(rank) for rank in packed}
    assert len(counts) == 1
    for rank in packed:
        for p in rank:
            t = p.num_tokens
            assert t <= budget and t % mult == 0
            assert p.micro_batch.cu_seqlens[-1] == t
            for x in (p.labels, p.loss_mask, p.old_logprobs, p.advantages, p.ref_logprobs, p.row_ids):
                assert x.shape == (1, t)
            assert p.num_loss_tokens == int(p.loss_mask.sum())
            assert p.micro_batch.extras["loss_mask"] is p.loss_mask


def test_row_ids_default_to_index_and_no_ref():
    rng = random.Random(1)
    rows = [make_row(n, rng, with_ref=False) for n in (5, 9, 3)]
    packed = pack_rows(rows, 20, 1)
    assert packed[0][0].ref_logprobs is None
    got = unpack(packed)
    assert {k: v["token_ids"] for k, v in got.items()} == {i: r.token_ids for i, r in enumerate(rows)}


def test_roles_follow_their_rows():
    rng = random.Random(2)
    rows = [make_row(5, rng, role="agent0"), make_row(9, rng, role="agent1"), make_row(3, rng, role=None)]
    packed = [p for mbs in pack_rows(rows, 20, 1) for p in mbs]
    roles = {rid: role for p in packed for rid, role in (p.roles or {}).items()}
    assert roles == {0: "agent0", 1: "agent1", 2: "policy"}


def test_over_long_row_error():
    rng = random.Random(2)
    rows = [make_row(10, rng, 0), make_row(101, rng, 42)]
    with pytest.raises(ValueError, match=r"row 42 .*101 tokens.*max_tokens_per_micro_batch=100"):
        pack_rows(rows, 100, 2)
    # with padding the usable budget is rounded down to the multiple: 100 -> 96
    rows = [make_row(98, rng, 5)]
    with pytest.raises(ValueError, match=r"row 5 .*98 tokens.*=100.*96"):
        pack_rows(rows, 100, 1, pad_to_multiple=32)


def test_bad_rows():
    with pytest.raises(ValueError, match="old_logprobs"):
        pack_rows([Row([1, 2, 3], [0, 1, 1], [0.0, -1.0], 1.0)], 10, 1)
    with pytest.raises(ValueError, match="empty"):
        pack_rows([Row([], [], [], 1.0)], 10, 1)


def test_label_and_mask_shift_by_hand():
    # prompt [11, 12] then generated [13, 14]; second row: prompt [21], generated [22]
    a = Row([11, 12, 13, 14], [0, 0, 1, 1], [0.0, -0.1, -0.2, -0.3], 2.0, row_id=0)
    b = Row([21, 22], [0, 1], [0.0, -0.5], -1.0, row_id=1)
    (rank,) = pack_rows([a, b], 100, 1)
    (p,) = rank
    assert p.micro_batch.cu_seqlens.tolist() == [0, 4, 6]
    assert p.micro_batch.input_ids.tolist() == [[11, 12, 13, 14, 21, 22]]
    assert p.micro_batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1]]
    # position i predicts token i+1 of its own sequence; sequence ends predict nothing
    assert p.labels.tolist() == [[12, 13, 14, IGNORE_LABEL, 22, IGNORE_LABEL]]
    assert p.loss_mask.tolist() == [[0, 1, 1, 0, 1, 0]]
    assert p.old_logprobs[0].tolist() == pytest.approx([-0.1, -0.2, -0.3, 0.0, -0.5, 0.0])
    assert p.advantages.tolist() == [[2.0] * 4 + [-1.0] * 2]
    assert p.row_ids.tolist() == [[0, 0, 0, 0, 1, 1]]
    assert p.num_loss_tokens == 3


def test_pad_to_multiple_adds_masked_segment():
    a = Row([11, 12, 13, 14, 15], [0, 1, 1, 1, 1], [0.0, -1, -1, -1, -1], 1.0, row_id=0)
    (rank,) = pack_rows([a], 64, 1, pad_to_multiple=8, pad_token_id=99)
    (p,) = rank
    assert p.num_tokens == 8
    assert p.micro_batch.cu_seqlens.tolist() == [0, 5, 8]  # own segment: attends to nothing real
    assert p.micro_batch.input_ids[0, 5:].tolist() == [99, 99, 99]
    assert p.micro_batch.position_ids[0, 5:].tolist() == [0, 1, 2]
    assert p.loss_mask[0, 4:].tolist() == [0, 0, 0, 0]
    assert p.row_ids[0, 5:].tolist() == [PAD_ROW_ID] * 3
    assert p.advantages[0, 5:].tolist() == [0.0] * 3
    assert p.num_loss_tokens == 4 and p.num_real_tokens == 5
    # already a multiple: no dummy segment
    (rank,) = pack_rows([Row(list(range(1, 9)), [1] * 8, [0.0] * 8, 1.0)], 64, 1, pad_to_multiple=8)
    assert rank[0].micro_batch.cu_seqlens.tolist() == [0, 8]


def test_cp_pads_each_row_and_the_total_by_hand():
    # cp=2: every segment to a multiple of 4, the packed length to a multiple of 4 * pad_to_multiple
    a = Row([11, 12, 13, 14, 15], [0, 1, 1, 1, 1], [0.0, -0.1, -0.2, -0.3, -0.4], 2.0, row_id=0)
    b = Row([21, 22], [0, 1], [0.0, -0.5], -1.0, row_id=1)
    (rank,) = pack_rows([a, b], 64, 1, pad_to_multiple=2, pad_token_id=99, cp_size=2)
    (p,) = rank
    assert p.micro_batch.cu_seqlens.tolist() == [0, 8, 12, 16]  # a: 5 -> 8, b: 2 -> 4, dummy to 16 (= 2*2*2*2)
    assert p.micro_batch.input_ids.tolist() == [[11, 12, 13, 14, 15, 99, 99, 99, 21, 22, 99, 99, 99, 99, 99, 99]]
    assert p.micro_batch.position_ids[0, :12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    # a row's padding predicts nothing and belongs to no row; its last real token predicts nothing either
    assert p.labels[0, :8].tolist() == [12, 13, 14, 15, IGNORE_LABEL, IGNORE_LABEL, IGNORE_LABEL, IGNORE_LABEL]
    assert p.loss_mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert p.row_ids[0, :12].tolist() == [0] * 5 + [PAD_ROW_ID] * 3 + [1] * 2 + [PAD_ROW_ID] * 2
    assert p.num_loss_tokens == 5 and p.num_real_tokens == 7
    # the budget counts padded rows: 5 + 2 real tokens, but 8 + 4 packed do not fit in 11
    with pytest.raises(ValueError, match="padded to 2\\*cp"):
        pack_rows([a], 7, 1, cp_size=2)
    assert [len(m) for m in pack_rows([a, b], 11, 1, cp_size=2)] == [2]


def test_zigzag_chunks_balance_causal_work_and_cover_every_position():
    cu = [0, 8, 12, 24]  # chunk lengths 2, 1, 3 at cp = 2
    assert zigzag_index(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 14, 21, 22, 23]
    assert zigzag_index(cu, 2, 1).tolist() == [2, 3, 4, 5, 9, 10, 15, 16, 17, 18, 19, 20]
    for cp in (2, 3, 4):
        cu = [0, 4 * cp, 10 * cp, 12 * cp]
        parts = [zigzag_index(cu, cp, r) for r in range(cp)]
        assert sorted(torch.cat(parts).tolist()) == list(range(cu[-1]))  # a partition of the positions
        # causal work (keys each query sees) is the same on every rank
        work = [sum(int(i) - s + 1 for i in idx for s, e in zip(cu, cu[1:]) if s <= i < e) for idx in parts]
        assert len(set(work)) == 1
    with pytest.raises(ValueError, match="multiple of 2\\*cp=4"):
        zigzag_index([0, 6], 2, 0)


def test_shard_for_cp_splits_every_per_position_tensor_alike():
    rng = random.Random(3)
    rows = [make_row(n, rng, i) for i, n in enumerate([9, 14, 5])]
    (rank,) = pack_rows(rows, 64, 1, cp_size=2)
    (p,) = rank
    cu = p.micro_batch.cu_seqlens.tolist()
    parts = [shard_for_cp(p, 2, r) for r in range(2)]
    for r, q in enumerate(parts):
        idx = zigzag_index(cu, 2, r)
        assert q.micro_batch.cu_seqlens.tolist() == cu and q.micro_batch.cp_size == 2
        for name in ("labels", "loss_mask", "old_logprobs", "advantages", "ref_logprobs", "row_ids"):
            assert torch.equal(getattr(q, name), getattr(p, name)[:, idx]), name
        assert torch.equal(q.micro_batch.input_ids, p.micro_batch.input_ids[:, idx])
        assert torch.equal(q.micro_batch.extras["labels"], q.labels)
        assert q.micro_batch.packed_seq_params().cu_seqlens_q_padded.tolist() == cu
    assert sum(q.num_loss_tokens for q in parts) == p.num_loss_tokens
    assert shard_for_cp(p, 1, 0) is p


def test_equalize_splits_before_padding():
    sizes = [60, 30, 30, 50, 10, 40]
    # rank 0 has 3 bins; rank 1 one two-row bin -> split in two, then single-row bins only -> padding
    out = equalize_bins([[[0], [3], [5]], [[1, 2]]], sizes)
    assert out[0] == [[0], [3], [5]]
    assert sorted(map(sorted, out[1][:2])) == [[1], [2]] and out[1][2] is None
    # the largest multi-row bin is split first
    out = equalize_bins([[[0], [3], [5]], [[4, 5], [1, 2]]], sizes)  # bins of 50 and 60 tokens
    assert None not in out[1] and sorted(sum(sizes[i] for i in b) for b in out[1]) == [30, 30, 50]


def test_equalize_end_to_end():
    rng = random.Random(3)
    rows = [make_row(n, rng, i) for i, n in enumerate([60, 30, 30])]
    # one row on each of 2 ranks, dp=3: the empty rank gets a padding micro-batch (all masked)
    packed = pack_rows(rows[:2], 64, 3, pad_to_multiple=4)
    assert [len(r) for r in packed] == [1, 1, 1]
    pad = [p for r in packed for p in r if p.num_real_tokens == 0]
    assert len(pad) == 1 and pad[0].num_tokens == 4 and pad[0].num_loss_tokens == 0
    assert (pad[0].row_ids == PAD_ROW_ID).all()
    check_roundtrip(rows[:2], packed)
    # KK: {100} vs {60, 50}; budget 100 -> 1 vs 2 micro-batches; the single-row rank gets padding
    rows = [make_row(n, rng, i) for i, n in enumerate([100, 60, 50])]
    packed = pack_rows(rows, 100, 2)
    assert [len(r) for r in packed] == [2, 2]
    assert sum(p.num_real_tokens == 0 for r in packed for p in r) == 1
    packed = pack_rows(rows, 100, 2, equalize_micro_batches=False)
    assert sorted(len(r) for r in packed) == [1, 2]
    # KK: {50, 50} vs {40, 30, 30}; budget 70 -> [50],[50] vs [40, 30],[30]: equal, nothing added
    rows = [make_row(n, rng, i) for i, n in enumerate([50, 50, 40, 30, 30])]
    packed = pack_rows(rows, 70, 2)
    assert [len(r) for r in packed] == [2, 2]
    assert all(p.num_real_tokens > 0 for r in packed for p in r)
    check_roundtrip(rows, packed)
    # budget 100: if the ranks get 90 / 110 tokens, the 110 rank needs 2 micro-batches and the other
    # rank's two-row micro-batch is split (no padding); a perfect 100 / 100 split needs 1 each
    packed = pack_rows(rows, 100, 2)
    loads = sorted(sum(p.num_real_tokens for p in r) for r in packed)
    assert [len(r) for r in packed] == ([1, 1] if loads == [100, 100] else [2, 2])
    assert all(p.num_real_tokens > 0 for r in packed for p in r)
    check_roundtrip(rows, packed)


def test_karmarkar_karp_beats_greedy():
    sizes = [8, 7, 6, 5, 4]  # greedy longest-first gives 17 / 13; KK differencing gives 16 / 14
    parts = partition_karmarkar_karp(sizes, 2)
    assert sorted(sum(sizes[i] for i in p) for p in parts) == [14, 16]
    assert sorted(i for p in parts for i in p) == list(range(5))
    assert sorted(sum(sizes[i] for i in p) for p in partition_longest_first(sizes, 2)) == [13, 17]
    assert balance_ranks(sizes, 2) == parts
    assert partition_karmarkar_karp([], 3) == [[], [], []] == balance_ranks([], 3)


@pytest.mark.parametrize("mult", [1, 128])
def test_matpo_mix_balance(mult):
    rows = matpo_mix()
    packed = pack_rows(rows, 16_384, 4, pad_to_multiple=mult)
    stats = packing_stats(packed)
    print(f"\nMATPO mix: {len(rows)} rows, pad_to_multiple={mult}: {stats}")
    check_roundtrip(rows, packed)
    assert sum(len(r) for r in rows) == stats["real_tokens"]
    assert stats["dp_imbalance"] <= 1.05
    assert stats["real_token_fraction"] >= 0.98
    assert len(set(stats["micro_batches_per_rank"])) == 1
    assert stats["tokens_per_micro_batch_max"] <= 16_384


def test_packing_stats_counts_padding():
    rows = [Row([1, 2, 3], [0, 1, 1], [0.0, -1, -1], 1.0)]
    stats = packing_stats(pack_rows(rows, 16, 2, pad_to_multiple=4))
    assert stats["real_tokens"] == 3 and stats["packed_tokens"] == 8  # 3+1 pad, plus a 4-token pad batch
    assert stats["real_token_fraction"] == pytest.approx(3 / 8)
    assert stats["tokens_per_rank"] in ([3, 0], [0, 3]) and stats["dp_imbalance"] == pytest.approx(2.0)
    assert stats["micro_batches_per_rank"] == [1, 1]
    assert torch.is_tensor(pack_rows(rows, 16, 1)[0][0].labels)


def test_loss_weights_add_up_to_the_rollout_mean_over_ranks_and_micro_batches():
    # rows (advantage, trained tokens after the shift): planner (1, 2) + its worker (2, 1) are rollout 0,
    # a planner (5, 2) is rollout 1. With the advantage as the per-token loss, the paper form is
    # ((2*1 + 1*2) / 3 + 5) / 2 = 19/6 wherever the rows were packed: 2 DP ranks, a 4-token budget
    from megatron_matpo.algo.loss import aggregate_loss
    from megatron_matpo.train.packing import set_loss_weights

    rows = [Row(token_ids=[1, 2, 3, 4], loss_mask=[0, 0, 1, 1], old_logprobs=[0.0] * 4, advantage=1.0, rollout_id=0),
            Row(token_ids=[1, 2, 3], loss_mask=[0, 0, 1], old_logprobs=[0.0] * 3, advantage=2.0, rollout_id=0),
            Row(token_ids=[5, 6, 7, 8], loss_mask=[0, 0, 1, 1], old_logprobs=[0.0] * 4, advantage=5.0, rollout_id=1)]
    set_loss_weights(rows, "rollout-mean-token-mean")
    assert [r.loss_weight for r in rows] == pytest.approx([1 / 6, 1 / 6, 1 / 4])
    packed = pack_rows(rows, max_tokens_per_micro_batch=4, dp_size=2, pad_to_multiple=2)
    assert sum(len(rank) for rank in packed) >= 3  # one row per micro-batch, padding micro-batches included
    total = sum(float(aggregate_loss(p.advantages, p.loss_mask, "rollout-mean-token-mean",
                                     token_weights=p.loss_weights)) for rank in packed for p in rank)
    assert total == pytest.approx(19 / 6)
    assert all(float(p.loss_weights[p.row_ids == PAD_ROW_ID].abs().sum()) == 0.0 for rank in packed for p in rank)
    rows[1].loss_weight = None
    with pytest.raises(ValueError, match="loss weight"):
        pack_rows(rows, max_tokens_per_micro_batch=16, dp_size=1)


@pytest.mark.parametrize("cp", [2, 3])
def test_zigzag_attention_equals_whole_sequence_attention(cp):
    """Every CP rank's queries against the gathered keys (model/context_parallel.py), put back in place, equal
    causal attention over the whole packed sequences (GQA, several sequences); gradients reach every key."""
    from megatron_matpo.model.attention import packed_attention_loop
    from megatron_matpo.model.context_parallel import shard, zigzag_attention

    torch.manual_seed(0)
    m = 2 * cp
    cu = [0, 3 * m, 4 * m, 9 * m]
    q, k, v = (torch.randn(cu[-1], n, 8, dtype=torch.float64, requires_grad=True) for n in (4, 2, 2))
    ref = packed_attention_loop(q, k, v, cu, cu, 8 ** -0.5)
    ks = torch.stack([shard(k, cu, cp, r, dim=0) for r in range(cp)])
    vs = torch.stack([shard(v, cu, cp, r, dim=0) for r in range(cp)])
    out = torch.zeros_like(ref)
    for r in range(cp):
        part = zigzag_attention(shard(q, cu, cp, r, dim=0), ks, vs, cu, r, 8 ** -0.5)
        out = out.index_copy(0, zigzag_index(cu, cp, r), part)
    assert (out - ref).abs().max().item() < 1e-12
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    g_out = torch.autograd.grad(out.sum(), (q, k, v))
    assert all((a - b).abs().max().item() < 1e-12 for a, b in zip(g_out, g_ref))
