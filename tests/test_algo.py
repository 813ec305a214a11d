"""Advantages and losses against hand-computed values."""
import math

import pytest
import torch

from megatron_matpo.algo import (LossConfig, RowMeta, aggregate_loss, apply_kl_to_rewards, broadcast_to_tokens,
                                 entropy_from_logits, grpo_advantages, kl_penalty, masked_mean, matpo_advantages,
                                 matpo_advantages_from_rows, policy_loss, ppo_policy_loss)

S3 = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1] and of [1, 0, 0]


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol)


# ---------------------------------------------------------------- GRPO


def test_grpo_two_groups_and_singleton():
    # group a: [1, 0, 0, 1] mean 0.5, unbiased std sqrt(1/3) -> ±0.5/0.57735 = ±0.866025
    # group b: [0.5] alone -> 0
    adv = grpo_advantages([1.0, 0.0, 0.5, 0.0, 1.0], ["a", "a", "b", "a", "a"], eps=0.0)
    assert close(adv, [0.866025, -0.866025, 0.0, -0.866025, 0.866025])


def test_grpo_unbiased_std():
    # [1, 0, 0]: mean 1/3, deviations (2/3, -1/3, -1/3), unbiased var = (6/9)/2 = 1/3
    # -> (1.154701, -0.577350, -0.577350); the biased std sqrt(2/9) would give 1.414214 instead
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0]), [7, 7, 7], eps=0.0)
    assert close(adv, [(2 / 3) / S3, (-1 / 3) / S3, (-1 / 3) / S3])
    assert close(adv[0], 1.154701)
    eps_adv = grpo_advantages([1.0, 0.0, 0.0], [7, 7, 7], eps=1e-6)
    assert close(eps_adv[0], (2 / 3) / (S3 + 1e-6))


def test_grpo_no_std_and_constant_group():
    adv = grpo_advantages([1.0, 0.0, 0.0, 3.0, 3.0], ["x", "x", "x", "y", "y"], norm_by_std=False)
    assert close(adv, [2 / 3, -1 / 3, -1 / 3, 0.0, 0.0])
    # identical rewards: std 0 -> advantage 0 (not NaN) thanks to eps
    assert close(grpo_advantages([1.0, 1.0], ["g", "g"]), [0.0, 0.0])


def test_grpo_length_mismatch():
    with pytest.raises(ValueError):
        grpo_advantages([1.0, 0.0], ["a"])


# ---------------------------------------------------------------- MATPO credit assignment


def _matpo_rows():
    # group g1: planners p1 (reward 1, two workers) and p2 (reward 0, no workers); a padding row;
    # group g2: a lone planner p3 (reward 0.5) with one worker
    return [
        RowMeta("planner", "p1", "g1", None, 1.0),
        RowMeta("worker", "w1a", "g1", "p1", None),
        RowMeta("worker", "w1b", "g1", "p1", None),
        RowMeta("planner", "p2", "g1", None, 0.0),
        RowMeta("pad", "pad0", "g1", None, None),
        RowMeta("planner", "p3", "g2", None, 0.5),
        RowMeta("worker", "w3", "g2", "p3", None),
    ]


def test_matpo_workers_inherit_parent_advantage():
    # g1 planners [1, 0]: mean 0.5, unbiased std sqrt(0.5) -> ±0.707107; g2 lone planner -> 0
    adv = matpo_advantages_from_rows(_matpo_rows(), eps=0.0)
    a = 0.5 / math.sqrt(0.5)
    assert close(adv, [a, a, a, -a, 0.0, 0.0, 0.0])


def test_matpo_workers_do_not_enter_the_planner_baseline():
    rows = _matpo_rows()
    rows[1].reward = 123.0  # a (spurious) worker reward must be ignored
    a = matpo_advantages([r.role for r in rows], [r.traj_id for r in rows], [r.parent_id for r in rows],
                         [r.group_id for r in rows], [r.reward for r in rows], eps=0.0)
    assert close(a[:4], [0.707107] * 3 + [-0.707107])


