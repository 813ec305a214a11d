"""Rollouts → rows (MATPO credit, parity masks), step-metric reduction and the prompt loader."""
from __future__ import annotations

import pytest

from megatron_matpo.agents.workflow import Trajectory, derive_seed
from megatron_matpo.data.loader import PromptLoader
from megatron_matpo.data.schema import Sample
from megatron_matpo.train import stats as S
from megatron_matpo.train.rows import build_rows, build_rows_by_prompt, parity_mask, rollout_metrics


def _traj(tid, role, group, parent=None, reward=None, n=6, spans=()):
    t = Trajectory(traj_id=tid, role=role, group_id=group, sample_uid=tid, parent_id=parent,
                   token_ids=list(range(n)), loss_mask=[0, 0, 1, 1, 1, 1][:n], logprobs=[0.0] * n, prompt_len=2,
                   messages=[], final_text="", constrained_spans=list(spans))
    t.reward = reward
    t.reward_components = {"accuracy": float(reward or 0) > 0.5} if role == "planner" else {}
    return t


def test_rows_carry_matpo_credit_and_parity_masks():
    # group g: two planners (rewards 1 and 0), the first with two workers; group h: one planner
    rollouts = [[_traj("p1", "planner", "g", reward=1.0, spans=[(2, 4)]), _traj("w1", "worker", "g", "p1"),
                 _traj("w2", "worker", "g", "p1")],
                [_traj("p2", "planner", "g", reward=0.0)],
                [_traj("p3", "planner", "h", reward=0.7)]]
    rows = build_rows(rollouts)
    adv = [r.advantage for r in rows]
    # GRPO over {1, 0}: mean .5, unbiased std .7071 -> ±0.7071; workers copy p1; a group of one -> 0
    assert adv[0] == pytest.approx(0.70710, abs=1e-4) and adv[3] == pytest.approx(-0.70710, abs=1e-4)
    assert adv[1] == adv[2] == adv[0] and adv[4] == 0.0
    assert [r.row_id for r in rows] == [0, 1, 2, 3, 4]
    assert [r.role for r in rows] == ["planner", "worker", "worker", "planner", "planner"]
    assert rows[0].parity_mask == [0, 0, 0, 0, 1, 1]  # constrained span (2, 4) excluded
    assert rows[1].parity_mask == rows[1].loss_mask
    m = rollout_metrics(rollouts, rows)
    assert m["planner/workers_per_planner"] == pytest.approx(2 / 3)
    assert m["worker/count"] == 2 and m["planner/generated_tokens"] == 12
    assert m["reward/mean"] == pytest.approx((1.0 + 0.0 + 0.7) / 3)


def test_rows_by_prompt_keep_each_prompt_with_its_workers():
    """Per prompt: its planners' rows and their workers', whatever the number of workers each has;
    advantages and row ids as from one `build_rows` over all (GRPO groups are the prompts' group ids)."""
    by_prompt = [[[_traj("a0", "planner", "a", reward=1.0), _traj("a0w", "worker", "a", "a0")],
                  [_traj("a1", "planner", "a", reward=0.0)]],
                 [[_traj("b0", "planner", "b", reward=0.0)],
                  [_traj("b1", "planner", "b", reward=1.0), _traj("b1w0", "worker", "b", "b1"),
                   _traj("b1w1", "worker", "b", "b1")]]]
    per_prompt = build_rows_by_prompt(by_prompt)
    flat = build_rows([r for g in by_prompt for r in g])
    assert [[r.row_id for r in p] for p in per_prompt] == [[0, 1, 2], [3, 4, 5, 6]]
    assert [r.advantage for p in per_prompt for r in p] == [r.advantage for r in flat]
    assert [[r.role for r in p] for p in per_prompt] == [["planner", "worker", "planner"],
                                                         ["planner", "planner", "worker", "worker"]]
    assert per_prompt[1][2].advantage == per_prompt[1][1].advantage > 0  # workers carry b1's credit
    assert build_rows_by_prompt([[], [[_traj("c", "planner", "c", reward=1.0)]]])[0] == []


def test_parity_mask_without_spans_is_the_loss_mask():
    t = _traj("p", "planner", "g", reward=1.0)
    assert parity_mask(t) == t.loss_mask


def test_train_stats_reduce_over_dp_and_mini_batches():
    # two DP ranks reporting, a third (non-reporting, e.g. first PP stage) with grad norm and lr only
    r0 = [{"grad_norm": 2.0, "step_skipped": 0.0, "lr": 1e-4, "loss": 0.25, "clip_frac": 0.5,
           "loss_tokens_planner": 3.0, "loss_tokens_worker": 1.0, "ratio_max": 1.1}]
    r1 = [{"grad_norm": 2.0, "step_skipped": 0.0, "lr": 1e-4, "loss": 0.5, "clip_frac": 0.0,
           "loss_tokens_planner": 4.0, "loss_tokens_worker": 0.0, "ratio_max": 1.3}]
    other = [{"grad_norm": 2.0, "step_skipped": 0.0, "lr": 1e-4}]
    out = S.train_stats([r0, r1, other], [True, True, False])
    assert out["actor/loss"] == pytest.approx(0.75)  # each rank's part of the global token mean adds up
    assert out["actor/clip_frac"] == pytest.approx(0.5 * 4 / 8)  # token-weighted
    assert out["actor/ratio_max"] == pytest.approx(1.3) and out["actor/grad_norm"] == 2.0


