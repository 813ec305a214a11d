"""`matpo train-verifier`'s data and loss (hand-computed), its configs' refusals before anything starts,
and the discussion's bucketed score feedback. The training, export, serving and use in a MAPoRL run are
checked end to end in tests/test_maporl_train.py (one world)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from megatron_matpo import config
from megatron_matpo.config import ConfigError
from megatron_matpo.maporl.prompts import SCORE_BUCKETS, SharedAnswer, revision_prompt, score_note
from megatron_matpo.verifier.answers import (LabelledAnswer, VerifierDataError, balance, check_labels, read_answers,
                                             roc_auc, split_by_question)
from tests.e2e import REPO


def _line(q: str, text: str, gold="3", **kw) -> str:
    """A transcript line as MaporlRollout._write writes one (the fields the verifier reads, plus others)."""
    return json.dumps({"traj_id": f"{q}/a0/r0", "role": "agent0", "final_text": text, "answer": None, "score": 1.0,
                       "question": q, "ground_truth": gold, "data_source": "arithmetic", **kw})


def test_answers_are_labelled_by_the_gold_answer(tmp_path):
    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    (rollouts / "step_000001.jsonl").write_text("\n".join([
        _line("q1", "So \\boxed{3}"), _line("q1", "\\boxed{4}"), _line("q1", "it is 3.0"),  # last number, numerically
        _line("q1", "no idea"), _line("q2", "\\boxed{12}", gold=["12", "twelve"]), _line("q2", "\\boxed{twelve}",
                                                                                     gold=["12", "twelve"])]) + "\n")
    (rollouts / "eval_000010_arithmetic.jsonl").write_text(_line("val", "\\boxed{3}") + "\n")  # never read
    got = read_answers([rollouts])
    assert [(a.question, a.label) for a in got] == [("q1", 1), ("q1", 0), ("q1", 1), ("q1", 0), ("q2", 1), ("q2", 1)]
    assert got[1].where.endswith("step_000001.jsonl:2") and got[0].response == "So \\boxed{3}"


@pytest.mark.parametrize("line, error", [
    (_line("q", "\\boxed{3}", gold=None), "step.jsonl:1: the turn has no ground_truth"),
    (_line("q", "\\boxed{3}", gold=""), "no ground_truth"),
    (json.dumps({"question": "q", "ground_truth": "3"}), "field 'final_text' missing: not a MAPoRL discussion"),
    ("{not json", "step.jsonl:1: not JSON"),
])
def test_bad_transcripts_are_refused_naming_the_line(tmp_path, line, error):
    (tmp_path / "step.jsonl").write_text(line + "\n")
    with pytest.raises(VerifierDataError, match=error):
        read_answers([tmp_path / "step.jsonl"])


def test_missing_or_empty_transcripts(tmp_path):
    with pytest.raises(VerifierDataError, match="does not exist"):
        read_answers([tmp_path / "nope"])
    with pytest.raises(VerifierDataError, match="no \\*.jsonl transcript"):
        read_answers([tmp_path])


def _answers(spec: dict[str, tuple[int, int]]) -> list[LabelledAnswer]:
    """question → (right, wrong) answers."""
    out = []
    for q, (r, w) in spec.items():
        out += [LabelledAnswer(q, f"{q}-right{i}", 1, "") for i in range(r)]
        out += [LabelledAnswer(q, f"{q}-wrong{i}", 0, "") for i in range(w)]
    return out


def test_balance_per_question_and_over_the_set():
    xs = _answers({"a": (2, 9), "b": (0, 5), "c": (30, 12)})
    per = balance(xs, per_question=10, seed=0)
    counts = {(q, lab): sum(1 for x in per if x.question == q and x.label == lab) for q in "abc" for lab in (0, 1)}
    # a: min(2, 9) of each; b: one label only, dropped; c: capped at 10 of each
    assert counts == {("a", 0): 2, ("a", 1): 2, ("b", 0): 0, ("b", 1): 0, ("c", 0): 10, ("c", 1): 10}
    assert per == [x for x in xs if x in per]  # input order kept
    assert balance(xs, per_question=10, seed=0) == per and balance(xs, 10, seed=1) != per  # seeded
    whole = balance(xs, per_question=None, seed=0)
    assert sum(x.label for x in whole) == len(whole) // 2 == 26  # the 26 wrong ones all kept, 26 of 32 right


def test_split_is_by_question():
    xs = _answers({q: (1, 1) for q in "abcdefghij"})
    train, held = split_by_question(xs, holdout=0.2, seed=3)
    assert len({x.question for x in held}) == 2 and len(train) == 16 and len(held) == 4
    assert not {x.question for x in train} & {x.question for x in held}
    with pytest.raises(VerifierDataError, match="leaves none to train on"):
        split_by_question(_answers({"a": (1, 1)}), holdout=0.5, seed=0)


def test_one_label_is_refused():
    with pytest.raises(VerifierDataError, match="all 3 answers are wrong: a verifier needs right and wrong"):
        check_labels("transcripts", _answers({"a": (0, 3)}))
    with pytest.raises(VerifierDataError, match="all 2 answers are right"):
        check_labels("transcripts", _answers({"a": (2, 0)}))


def test_roc_auc_hand_computed():
    # right answers score 0.35 and 0.8, wrong ones 0.1 and 0.4: of the 4 (right, wrong) pairs, 3 are ordered
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([0.5, 0.5, 0.5], [1, 0, 0]) == 0.5  # ties count one half
    assert roc_auc([2.0, -1.0], [1, 0]) == 1.0 and roc_auc([2.0, -1.0], [0, 1]) == 0.0


def test_bce_on_each_answer_s_last_token():
    """The loss reads the score at each row's last packed position, whatever the packing, and is the
    row mean of BCE with logits over the step (hand-computed)."""
    from megatron_matpo.train.packing import pack_rows
    from megatron_matpo.verifier.train import answer_rows, bce_loss, last_scores

    rows = answer_rows([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8, 9], "label": 0}])
    (mbs,) = pack_rows(rows, max_tokens_per_micro_batch=16, dp_size=1, pad_to_multiple=4)
    (p,) = mbs
    t = p.micro_batch.input_ids.shape[1]
    out = torch.arange(t, dtype=torch.float32).reshape(1, t, 1) / 10  # the score at position i is i/10
    last = {rid: int((p.row_ids[0] == rid).nonzero().max()) for rid in (0, 1)}
    assert {k: float(v) for k, v in last_scores(out, p).items()} == pytest.approx({k: i / 10 for k, i in last.items()})
    loss, m = bce_loss({0: 1.0, 1: 0.0}, global_rows=2)(out, p)
    s0, s1 = last[0] / 10, last[1] / 10
    expect = (math.log(1 + math.exp(-s0)) + math.log(1 + math.exp(s1))) / 2
    assert float(loss) == pytest.approx(expect, rel=1e-6) and float(m["rows"]) == 2
    assert float(m["correct"]) == float(s0 > 0) + float(s1 <= 0)


def test_score_feedback_buckets():
    assert [w for _, w in SCORE_BUCKETS][0] == "very likely wrong"
    assert score_note(0.29) == "verifier score 0.29: very likely wrong"
    assert score_note(0.3).endswith("possibly wrong, or its reasoning is not convincing yet")
    assert score_note(0.79).endswith("probably right, but worth checking again")
    assert score_note(0.8).endswith("very likely right") and score_note(1.0).endswith("very likely right")
    assert score_note(0.5, "number") == "verifier score 0.50"
    p = revision_prompt("Q?", [SharedAnswer(1, "\\boxed{3}", 0.9)], own_score=0.1)
    assert p.startswith("Your previous answer: verifier score 0.10: very likely wrong.")
    assert "## Agent 2 (verifier score 0.90: very likely right)" in p
    assert "verifier" not in revision_prompt("Q?", [SharedAnswer(1, "\\boxed{3}")])


# ---------------------------------------------------------------- refusals before anything starts


def test_verifier_train_config_refusals():
    from megatron_matpo.verifier.config import VerifierTrainConfig

    def bad(fields, match):
        with pytest.raises(ConfigError, match=match):
            config.build(VerifierTrainConfig, {"model": "m", **fields}).validate()

    bad({}, "transcripts: give MAPoRL transcripts")
    bad({"transcripts": ["r"], "sample": {"data": "d"}}, "exactly one")
    bad({"sample": {"data": ""}}, "sample.data")
    bad({"transcripts": ["r"], "holdout": 1.0}, "holdout")
    bad({"transcripts": ["r"], "balance_per_question": 0}, "balance_per_question")


def _maporl(tmp_path, *overrides):
    from megatron_matpo.train.config import TrainConfig

    return config.load(TrainConfig, REPO / "configs/maporl_verifier_tiny_cpu.yaml",
                       [f"model={tmp_path}/m", f"data={tmp_path}/d", f"run_dir={tmp_path}/run", *overrides])


def test_reward_model_verifier_refusals(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match="maporl.verifier.reward_model: .*url or the model_path"):
        _maporl(tmp_path, "maporl.verifier.reward_model.model_path=").validate()
    with pytest.raises(ConfigError, match="maporl.verifier.train: .*needs kind=reward_model"):
        _maporl(tmp_path, "maporl.verifier.kind=numeric").validate()
    with pytest.raises(ConfigError, match="maporl.verifier.kind"):
        _maporl(tmp_path, "maporl.verifier.kind=rm").validate()
    # a served model that cannot score: refused by preflight, naming the field, before any process
    from megatron_matpo.train.preflight import preflight

    cfg = _maporl(tmp_path, f"model={tiny_models['qwen3']}", f"data={tmp_path}",
                  f"maporl.verifier.reward_model.model_path={tiny_models['qwen3']}").validate()
    with pytest.raises(ConfigError, match="model_path: .*Qwen3ForCausalLM has no value head"):
        preflight(cfg)
    # a verifier to train first: its job is checked too (here a layout its base model does not divide)
    cfg = _maporl(tmp_path, f"model={tiny_models['qwen3']}", f"data={tmp_path}",
                  f"maporl.verifier.reward_model.model_path={tmp_path}/verifier/hf",
                  "maporl.verifier.train.actor.tp=3").validate()
    with pytest.raises(ConfigError, match="maporl.verifier.train.actor: .*3 does not divide"):
        preflight(cfg)


def test_train_verifier_cli_refuses_a_one_label_set(tmp_path, tiny_models):
    """Every answer wrong: one error line, exit 2, before any rank or engine starts."""
    (tmp_path / "step_000001.jsonl").write_text("\n".join(_line(f"q{i}", "\\boxed{4}") for i in range(4)) + "\n")
    r = subprocess.run([sys.executable, "-m", "megatron_matpo.cli", "train-verifier", f"model={tiny_models['qwen3']}",
                        f"transcripts=[{tmp_path}]", "sample=null", f"run_dir={tmp_path}/run"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == ("matpo train-verifier: error: transcripts: all 4 answers are wrong: "
                                                 "a verifier needs right and wrong answers (more or other transcripts, "
                                                 "or a policy that is sometimes right)")
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("path", ["configs/maporl_verifier_tiny_cpu.yaml", "configs/qwen3_8b_maporl_verifier.yaml"])
def test_the_loop_configs_derive_their_verifier_job(path):
    """Both MAPoRL-with-a-trained-verifier configs validate, and the `matpo train-verifier` job they start
    on first use trains the policy's model on a sampling pass of the run's own discussion and data."""
    from megatron_matpo.train.bootstrap import verifier_train_config
    from megatron_matpo.train.config import TrainConfig

    cfg = config.load(TrainConfig, REPO / path, []).validate()
    v = verifier_train_config(cfg)
    assert v.model == cfg.model and v.run_dir + "/hf" == cfg.maporl.verifier.served_model()
    assert v.sample.data == cfg.data and v.sample.toy_answer == cfg.bootstrap.toy_answer
    d = v.sample.maporl["discussion"]
    assert d["show_scores"] is False and cfg.maporl.discussion.show_scores  # no verifier yet while sampling
    assert d["first_round_sampling"] == (cfg.maporl.discussion.first_round_sampling or None)
    assert v.sample.engine.tp_size == cfg.rollout.engine.tp_size and v.transcripts == []