def test_matpo_single_agent_rows_are_grpo():
    adv = matpo_advantages(["single"] * 4, ["s1", "s2", "s3", "s4"], [None] * 4, ["g"] * 4,
                           torch.tensor([1.0, 0.0, 0.0, 1.0]), eps=0.0)
    assert close(adv, [0.866025, -0.866025, -0.866025, 0.866025])


def test_matpo_missing_parent_raises():
    rows = [RowMeta("planner", "p1", "g", None, 1.0), RowMeta("worker", "w", "g", "p_gone", None)]
    with pytest.raises(ValueError, match="p_gone"):
        matpo_advantages_from_rows(rows)


def test_matpo_planner_without_reward_and_unknown_role_raise():
    with pytest.raises(ValueError, match="no reward"):
        matpo_advantages_from_rows([RowMeta("planner", "p1", "g", None, None)])
    with pytest.raises(ValueError, match="unknown role"):
        matpo_advantages_from_rows([RowMeta("critic", "c", "g", None, 1.0)])


def test_broadcast_to_tokens():
    masks = [torch.tensor([0, 0, 1, 1]), torch.tensor([1, 0, 1]), torch.tensor([0, 0])]
    toks = broadcast_to_tokens(torch.tensor([0.5, -2.0, 1.0]), masks)
    assert close(toks[0], [0, 0, 0.5, 0.5]) and close(toks[1], [-2.0, 0, -2.0]) and close(toks[2], [0, 0])
    with pytest.raises(ValueError):
        broadcast_to_tokens([1.0], masks)


# ---------------------------------------------------------------- PPO loss

# (ratio, advantage) -> per-token loss, clip 0.2/0.2, dual clip c = 3
#   1.1, +1: inside                 pg1 = -1.1, pg2 = -1.1        -> -1.1
#   1.5, +1: clipped above          pg1 = -1.5, pg2 = -1.2        -> -1.2  (clipped)
#   0.5, +1: below, unclipped       pg1 = -0.5, pg2 = -0.8        -> -0.5
#   0.5, -1: clipped below          pg1 =  0.5, pg2 =  0.8        ->  0.8  (clipped)
#   1.1, -1: inside                 pg1 =  1.1, pg2 =  1.1        ->  1.1
#   5.0, -1: dual clip              max(5, 1.2) = 5 > 3·1          ->  3.0  (dual)
#   2.0, -1: under the dual bound   max(2, 1.2) = 2 < 3            ->  2.0
#   last token is masked out (would be huge)
RATIOS = [1.1, 1.5, 0.5, 0.5, 1.1, 5.0, 2.0, 50.0]
ADVS = [1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0]
MASK = [1, 1, 1, 1, 1, 1, 1, 0]
PER_TOKEN = [-1.1, -1.2, -0.5, 0.8, 1.1, 3.0, 2.0]


def _ppo_inputs():
    logp = torch.log(torch.tensor(RATIOS)).requires_grad_(True)
    return logp, torch.zeros(8), torch.tensor(ADVS), torch.tensor(MASK)


def test_ppo_loss_hand_values_and_metrics():
    logp, old, adv, mask = _ppo_inputs()
    loss, m = ppo_policy_loss(logp, old, adv, mask)
    assert close(loss, sum(PER_TOKEN) / 7)  # 4.1 / 7 = 0.585714
    assert close(loss, 0.585714)
    assert close(m["clip_frac"], 2 / 7) and close(m["dual_clip_frac"], 1 / 7)
    assert close(m["ratio_mean"], 11.7 / 7) and close(m["ratio_max"], 5.0)
    k3 = [(r - 1) - math.log(r) for r in RATIOS[:7]]
    assert close(m["approx_kl"], sum(k3) / 7)