def test_train_stats_off_policy_correction_over_corrected_tokens():
    # two DP ranks, two mini-batches on rank 0: IS metrics weighted by is_tokens (not the loss tokens)
    base = {"grad_norm": 1.0, "step_skipped": 0.0, "lr": 1e-4, "loss_tokens_planner": 10.0}
    r0 = [{**base, "is_tokens": 2.0, "is_ratio_mean": 1.5, "is_ratio_max": 2.0, "is_truncated_frac": 0.5},
          {**base, "is_tokens": 6.0, "is_ratio_mean": 1.0, "is_ratio_max": 1.0, "is_truncated_frac": 0.0}]
    r1 = [{**base, "is_tokens": 0.0, "is_ratio_mean": 0.0, "is_ratio_max": 0.0, "is_truncated_frac": 0.0},
          {**base, "is_tokens": 2.0, "is_ratio_mean": 3.0, "is_ratio_max": 4.0, "is_truncated_frac": 1.0}]
    out = S.train_stats([r0, r1], [True, True])
    assert out["actor/is_tokens"] == 10.0 and out["actor/is_ratio_max"] == 4.0
    assert out["actor/is_ratio_mean"] == pytest.approx((2 * 1.5 + 6 * 1.0 + 2 * 3.0) / 10)
    assert out["actor/is_truncated_frac"] == pytest.approx((2 * 0.5 + 2 * 1.0) / 10)
    assert "actor/is_masked_frac" not in out  # token TIS reports no masking
    assert not any(k.startswith("actor/is_") for k in S.train_stats([[base]], [True]))  # correction off


def test_train_stats_per_role_terms_for_any_role():
    # MAPoRL rows carry roles agent0/agent1: their terms are summed over ranks and weight the token means
    r0 = [{"grad_norm": 1.0, "step_skipped": 0.0, "lr": 1e-4, "clip_frac": 1.0, "pg_term_agent0": -0.25,
           "loss_tokens_agent0": 2.0, "loss_tokens_agent1": 1.0, "pg_term_agent1": 0.5}]
    r1 = [{"grad_norm": 1.0, "step_skipped": 0.0, "lr": 1e-4, "clip_frac": 0.0, "pg_term_agent0": 0.75,
           "loss_tokens_agent0": 5.0}]
    out = S.train_stats([r0, r1], [True, True])
    assert out["actor/pg_term_agent0"] == pytest.approx(0.5) and out["actor/pg_term_agent1"] == 0.5
    assert out["actor/loss_tokens_agent0"] == 7.0 and out["actor/loss_tokens_agent1"] == 1.0
    assert out["actor/clip_frac"] == pytest.approx(3 / 8)
    assert not any("planner" in k or "worker" in k for k in out)