def test_ppo_without_dual_clip_and_asymmetric_clip():
    logp, old, adv, mask = _ppo_inputs()
    loss, m = ppo_policy_loss(logp, old, adv, mask, dual_clip_c=None)
    assert close(loss, (4.1 - 3.0 + 5.0) / 7) and close(m["dual_clip_frac"], 0.0)
    # clip_high 0.28: token 2 gives -1.28, token 4 (clip_low 0.2) still 0.8
    loss, _ = ppo_policy_loss(logp, old, adv, mask, clip_high=0.28)
    assert close(loss, (4.1 + 1.2 - 1.28) / 7)
    with pytest.raises(ValueError):
        ppo_policy_loss(logp, old, adv, mask, dual_clip_c=0.5)


def test_ppo_gradient_is_zero_in_clipped_regions():
    logp, old, adv, mask = _ppo_inputs()
    loss, _ = ppo_policy_loss(logp, old, adv, mask)
    loss.backward()
    # d(-A·r)/d logp = -A·r for active tokens, / 7 for the token mean; clipped, dual-clipped and masked -> 0
    expected = [-1.1 / 7, 0.0, -0.5 / 7, 0.0, 1.1 / 7, 0.0, 2.0 / 7, 0.0]
    assert close(logp.grad, expected)


def test_ppo_global_token_count():
    logp, old, adv, mask = _ppo_inputs()
    loss, _ = ppo_policy_loss(logp, old, adv, mask, global_token_count=20)
    assert close(loss, 4.1 / 20)


# ---------------------------------------------------------------- aggregation

# three sequences of lengths 3, 1, 2: values [1, 2, 3], [4], [5, 6]; masks [1, 1, 0], [1], [1, 1]
#   token-mean          = (1 + 2 + 4 + 5 + 6) / 5 = 3.6
#   seq-mean-token-sum  = (3 + 4 + 11) / 3        = 6.0
#   seq-mean-token-mean = (1.5 + 4 + 5.5) / 3     = 11/3
PACKED = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
PACKED_MASK = torch.tensor([1, 1, 0, 1, 1, 1])
CU = torch.tensor([0, 3, 4, 6])
# padded, with a fourth all-padding row that must not count as a sequence
PADDED = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [5.0, 6.0, 9.0], [9.0, 9.0, 9.0]])
PADDED_MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
EXPECTED = {"token-mean": 3.6, "seq-mean-token-sum": 6.0, "seq-mean-token-mean": 11 / 3}


@pytest.mark.parametrize("agg", list(EXPECTED))
def test_aggregations_packed_and_padded_agree(agg):
    seg = torch.tensor([0, 0, 0, 1, 2, 2])
    packed_cu = aggregate_loss(PACKED, PACKED_MASK, agg, cu_seqlens=CU)
    packed_seg = aggregate_loss(PACKED, PACKED_MASK, agg, segment_ids=seg)
    padded = aggregate_loss(PADDED, PADDED_MASK, agg)
    assert close(packed_cu, EXPECTED[agg]) and close(packed_seg, EXPECTED[agg]) and close(padded, EXPECTED[agg])


def test_aggregation_packed_padding_tail_and_global_counts():
    # a packed stream padded to 8 tokens: tokens beyond cu_seqlens[-1] never count, even if unmasked
    vals = torch.cat([PACKED, torch.tensor([100.0, 100.0])])
    mask = torch.cat([PACKED_MASK, torch.tensor([1, 1])])
    assert close(aggregate_loss(vals, mask, "seq-mean-token-sum", cu_seqlens=CU), 6.0)
    seg = torch.tensor([0, 0, 0, 1, 2, 2, -1, -1])
    assert close(aggregate_loss(vals, mask, "seq-mean-token-mean", segment_ids=seg), 11 / 3)
    # global normalisers: token sum 18 / 10, sequence sums 18 / 6
    assert close(aggregate_loss(PACKED, PACKED_MASK, "token-mean", global_token_count=10), 1.8)
    assert close(aggregate_loss(PADDED, PADDED_MASK, "seq-mean-token-sum", global_seq_count=6), 3.0)
    with pytest.raises(ValueError):
        aggregate_loss(PACKED, PACKED_MASK, "seq-mean-token-sum")  # 1-D without sequence boundaries
    with pytest.raises(ValueError):
        aggregate_loss(PACKED, PACKED_MASK, "sum")


def test_row_loss_weights_by_hand():
    # the three sequences above as rows with 2, 1, 2 loss tokens; rows 0 and 1 are one rollout (a planner
    # and its worker), row 2 another. Paper form: each rollout's token mean, then the mean over rollouts
    #   rollout 0: (1 + 2 + 4) / 3 = 7/3, rollout 1: (5 + 6) / 2 = 11/2  ->  (7/3 + 11/2) / 2 = 47/12
    # (the token mean over all rows, 3.6, weighs rollout 0's three tokens against rollout 1's two)
    from megatron_matpo.algo.loss import row_loss_weights

    n, rollouts = [2, 1, 2], [0, 0, 1]
    w = row_loss_weights(n, "rollout-mean-token-mean", rollouts)
    assert w == pytest.approx([1 / 6, 1 / 6, 1 / 4])
    owner = [0, 0, 0, 1, 2, 2]  # each packed token's row
    weighted = aggregate_loss(PACKED, PACKED_MASK, "rollout-mean-token-mean",
                              token_weights=torch.tensor([w[k] for k in owner]))
    assert close(weighted, 47 / 12)
    for agg, want in EXPECTED.items():  # the other modes as weights give their own aggregates
        ws = row_loss_weights(n, agg)
        tok = torch.tensor([ws[k] for k in owner])
        assert close(aggregate_loss(PACKED, PACKED_MASK, agg, token_weights=tok), want), agg
    assert row_loss_weights([3, 0], "seq-mean-token-mean") == [pytest.approx(1 / 3), 0.0]  # empty rows not counted
    assert row_loss_weights([0, 0, 4], "rollout-mean-token-mean", [0, 0, 1]) == [0.0, 0.0, 0.25]
    with pytest.raises(ValueError, match="rollout of every row"):
        row_loss_weights(n, "rollout-mean-token-mean", [0, None, 1])
    with pytest.raises(ValueError, match="needs token_weights"):
        aggregate_loss(PACKED, PACKED_MASK, "rollout-mean-token-mean", cu_seqlens=CU)


def test_ppo_seq_level_packed_matches_padded():
    # same tokens packed vs padded give the same seq-mean-token-mean loss and gradient
    torch.manual_seed(0)
    lens = [3, 1, 4]
    logp = torch.randn(8) * 0.3
    old = torch.randn(8) * 0.3
    adv = torch.tensor([1.0] * 3 + [-0.5] + [2.0] * 4)
    mask = torch.tensor([0, 1, 1, 1, 1, 1, 0, 1])
    cu = torch.tensor([0, 3, 4, 8])

    def pad(x, fill=0.0):
        out = torch.full((3, 4), fill, dtype=x.dtype)
        for i, (a, n) in enumerate(zip(cu[:-1].tolist(), lens)):
            out[i, :n] = x[a:a + n]
        return out

    lp1 = logp.clone().requires_grad_(True)
    l1, _ = ppo_policy_loss(lp1, old, adv, mask, agg="seq-mean-token-mean", cu_seqlens=cu)
    lp2 = pad(logp).requires_grad_(True)
    l2, _ = ppo_policy_loss(lp2, pad(old), pad(adv), pad(mask), agg="seq-mean-token-mean")
    l1.backward()
    l2.backward()
    assert close(l1, l2)
    assert close(pad(lp1.grad), lp2.grad)


# ---------------------------------------------------------------- KL, entropy, combined loss


def test_kl_estimators_hand_values():
    lp, ref = torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.25, 0.5]))
    ln2 = math.log(2)
    assert close(kl_penalty(lp, ref, "k1"), [ln2, -ln2])
    # k3 = exp(ref - lp) - (ref - lp) - 1: 0.5 + ln2 - 1 = 0.193147 ; 2 - ln2 - 1 = 0.306853
    assert close(kl_penalty(lp, ref, "k3"), [0.5 + ln2 - 1, 1 - ln2])
    assert close(kl_penalty(lp, ref, "abs"), [ln2, ln2])
    assert close(kl_penalty(lp, ref, "mse"), [0.5 * ln2 ** 2] * 2)
    assert close(kl_penalty(lp, lp, "k3"), [0.0, 0.0])
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k2")