def test_parity_stats_and_sample():
    out = S.parity_stats([{"abs_diff_sum": 1e-5, "abs_diff_max": 3e-6, "tokens": 10.0},
                          {"abs_diff_sum": 1e-5, "abs_diff_max": 5e-6, "tokens": 10.0}])
    assert out["train_rollout_logprob_abs_diff"] == pytest.approx(1e-6)
    assert out["train_rollout_logprob_abs_diff_max"] == 5e-6
    rows = build_rows([[_traj("p1", "planner", "g", reward=1.0), _traj("w1", "worker", "g", "p1")],
                       [_traj("p2", "planner", "g", reward=0.0)]])
    assert len(S.parity_sample(rows, 2)) == 2  # one planner and one worker sequence
    assert S.split_even([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]


def test_prompt_loader_epochs_and_cursor():
    samples = [Sample(uid=f"s{i}#0", data_source="x", question=f"q{i}", ground_truth="a", prompt=[], index=i,
                      split="train", group=f"s{i}")
               for i in range(5)]
    a = PromptLoader(samples, 2, seed=3)
    seen = [s.uid for _ in range(2) for s in a.next_batch()]
    assert len(set(seen)) == 4  # no repeats inside an epoch; the tail (1 prompt) is skipped
    state = a.state_dict()
    b = PromptLoader(samples, 2, seed=3)
    b.load_state_dict(state)
    assert [s.uid for s in a.next_batch()] == [s.uid for s in b.next_batch()]
    with pytest.raises(ValueError, match="same data and seed"):
        PromptLoader(samples, 2, seed=4).load_state_dict(state)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(None, 1) is None
    assert derive_seed(7, "worker", 0) == derive_seed(7, "worker", 0)
    assert len({derive_seed(7, "worker", i) for i in range(100)}) == 100
    assert 0 <= derive_seed(7, 1) < 2**63


def test_forced_calls_never_allow_a_blank_argument():
    import re

    from megatron_matpo.agents.toolcall import parse_tool_calls, render_tool_call
    from megatron_matpo.agents.workflow import ForcedCall

    call = ForcedCall("browsing_agent", "search_and_browse", "subtask", 2)
    r = call.regex()

    def text(*subtasks):
        return "".join(render_tool_call("browsing_agent", "search_and_browse", {"subtask": s}) for s in subtasks)

    assert re.fullmatch(r, text("who founded x", "a"))
    assert not re.fullmatch(r, text(" ", "a")) and not re.fullmatch(r, text("x" * 31, "a"))
    calls = parse_tool_calls(text("who founded x", "a")).calls
    assert [c.arguments["subtask"] for c in calls] == ["who founded x", "a"]
    # the fixed texts with each argument and its closing quote between them are the canonical calls
    fixed = call.fixed_texts()
    assert fixed[0] + 'who founded x"' + fixed[1] + 'a"' + fixed[2] == text("who founded x", "a")


def test_apply_gae_places_values_advantages_and_returns_for_packing():
    """GAE over each row's generated tokens; after packing, position i carries token i+1's advantage,
    return and old value (the critic's output at position i)."""
    import numpy as np

    from megatron_matpo.algo import gae
    from megatron_matpo.train.packing import Row, pack_rows
    from megatron_matpo.train.rows import apply_gae

    rows = [Row([5, 6, 7, 8, 9], [0, 0, 1, 1, 1], [0.0] * 5, 0.0, row_id=0, reward=1.0),
            Row([5, 6, 7], [0, 1, 1], [0.0] * 3, 0.0, row_id=1, reward=-1.0)]
    values = {0: np.array([0.1, 0.2, 0.3]), 1: np.array([-0.5, 0.5])}
    m = apply_gae(rows, values, gamma=1.0, lam=0.95, whiten_advantages=False)
    a0, r0 = gae([0.1, 0.2, 0.3], 1.0, 1.0, 0.95)
    assert rows[0].advantage[:2] == [0.0, 0.0] and np.allclose(rows[0].advantage[2:], a0)
    assert np.allclose(rows[0].returns[2:], r0) and np.allclose(rows[0].old_values[2:], [0.1, 0.2, 0.3])
    assert m["gae/value_mean"] == pytest.approx(np.mean([0.1, 0.2, 0.3, -0.5, 0.5]))
    (mb,) = pack_rows(rows, max_tokens_per_micro_batch=16, dp_size=1)[0]
    lm = mb.loss_mask[0]
    assert lm.tolist() == [0, 1, 1, 1, 0, 1, 1, 0]  # row 0 positions 1..3 predict tokens 2..4; row 1: 0..1
    assert np.allclose(mb.advantages[0][lm > 0].numpy(), list(a0) + list(gae([-0.5, 0.5], -1.0, 1.0, 0.95)[0]))
    assert np.allclose(mb.old_values[0][lm > 0].numpy(), [0.1, 0.2, 0.3, -0.5, 0.5])
    with pytest.raises(ValueError, match="2 values for 3 generated tokens"):
        apply_gae([Row([1, 2, 3, 4], [0, 1, 1, 1], [0.0] * 4, 0.0, row_id=0, reward=1.0)], {0: np.zeros(2)}, 1.0, 0.95)
    whitened = apply_gae(rows, values, 1.0, 0.95, whiten_advantages=True)
    flat = np.concatenate([np.array(r.advantage)[np.array(r.loss_mask) > 0] for r in rows])
    assert abs(flat.mean()) < 1e-9 and whitened["gae/advantage_mean"] != 0.0
    # two runs of generated tokens (a tool result between): one episode with a scalar reward (a
    # multi-turn planner), one per run with one reward per turn (MAPoRL's merged turns)
    v = {0: np.array([0.1, 0.2, 0.3, 0.4])}
    one = [Row([1, 2, 3, 4, 5, 6], [0, 1, 1, 0, 1, 1], [0.0] * 6, 0.0, row_id=0, reward=1.0)]
    apply_gae(one, v, 0.9, 0.8, whiten_advantages=False)
    assert np.allclose(np.array(one[0].advantage)[[1, 2, 4, 5]], gae([0.1, 0.2, 0.3, 0.4], 1.0, 0.9, 0.8)[0])
    two = [Row([1, 2, 3, 4, 5, 6], [0, 1, 1, 0, 1, 1], [0.0] * 6, 0.0, row_id=0, reward=[1.0, -1.0])]
    apply_gae(two, v, 0.9, 0.8, whiten_advantages=False)
    want = [*gae([0.1, 0.2], 1.0, 0.9, 0.8)[0], *gae([0.3, 0.4], -1.0, 0.9, 0.8)[0]]
    assert np.allclose(np.array(two[0].advantage)[[1, 2, 4, 5]], want)
    with pytest.raises(ValueError, match="3 rewards for 2 runs"):
        apply_gae([Row([1, 2, 3, 4, 5, 6], [0, 1, 1, 0, 1, 1], [0.0] * 6, 0.0, row_id=0, reward=[1.0, 0.0, 2.0])],
                  v, 0.9, 0.8)