def test_k3_nonnegative():
    torch.manual_seed(0)
    lp, ref = torch.randn(1000) * 3, torch.randn(1000) * 3
    assert (kl_penalty(lp, ref, "k3") >= 0).all()


def test_apply_kl_to_rewards():
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # k1 sums over masked tokens: (0.5 - 1.0) = -0.5 ; (1.0 + 0) = 1.0
    new, seq_kl = apply_kl_to_rewards(torch.tensor([1.0, 0.0]), lp, ref, mask, kl_coef=0.1)
    assert close(seq_kl, [-0.5, 1.0]) and close(new, [1.05, -0.1])
    new_p, _ = apply_kl_to_rewards(torch.tensor([1.0, 0.0]), lp.reshape(-1), ref.reshape(-1), mask.reshape(-1),
                                   kl_coef=0.1, cu_seqlens=torch.tensor([0, 3, 6]))
    assert close(new_p, new)


def test_entropy_and_masked_mean():
    v = 7
    assert close(entropy_from_logits(torch.zeros(2, 3, v)), torch.full((2, 3), math.log(v)))
    assert close(entropy_from_logits(torch.tensor([0.0, 0.0, -1e4])), math.log(2))
    assert close(entropy_from_logits(torch.tensor([50.0, 0.0, 0.0])), 0.0)
    assert close(masked_mean(torch.tensor([1.0, 2.0, 10.0]), torch.tensor([1, 1, 0])), 1.5)
    assert close(masked_mean(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.tensor([[1, 1], [0, 1]]), dim=1),
                 [2.0, 7.0])
    assert close(masked_mean(torch.tensor([1.0]), torch.tensor([0])), 0.0)  # empty mask -> 0, not NaN


def test_policy_loss_combines_terms():
    logp, old, adv, mask = _ppo_inputs()
    ref = logp.detach() - 0.1  # k1 = 0.1 on every token
    ent = torch.full((8,), 2.0)
    cfg = LossConfig(kl_coef=0.5, kl_kind="k1", entropy_coef=0.01)
    loss, m = policy_loss(logp, old, adv, mask, cfg, ref_logprobs=ref, entropy=ent)
    assert close(loss, 4.1 / 7 + 0.5 * 0.1 - 0.01 * 2.0)
    assert close(m["kl"], 0.1) and close(m["entropy"], 2.0) and close(m["pg_loss"], 4.1 / 7)
    # kl_as="reward": KL reported but not in the loss
    loss_r, m_r = policy_loss(logp, old, adv, mask, LossConfig(kl_coef=0.5, kl_kind="k1", kl_as="reward"),
                              ref_logprobs=ref)
    assert close(loss_r, 4.1 / 7) and close(m_r["kl"], 0.1)
    # default config = the MATPO reference: PPO only
    assert close(policy_loss(logp, old, adv, mask)[0], 4.1 / 7)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, LossConfig(kl_coef=0.1))  # no ref_logprobs
    with pytest.raises(ValueError):
        LossConfig(agg="seq-sum")


# ---------------------------------------------------------------- PPO + GAE (the MAPoRL critic option)

def _gae_by_definition(v, reward, gamma, lam):
    """A_t = Σ_k (γλ)^k δ_{t+k}, δ_t = r_t + γ V_{t+1} − V_t (V after the last step = 0), summed directly."""
    n = len(v)
    vv = list(v) + [0.0]
    delta = [(reward if t == n - 1 else 0.0) + gamma * vv[t + 1] - vv[t] for t in range(n)]
    return [sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) for t in range(n)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (1.0, 0.0)])
def test_gae_matches_its_definition(gamma, lam):
    from megatron_matpo.algo import gae

    v = [0.3, -0.2, 0.5, 0.1]
    adv, ret = gae(v, 1.5, gamma, lam)
    assert close(adv, _gae_by_definition(v, 1.5, gamma, lam), 1e-9)
    assert close(ret, [a + x for a, x in zip(adv, v)], 1e-9)
    if gamma == 1.0 and lam == 1.0:  # Monte Carlo: A_t = R − V_t
        assert close(adv, [1.5 - x for x in v], 1e-9)
    if lam == 0.0:  # one-step TD errors
        assert close(adv, [-0.2 - 0.3, 0.5 + 0.2, 0.1 - 0.5, 1.5 - 0.1], 1e-9)


def test_gae_with_zero_values_decays_the_reward_backwards():
    from megatron_matpo.algo import gae

    adv, _ = gae([0.0, 0.0, 0.0], 2.0, 1.0, 0.95)  # an untrained (zero-init) critic
    assert close(adv, [2.0 * 0.95 ** 2, 2.0 * 0.95, 2.0], 1e-9)


def test_whiten_over_the_batch():
    import numpy as np

    from megatron_matpo.algo import whiten

    a, b = whiten([np.array([1.0, 2.0]), np.array([3.0])])
    flat = np.concatenate([a, b])
    assert abs(flat.mean()) < 1e-9 and abs(flat.std() - 1.0) < 1e-5


def test_value_loss_clipped_by_hand():
    from megatron_matpo.algo import value_loss

    v, old, ret = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 0.0, 0.4]), torch.tensor([0.5, 1.0, 0.0])
    mask = torch.tensor([1.0, 1.0, 0.0])
    loss, m = value_loss(v, old, ret, mask, clip=0.2)
    # token 0: unclipped (1-0.5)^2 = 0.25, clipped V = 0.2 → (0.2-0.5)^2 = 0.09 → max 0.25
    # token 1: V = old → both (0-1)^2 = 1; token 2 masked
    assert close(loss, 0.5 * (0.25 + 1.0) / 2)
    assert close(m["value_clip_frac"], 0.0)
    loss2, m2 = value_loss(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([1.0]), 0.2)
    # clipped V = 0.8 → (0.8-0.5)^2 = 0.09 > (0-0.5)^2 = 0.25? no: max(0.25, 0.09) = 0.25, unclipped
    assert close(loss2, 0.125) and close(m2["value_clip_frac"], 0.0)
    loss3, m3 = value_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.1]), torch.tensor([1.0]), 0.2)
    # unclipped (2-1.1)^2 = 0.81; clipped V = 1.2 → 0.01: max is the unclipped one
    assert close(loss3, 0.405)
    loss4, m4 = value_loss(torch.tensor([1.05]), torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([1.0]), 0.01)
    # unclipped (1.05-3)^2 = 3.8025; clipped V = 1.01 → (1.01-3)^2 = 3.9601 (larger: the clipped term wins)
    assert close(loss4, 0.5 * 3.9601) and close(m4["value_clip_frac"], 1.0)


# --- off-policy correction (algo/off_policy.py): engine (behaviour) -> old (proximal) weights ---------

def _lp(*p):
    return torch.log(torch.tensor(p, dtype=torch.float64))


def test_token_tis_and_mis_hand_values():
    from megatron_matpo.algo.off_policy import OffPolicyConfig, importance_weights

    # pi_prox / mu = 2, 0.5, 9 on the corrected tokens; the 4th token is not corrected (constrained /
    # not trained): weight 1, not in the metrics, whatever its logprobs
    prox, behav = _lp(0.5, 0.2, 0.9, 0.9), _lp(0.25, 0.4, 0.1, 0.001)
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    w, m = importance_weights(prox, behav, mask, OffPolicyConfig(mode="tis", c=2.0))
    assert w.tolist() == pytest.approx([2.0, 0.5, 2.0, 1.0])
    assert float(m["is_truncated_frac"]) == pytest.approx(1 / 3)  # 9 > 2; 2 itself is not truncated
    assert float(m["is_ratio_mean"]) == pytest.approx(11.5 / 3) and float(m["is_ratio_max"]) == pytest.approx(9.0)
    w, m = importance_weights(prox, behav, mask, OffPolicyConfig(mode="mis", low=0.5, high=2.0))
    assert w.tolist() == pytest.approx([2.0, 0.5, 0.0, 1.0])  # bounds inclusive; 9 is dropped
    assert float(m["is_masked_frac"]) == pytest.approx(1 / 3) and "is_truncated_frac" not in m


def test_sequence_level_weights_on_a_packed_stream():
    from megatron_matpo.algo.off_policy import OffPolicyConfig, importance_weights

    # sequence 0: 2 x 0.5 = 1; sequence 1: 3 x 1 = 3 (its first token not corrected); then a padding token
    prox, behav = _lp(0.4, 0.1, 0.7, 0.3, 0.6, 0.5), _lp(0.2, 0.2, 0.01, 0.1, 0.6, 0.05)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    seg = torch.tensor([0, 0, 1, 1, 1, -1])
    w, m = importance_weights(prox, behav, mask, OffPolicyConfig(mode="tis", level="sequence", c=2.0), seg)
    assert w.tolist() == pytest.approx([1.0, 1.0, 1.0, 2.0, 2.0, 1.0])
    assert float(m["is_ratio_mean"]) == pytest.approx((1 + 1 + 3 + 3) / 4)  # padding is never corrected
    assert float(m["is_truncated_frac"]) == pytest.approx(2 / 4)
    w, m = importance_weights(prox, behav, mask, OffPolicyConfig(mode="mis", level="sequence", low=0.5, high=2.0), seg)
    assert w.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0, 0.0, 1.0])  # sequence 1 dropped as a whole
    # a padded batch: one sequence per row
    w, _ = importance_weights(prox.reshape(2, 3), behav.reshape(2, 3), torch.ones(2, 3),
                              OffPolicyConfig(mode="tis", level="sequence", c=100.0))
    assert w[0].tolist() == pytest.approx([70.0] * 3, rel=1e-5) and w[1].tolist() == pytest.approx([30.0] * 3, rel=1e-5)


def test_is_weights_scale_each_tokens_surrogate():
    """At ratio 1 the PPO term of a token is -A: weighted, the token-mean loss is -sum(A w) / n, and
    the gradient of each token's logprob is -A w / n."""
    from megatron_matpo.algo.loss import ppo_policy_loss

    old = _lp(0.5, 0.2, 0.9)
    lp = old.clone().requires_grad_(True)
    adv, w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([2.0, 0.5, 0.0], dtype=torch.float64)
    loss, _ = ppo_policy_loss(lp, old, adv, torch.ones(3), dual_clip_c=None, is_weights=w)
    assert float(loss) == pytest.approx(-(1.0 * 2.0 - 2.0 * 0.5 + 0.0) / 3)
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([-2.0 / 3, 1.0 / 3, 0.0])
    plain, _ = ppo_policy_loss(old, old, adv, torch.ones(3), dual_clip_c=None)
    same, _ = ppo_policy_loss(old, old, adv, torch.ones(3), dual_clip_c=None, is_weights=torch.ones(3))
    assert float(plain) == float(same)


def test_off_policy_config_errors_name_the_section(tmp_path):
    from megatron_matpo import config
    from megatron_matpo.config import ConfigError
    from megatron_matpo.train.config import TrainConfig

    root = pytest.importorskip("pathlib").Path(__file__).resolve().parents[1]
    for bad, msg in [("loss.off_policy.mode=cispo", r"loss.off_policy: mode must be one of"),
                     ("loss.off_policy.c=0.5", r"loss.off_policy: c \(the TIS truncation\) must be >= 1"),
                     ("loss.off_policy.low=1.5", r"loss.off_policy: low/high must satisfy"),
                     ("loss.off_policy.level=turn", r"loss.off_policy: level must be one of")]:
        with pytest.raises(ConfigError, match=msg):
            config.load(TrainConfig, root / "configs/tiny_cpu.yaml", [f"run_dir={tmp_path}", bad])
    cfg = config.load(TrainConfig, root / "configs/tiny_cpu.yaml", [f"run_dir={tmp_path}", "loss.off_policy.mode=tis"])
    assert cfg.loss.off_policy.enabled and cfg.loss.off_policy.c == 2.0
