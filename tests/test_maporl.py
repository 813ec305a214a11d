"""MAPoRL: rewards and incentives (hand-computed), answer parsing and verifiers (numeric, LLM judge
and reward model against real SGLang servers, reward-model client against a /classify server),
the arithmetic / GSM8K / ANLI data, and discussions on the real SGLang engine (tiny random model:
answers are noise, so the tests check structure, token-level rows and consensus stopping)."""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from megatron_matpo.data import read_dataset
from megatron_matpo.data.arithmetic import (ArithmeticConfig, apply_op, generate, gsm8k_gold, read_anli_jsonl,
                                            read_gsm8k_jsonl, write_arithmetic, write_config)
from megatron_matpo.data.schema import DatasetError
from megatron_matpo.maporl import (DiscussionConfig, DiscussionWorkflow, IncentiveWeights, NumericMatchVerifier,
                                   RewardConfig, RewardModelConfig, RewardModelError, RewardModelVerifier, Tolerance,
                                   VerifierConfig, answers_match, assign_rewards, consensus, final_answer,
                                   incentive_terms, influence_aware_rewards, make_verifier, maporl_rewards,
                                   parse_number, verify_discussions)
from megatron_matpo.maporl import prompts
from megatron_matpo.reward.judge import AccuracyItem, AccuracyScorer, LLMJudgeScorer

G = 0.3

# ---------------------------------------------------------------- influence-aware reward


def test_influence_aware_reward_hand_computed():
    # v[t][i], N = 2, T = 3; team means: round 1 -> 0.5, round 2 -> 1.0
    v = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    r = influence_aware_rewards(v, G)
    norm0, norm1 = 1 + G + G * G, 1 + G
    expect = [[(1 + G * 0.5 + G * G * 1.0) / norm0, (0 + G * 0.5 + G * G * 1.0) / norm0],
              [(0 + G * 1.0) / norm1, (1 + G * 1.0) / norm1],
              [1.0, 1.0]]  # last round: its own score
    assert torch.allclose(r, torch.tensor(expect), atol=1e-6)
    assert r[0, 0].item() == pytest.approx(1.24 / 1.39)


def test_influence_team_mean_includes_the_agent_itself():
    # agent 0 wrong both rounds, agent 1 right only at round 1: mean over {0, 1} = 0.5
    # (excluding agent 0 itself would give 1.0 for agent 0 and 0.0 for agent 1)
    r = influence_aware_rewards([[0.0, 0.0], [0.0, 1.0]], G)
    assert r[0, 0].item() == pytest.approx(G * 0.5 / (1 + G))
    assert r[0, 1].item() == pytest.approx(G * 0.5 / (1 + G))


def test_influence_horizon_stops_at_last_round_played_and_gamma_limits():
    # an early stop after 2 of 3 rounds: normaliser 1 + g, not 1 + g + g^2
    r = influence_aware_rewards([[1.0, 0.0], [1.0, 1.0]], G)
    assert r[0].tolist() == pytest.approx([1.0, G / (1 + G)])
    v = torch.tensor([[0.2, 0.9], [0.4, 0.6], [1.0, 0.0]])
    assert torch.allclose(influence_aware_rewards(v, 0.0), v)  # gamma 0: own score only
    # gamma 1: plain average of own score and future team means
    assert influence_aware_rewards(v, 1.0)[0, 0].item() == pytest.approx((0.2 + 0.5 + 0.5) / 3)
    # a single agent: a discounted average of its own scores
    assert influence_aware_rewards([[0.0], [1.0]], G)[0, 0].item() == pytest.approx(G / (1 + G))
    with pytest.raises(ValueError):
        influence_aware_rewards([1.0, 0.0], G)
    with pytest.raises(ValueError):
        RewardConfig(gamma=1.5)


# ---------------------------------------------------------------- incentives

W = IncentiveWeights(corrective=0.1, regress=0.2, persuasion=0.3, misleading=0.4)


def test_corrective_and_regress():
    # agent 0: wrong -> right (corrective at round 1); agent 1: right -> wrong (regress at round 1)
    terms = incentive_terms([[0, 1], [1, 0]], W, answers=[["3", "5"], ["5", "4"]])
    assert terms["corrective"].tolist() == [[0, 0], [pytest.approx(0.1), 0]]
    assert terms["regress"].tolist() == [[0, 0], [0, pytest.approx(0.2)]]
    # agent 1 went to "4", not to agent 0's "3": no misleading; agent 0 adopted agent 1's right "5"
    assert terms["misleading"].sum() == 0
    assert terms["persuasion"].tolist() == [[0, pytest.approx(0.3)], [0, 0]]


def test_persuasion_and_misleading_need_adoption():
    # swap: agent 0 (wrong "3") and agent 1 (right "5") each take the other's answer
    answers = [["3", "5"], ["5", "3"]]
    t = incentive_terms([[0, 1], [1, 0]], W, answers=answers)
    assert t["persuasion"].tolist() == [[0, pytest.approx(0.3)], [0, 0]]  # agent 1 persuaded agent 0
    assert t["misleading"].tolist() == [[pytest.approx(0.4), 0], [0, 0]]  # agent 0 misled agent 1
    br = maporl_rewards([[0, 1], [1, 0]], RewardConfig(gamma=G, incentives=W), answers)
    infl = influence_aware_rewards([[0, 1], [1, 0]], G)
    expect = infl + torch.tensor([[-0.4, 0.3], [0.1, -0.2]])
    assert torch.allclose(br.total, expect, atol=1e-6)
    assert br.components(1, 0)["corrective"] == pytest.approx(0.1)
    # the same flips with answers that do not match the other agent's: no persuasion terms
    t = incentive_terms([[0, 1], [1, 0]], W, answers=[["3", "5"], ["5.0", "7"]])
    assert t["persuasion"][0, 1] == pytest.approx(0.3)  # "5.0" == "5" numerically
    assert t["misleading"].sum() == 0
    # without answers (e.g. a reward-model verifier) the correctness flips alone count
    t = incentive_terms([[0, 1], [1, 0]], W)
    assert t["persuasion"][0, 1] == pytest.approx(0.3) and t["misleading"][0, 0] == pytest.approx(0.4)


def test_persuasion_counts_the_fraction_of_others_and_uses_the_threshold():
    # N = 3: agent 0 right at round 0; agents 1 and 2 wrong; only agent 1 adopts agent 0's answer
    scores = [[0.9, 0.1, 0.2], [0.8, 0.7, 0.3]]  # threshold 0.5 decides right/wrong
    answers = [["12", "10", "11"], ["12", "12", "11"]]
    t = incentive_terms(scores, W, answers=answers, threshold=0.5)
    assert t["persuasion"][0].tolist() == pytest.approx([0.3 / 2, 0, 0])
    assert t["corrective"][1].tolist() == pytest.approx([0, 0.1, 0])
    assert t["persuasion"][1].sum() == 0  # the last round persuades nobody
    assert t["regress"].sum() == 0 and t["misleading"].sum() == 0
    # all-zero weights: no incentive at all; negative weights are refused
    assert all(v.sum() == 0 for v in incentive_terms(scores, IncentiveWeights(), answers=answers).values())
    with pytest.raises(ValueError):
        IncentiveWeights(persuasion=-0.1)
    with pytest.raises(ValueError):
        incentive_terms(scores, W, answers=[["1", "2", "3"]])


# ---------------------------------------------------------------- answers and the numeric verifier


@pytest.mark.parametrize("text, value", [
    ("42", 42.0), ("-3.5", -3.5), ("\u22127", -7.0), ("1,234", 1234.0), ("$12.50", 12.5), ("\\$12", 12.0),
    ("75%", 75.0), ("3/4", 0.75), ("\\frac{3}{4}", 0.75), ("\\dfrac{1}{8}", 0.125), ("12 \\text{ apples}", 12.0),
    ("12 apples", 12.0), ("1e3", 1000.0), (".5", 0.5), ("18.", 18.0),
    ("x = 5", None), ("3 + 4", None), ("1/0", None), ("entailment", None), ("", None), (None, None),
    ("12,34", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_final_answer_and_matching():
    assert final_answer("so 3, then 4, and finally 18.") == "18"
    assert final_answer("\\boxed{7} but maybe 8") == "7"          # a box wins over later numbers
    assert final_answer("<think>it is 5</think> no idea") is None  # reasoning is not the answer
    assert final_answer("<think>5</think> \\boxed{6}") == "6"
    assert final_answer("") is None and final_answer("no digits") is None
    assert answers_match("1,000", "1000") and answers_match("0.30000001", "0.3")
    assert not answers_match("0.31", "0.3")
    assert answers_match("0.31", "0.3", Tolerance(rel=0.1, abs=0.0))
    assert answers_match("Entailment.", "entailment") and not answers_match("5", "five")
    assert not answers_match(None, "5") and not answers_match("", "")
    assert consensus(["12", "12.0", "$12"]) and not consensus(["12", None]) and not consensus([])


def test_numeric_match_verifier():
    v = NumericMatchVerifier()
    assert isinstance(v, AccuracyScorer)
    items = [AccuracyItem("q", "18", "6 * 3 = 18, so \\boxed{18}"), AccuracyItem("q", "18", "it is 18.0"),
             AccuracyItem("q", ["1200", "1,200"], "\\boxed{1,200 apples}"), AccuracyItem("q", "18", "\\boxed{17}"),
             AccuracyItem("q", "neutral", "\\boxed{Neutral}"), AccuracyItem("q", "18", "no idea")]
    res = asyncio.run(v.score(items))
    assert [r.score for r in res] == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert res[0].pred == "18" and res[-1].pred is None
    assert v.pop_metrics() == {"verifier/no_answer": 1.0, "verifier/accuracy": pytest.approx(4 / 6)}
    assert isinstance(make_verifier(VerifierConfig()), NumericMatchVerifier)
    assert isinstance(make_verifier(VerifierConfig(kind="judge", judge={"base_url": "http://x/v1", "model": "m"})),
                      LLMJudgeScorer)
    with pytest.raises(ValueError):
        make_verifier(VerifierConfig(kind="oracle"))


# ---------------------------------------------------------------- reward model client: /classify protocol


@dataclass
class ClassifyServer:
    """SGLang 0.5.23's /classify as `http_server.classify_request` answers it: `input_ids` (one list
    or a batch), one `{"embedding": [score], "meta_info"}` per input (a bare object for one input).
    The score is len(ids) / 100; `script` queues HTTP failures for the next requests."""
    url: str = ""
    requests: list = field(default_factory=list)
    script: list = field(default_factory=list)
    labels: int = 1

    async def classify(self, request):
        from starlette.responses import JSONResponse, PlainTextResponse

        body = await request.json()
        self.requests.append(body)
        if self.script:
            return PlainTextResponse("overloaded", status_code=self.script.pop(0))
        ids = body["input_ids"]
        batch = ids if ids and isinstance(ids[0], list) else [ids]
        out = [{"embedding": [len(x) / 100] * self.labels,
                "meta_info": {"id": f"r{k}", "finish_reason": {"type": "length", "length": 0},
                              "prompt_tokens": len(x), "weight_version": "default"}} for k, x in enumerate(batch)]
        return JSONResponse(out if batch is ids else out[0])


@pytest.fixture(scope="module")
def classify_server():
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Route

    srv = ClassifyServer()
    app = Starlette(routes=[Route("/classify", srv.classify, methods=["POST", "PUT"])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    srv.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield srv
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture(scope="module")
def tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["qwen3"])


def test_reward_model_client_protocol(classify_server, tok):
    srv = classify_server
    srv.requests.clear()
    v = RewardModelVerifier(RewardModelConfig(url=srv.url, tokenizer_path="unused", batch_size=2, backoff_s=0.01),
                            tokenizer=tok)
    items = [AccuracyItem("What is 2+2?", "4", "x" * k + " \\boxed{4}") for k in (1, 5, 9, 13, 17)]
    res = asyncio.run(v.score(items))
    ids = [v.input_ids(it) for it in items]
    # the reward model's chat template over (user question, assistant answer), tokenized here
    text = tok.decode(ids[0])
    assert "What is 2+2?" in text and items[0].response in text and text.rstrip().endswith("<|im_end|>")
    assert sorted(map(len, (b["input_ids"] for b in srv.requests)), reverse=True) == [2, 2, 1]  # batches of 2
    for r, x in zip(res, ids):
        raw = len(x) / 100
        assert r.details["rm_score"] == pytest.approx(raw) and r.score == pytest.approx(1 / (1 + math.exp(-raw)))
        assert r.pred == "4"
    raw_v = RewardModelVerifier(RewardModelConfig(url=srv.url, tokenizer_path="-", squash="none"), tokenizer=tok)
    assert asyncio.run(raw_v.score(items[:1]))[0].score == pytest.approx(len(ids[0]) / 100)
    # a 503 is retried; a 400 is not
    srv.script[:] = [503]
    assert len(asyncio.run(v.score(items[:1]))) == 1 and v.pop_metrics()["verifier/rm_retries"] == 1
    srv.script[:] = [400]
    with pytest.raises(RewardModelError, match="HTTP 400"):
        asyncio.run(v.score(items[:1]))
    # a two-label classifier is not a scalar reward model
    srv.labels = 2
    try:
        with pytest.raises(RewardModelError, match="scalar"):
            asyncio.run(v.score(items[:1]))
    finally:
        srv.labels = 1


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MATPO_TEST_SGLANG_RM") != "1",
                    reason="starts a second SGLang server (1-3 min on 2 cores); set MATPO_TEST_SGLANG_RM=1")
def test_reward_model_verifier_against_real_sglang(tiny_models, tok, tmp_path):
    """A tiny Qwen3ForSequenceClassification (one label) served by SGLang: /classify scores equal
    transformers'. SGLang 0.5.23 gives Qwen2/Qwen3ForSequenceClassification a score-head bias that
    transformers' head has not (so no checkpoint has one and it stays unloaded, a different offset
    on every start): the checkpoint here carries an explicit zero `score.bias`."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from megatron_matpo.rollout.engine import EngineConfig, launch_engines

    cfg = AutoConfig.from_pretrained(tiny_models["qwen3"])
    cfg.architectures, cfg.num_labels = ["Qwen3ForSequenceClassification"], 1
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_models["qwen3"], config=cfg, dtype=torch.float32)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)
    rm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({**weights, "score.bias": torch.zeros(1)}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    items = [AccuracyItem("What is 2+2?", "4", f"{k} apples, so \\boxed{{{k}}}") for k in (3, 4, 5)]
    v = RewardModelVerifier(RewardModelConfig(url="", tokenizer_path=str(tmp_path), squash="none"))
    with torch.no_grad():
        ref = [rm(torch.tensor([v.input_ids(it)])).logits.item() for it in items]
    (server,) = launch_engines(EngineConfig(model_path=str(tmp_path), log_dir=str(tmp_path / "logs"),
                                            mem_fraction_static=0.1), 1)
    try:
        v.config.url = server.url
        got = [r.score for r in asyncio.run(v.score(items))]
    finally:
        server.stop()
    assert got == pytest.approx(ref, abs=1e-4)
    assert len(set(round(x, 4) for x in got)) == 3  # distinct inputs, distinct scores


# ---------------------------------------------------------------- data


SMALL = ArithmeticConfig(seed=5, n_train=40, n_val=10, val_repeat=2, min_ops=2, max_ops=3, operand_min=3,
                         operand_max=20, max_factor=4)


def _digest(paths) -> dict[str, str]:
    return {k: hashlib.sha256(Path(p).read_bytes()).hexdigest() for k, p in paths.items()}


def test_arithmetic_data_deterministic_and_valid(tmp_path):
    a = write_arithmetic(tmp_path / "a", SMALL)
    b = write_arithmetic(tmp_path / "b", SMALL)
    assert set(a) == {"maporl_train_arithmetic", "maporl_val_arithmetic_repeat_2"}
    assert _digest(a) == _digest(b)  # byte-identical
    other = write_arithmetic(tmp_path / "c", ArithmeticConfig(**{**vars(SMALL), "seed": 6}))
    assert _digest(other) != _digest(a)
    train = read_dataset(tmp_path / "a" / "maporl_train_arithmetic")
    val = read_dataset(tmp_path / "a" / "maporl_val_arithmetic_repeat_2")
    assert len(train) == 40 and len(val) == 20 and val.repeat_k == 2
    assert not {s.question for s in train} & {s.question for s in val}  # disjoint splits
    for s in train:
        meta = s.extra["metadata"]
        assert s.data_source == "arithmetic" and s.ability == "math" and s.split == "train"
        assert 2 <= len(meta["ops"]) <= 3 and s.extra["question_type"] == f"{len(meta['ops'])}ops"
        assert SMALL.operand_min <= meta["start"] <= SMALL.operand_max
        value = meta["start"]
        for op, k in zip(meta["ops"], meta["operands"]):
            if op in ("mul", "div"):
                assert 2 <= k <= SMALL.max_factor
            else:
                assert SMALL.operand_min <= k <= SMALL.operand_max
            value = apply_op(op, value, k)
            assert value >= 0
        assert str(value) == s.ground_truth and meta["solution"].endswith(f"#### {value}")
        assert s.prompt == [{"role": "user", "content": prompts.first_round_prompt(s.question)}]
        assert s.question.endswith("have now?")


def test_arithmetic_knobs_and_tool(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_arithmetic_data", Path(__file__).parents[1] / "tools" / "make_arithmetic_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    only_add = ArithmeticConfig(n_train=5, n_val=2, min_ops=4, max_ops=4, ops=("add",), operand_min=1,
                                operand_max=3)
    train, _ = generate(only_add)
    assert all(len(p.steps) == 4 and {s.op for s in p.steps} == {"add"} for p in train)
    assert all(p.answer == p.start + sum(s.operand for s in p.steps) for p in train)
    for bad in ({"min_ops": 3, "max_ops": 2}, {"ops": ("sub", "div")}, {"ops": ("pow",)}, {"max_factor": 1}):
        with pytest.raises(ValueError):
            ArithmeticConfig(**bad)
    with pytest.raises(ValueError, match="distinct"):  # 1 op, operands 1..1: only a handful of problems
        generate(ArithmeticConfig(n_train=500, n_val=5, min_ops=1, max_ops=1, operand_min=1, operand_max=1,
                                  ops=("add",)))
    assert cli.main(["--out", str(tmp_path), "--train", "6", "--val", "3", "--max-ops", "2", "--ops", "add,mul",
                 "--name", "tiny"]) == 0
    ds = read_dataset(tmp_path / "maporl_train_tiny")
    assert len(ds) == 6 and all(set(s.extra["metadata"]["ops"]) <= {"add", "mul"} for s in ds)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_gsm8k_loader(tmp_path):
    f = _jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "A farm sells 1,000 eggs at $2. Revenue?", "answer": "1000*2=2000\n#### 2,000"},
    ])
    samples = read_gsm8k_jsonl(f, "test")
    assert [s.ground_truth for s in samples] == ["7", "2000"]
    assert samples[0].data_source == "gsm8k" and samples[0].extra["metadata"]["solution"] == "3 + 4 = <<3+4=7>>7"
    assert samples[1].question.startswith("A farm") and samples[1].index == 1
    out = write_config(samples, tmp_path, "maporl_test_gsm8k")
    back = read_dataset(out.parent)
    assert [s.ground_truth for s in back] == ["7", "2000"] and back[0].prompt[-1]["content"].startswith("Tom has")
    assert gsm8k_gold("x\n####  -1,5\n") == "-15"
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(DatasetError, match=r"bad.jsonl line 1: field answer"):
        read_gsm8k_jsonl(bad, "test")
    with pytest.raises(DatasetError, match="line 2: not JSON"):
        read_gsm8k_jsonl(_jsonl(tmp_path / "b2.jsonl", [{"question": "q", "answer": "#### 1"}, "{oops"]), "test")


def test_anli_loader(tmp_path):
    hf = _jsonl(tmp_path / "anli_hf.jsonl", [
        {"premise": "A man plays a guitar.", "hypothesis": "A person makes music.", "label": 0},
        {"premise": "A dog sleeps.", "hypothesis": "The dog is brown.", "label": 1},
        {"premise": "It is raining.", "hypothesis": "The ground is dry from sun.", "label": 2},
    ])
    s = read_anli_jsonl(hf, "val")
    assert [x.ground_truth for x in s] == ["entailment", "neutral", "contradiction"]
    assert "Premise: A man plays a guitar." in s[0].question and "Hypothesis: A person makes music." in s[0].question
    assert s[0].ability == "nli" and s[0].data_source == "anli"
    orig = _jsonl(tmp_path / "anli_r1.jsonl", [
        {"uid": "abc-1", "context": "Paris is in France.", "hypothesis": "Paris is in Spain.", "label": "c"},
        {"uid": "abc-2", "context": "Cats purr.", "hypothesis": "Cats can purr.", "label": "e"},
    ])
    s2 = read_anli_jsonl(orig, "train")
    assert [x.ground_truth for x in s2] == ["contradiction", "entailment"] and s2[0].index == "abc-1"
    back = read_dataset(write_config(s2, tmp_path, "maporl_train_anli").parent)
    assert [x.ground_truth for x in back] == ["contradiction", "entailment"]
    # the numeric verifier compares label words as normalized text
    res = asyncio.run(NumericMatchVerifier().score([AccuracyItem(s2[0].question, "contradiction",
                                                                 "\\boxed{Contradiction}")]))
    assert res[0].score == 1.0
    with pytest.raises(DatasetError, match="field label"):
        read_anli_jsonl(_jsonl(tmp_path / "bad.jsonl", [{"premise": "p", "hypothesis": "h", "label": 7}]), "val")


# ---------------------------------------------------------------- discussions on the real engine


def _discuss(engine, tok, cfg: DiscussionConfig, question: str, gold: str = "7", n_engines: int = 1,
             verifier=None, seed: int | None = 11, uid: str = "q0#0"):
    from megatron_matpo.rollout.engine import EngineClient, EngineRouter

    async def go():
        routers = [EngineRouter([EngineClient(engine.url)]) for _ in range(n_engines)]
        try:
            gens = routers if n_engines > 1 else routers[0]
            wf = DiscussionWorkflow(cfg, gens, [tok] * n_engines if n_engines > 1 else tok, verifier=verifier)
            d = await wf.rollout(question, uid, "q0", gold=gold, seed=seed)
            return d, [r.assigned[0] for r in routers]
        finally:
            for r in routers:
                await r.aclose()

    return asyncio.run(go())


QUESTION = "Mia has 3 apples and buys 4 more. How many apples does she have?"
PERSONAS = ["You double-check arithmetic.", "You explain briefly."]


@pytest.fixture(scope="module")
def discussion(engine, tok):
    cfg = DiscussionConfig(n_agents=2, rounds=3, max_tokens_per_turn=12, max_context_tokens=2048, seeded=True,
                           personas=PERSONAS)
    return _discuss(engine, tok, cfg, QUESTION, n_engines=2)


@pytest.mark.slow
def test_discussion_structure(discussion):
    d, assigned = discussion
    assert d.rounds_played == 3 and len(d.turns) == 6 and d.stop_reason == "rounds"
    assert assigned == [3, 3]  # distinct generators: each agent's requests went to its own engine
    grid = d.grid()
    for t, row in enumerate(grid):
        for i, x in enumerate(row):
            assert (x.agent, x.round, x.role, x.group_id) == (i, t, f"agent{i}", "q0")
            assert x.traj_id == f"q0#0/a{i}/r{t}" and x.turns == 1
            assert x.parent_id == (grid[t - 1][i].traj_id if t else None)
            assert x.seen == ([grid[t - 1][1 - i].traj_id] if t else [])
            assert x.answer == final_answer(x.final_text)
            assert x.messages[0]["role"] == "system" and PERSONAS[i] in x.messages[0]["content"]
            assert len(x.messages) == 2 + 2 * t + 1  # system, question, (answer, revision)*t, answer
            assert x.to_json()["round"] == t


@pytest.mark.slow
def test_discussion_rows_are_token_level(discussion, tok):
    d, _ = discussion
    grid = d.grid()
    for t, row in enumerate(grid):
        for i, x in enumerate(row):
            n = len(x.token_ids)
            assert len(x.loss_mask) == len(x.logprobs) == n and 0 < x.prompt_len < n
            # the loss mask is exactly this round's generated tokens: the suffix after the prompt
            assert x.loss_mask == [0] * x.prompt_len + [1] * (n - x.prompt_len)
            assert all(lp == 0.0 for lp in x.logprobs[:x.prompt_len])
            assert all(lp <= 0.0 for lp in x.logprobs[x.prompt_len:])
            gen = x.token_ids[x.prompt_len:]
            body = gen[:-1] if gen[-1] == tok.eos_token_id else gen
            assert tok.decode(body, skip_special_tokens=False) == x.final_text
            if t:
                # the agent's conversation continues: its previous row is a prefix of this one, ids
                # unchanged (generated tokens never re-tokenized)
                prev = grid[t - 1][i]
                assert x.token_ids[:len(prev.token_ids)] == prev.token_ids
                # the revision prompt shows the other agent's previous answer
                prompt = tok.decode(x.token_ids[len(prev.token_ids):x.prompt_len], skip_special_tokens=False)
                other = grid[t - 1][1 - i]
                shared = prompts.shareable(other.final_text, 2000) or "(no answer)"
                assert "Agent " + str(2 - i) in prompt and shared in prompt
                assert "<|im_start|>user" in prompt and "<|im_start|>assistant" in prompt
                assert QUESTION in prompt and "verifier score" not in prompt


@pytest.mark.slow
def test_discussion_verified_and_rewarded(discussion, tok):
    # (seeded sampling: SGLang 0.5.23 only honours `sampling_seed` on an engine started with
    # --enable-deterministic-inference, which the shared test engine is not; a seed is still required)
    d, _ = discussion
    with pytest.raises(ValueError, match="seed"):
        asyncio.run(DiscussionWorkflow(DiscussionConfig(seeded=True), None, tok).rollout(QUESTION, "u", "g"))
    with pytest.raises(ValueError, match="turns without a verifier score"):
        d.scores()
    asyncio.run(verify_discussions([d], NumericMatchVerifier()))
    assert d.scores().shape == (3, 2)
    br = assign_rewards(d, RewardConfig(gamma=G, incentives=W))
    for x in d.turns:
        assert x.reward == pytest.approx(float(br.total[x.round, x.agent]))
        assert set(x.reward_components) == {"influence", "corrective", "regress", "persuasion", "misleading",
                                            "score"}
    expect = maporl_rewards(d.scores(), RewardConfig(gamma=G, incentives=W), d.answers()).total
    assert torch.allclose(br.total, expect)


@pytest.mark.slow
def test_discussion_stops_on_consensus(engine, tok):
    # both agents forced to answer \boxed{7} in round 0: they agree, so round 1 never runs
    cfg = DiscussionConfig(n_agents=2, rounds=3, max_tokens_per_turn=16, stop_on_consensus=True,
                           first_round_sampling={"regex": r"The answer is \\boxed\{7\}"})
    d, _ = _discuss(engine, tok, cfg, QUESTION, seed=None)
    assert d.stop_reason == "consensus" and d.rounds_played == 1 and len(d.turns) == 2
    assert [x.answer for x in d.turns] == ["7", "7"] and d.final_consensus()
    assert all(x.constrained_spans == [(x.prompt_len, len(x.token_ids))] for x in d.turns)
    # forced disagreement never stops early
    cfg.first_round_sampling = {"regex": r"The answer is \\boxed\{[0-9]\}"}
    cfg.later_round_sampling = {"regex": r"The answer is \\boxed\{[0-9]\}"}
    d2, _ = _discuss(engine, tok, cfg, QUESTION, seed=None, uid="q0#1")
    if d2.stop_reason == "consensus":  # the two random digits agreed (p = 0.1 per round)
        assert d2.rounds_played < 3 and consensus(d2.answers()[-1])
    else:
        assert d2.rounds_played == 3 and not any(consensus(a) for a in d2.answers()[:2])
    # influence-aware reward with an early stop: horizon = rounds played
    asyncio.run(verify_discussions([d], NumericMatchVerifier()))
    assign_rewards(d)
    assert [x.reward for x in d.turns] == [1.0, 1.0]


@pytest.mark.slow
def test_discussion_shows_judge_scores(engine, tok, tiny_models):
    """An LLM judge (the real SGLang server's /v1/chat/completions) scores round 0 during the
    rollout, and round 1 prompts show those scores."""
    from megatron_matpo.reward.judge import JudgeConfig

    judge = make_verifier(VerifierConfig(kind="judge", judge=dict(
        base_url=f"{engine.url}/v1", model=tiny_models["qwen3"], api_key="none", max_retries=0)))
    cfg = DiscussionConfig(n_agents=2, rounds=2, max_tokens_per_turn=16, show_scores=True,
                           first_round_sampling={"regex": r"So \\boxed\{[78]\}"})
    d, _ = _discuss(engine, tok, cfg, QUESTION, verifier=judge, seed=None)
    assert isinstance(judge.config, JudgeConfig)
    assert judge.pop_metrics()["acc/judge_calls"] >= 2  # round 0: both answers boxed, both judged
    assert all(x.score in (0.0, 1.0) for x in d.turns)
    words = {0.0: "very likely wrong", 1.0: "very likely right"}  # the buckets at the judge's two scores
    for i, x in enumerate(d.grid()[1]):
        prompt = tok.decode(x.token_ids[:x.prompt_len])
        other, own = d.grid()[0][1 - i], d.grid()[0][i]
        assert f"Agent {2 - i} (verifier score {other.score:.2f}: {words[other.score]})" in prompt
        assert f"Your previous answer: verifier score {own.score:.2f}: {words[own.score]}." in prompt
    with pytest.raises(ValueError, match="show_scores"):
        DiscussionWorkflow(cfg, None, tok)


# ---------------------------------------------------------------- trainer rows (GRPO per question, agent, round)

def _turn(q: int, k: int, i: int, t: int, reward: float, ids: list[int] | None = None):
    """Agent i's round-t turn: its conversation grows by a 1-token prompt and a 2-token answer a round
    (`ids` gives the whole conversation's tokens), the loss mask and logprobs on this round's answer."""
    from megatron_matpo.maporl.discussion import DiscussionTurn

    n = 3 * (t + 1)
    ids = ids[:n] if ids is not None else [1, 2, 3] * (t + 1)
    return DiscussionTurn(traj_id=f"q{q}#{k}/a{i}/r{t}", role=f"agent{i}", group_id=f"q{q}", sample_uid=f"q{q}#{k}",
                          parent_id=None, token_ids=list(ids), loss_mask=[0] * (n - 3) + [0, 1, 1],
                          logprobs=[0.0] * (n - 3) + [0.0, -1.0 - t, -2.0 - t], prompt_len=n - 3, messages=[],
                          final_text="", agent=i, round=t, reward=reward)


def _discussions(rewards: dict, ids: dict | None = None) -> list:
    from megatron_matpo.maporl.discussion import Discussion

    return [Discussion(f"q{q}#{k}", f"q{q}", "?", 2, 2,
                       [_turn(q, k, i, t, rewards[q, k, i, t], ids and ids[q, k, i]) for t in (0, 1) for i in (0, 1)])
            for q in (0, 1) for k in (0, 1)]


# 2 questions x 2 discussions x 2 agents x 2 rounds; reward = a distinct value per cell and sample
REWARDS = {(q, k, i, t): 10 * q + 4 * i + 2 * t + k * (1 + i + t) for q in (0, 1) for k in (0, 1)
           for i in (0, 1) for t in (0, 1)}


def test_turn_rows_grpo_per_question_agent_round_and_routing():
    from megatron_matpo.maporl.task import turn_rows

    ds = _discussions(REWARDS)
    adv = {(q, k, i, t): REWARDS[q, k, i, t] - (REWARDS[q, 0, i, t] + REWARDS[q, 1, i, t]) / 2  # - the cell's mean
           for (q, k, i, t) in REWARDS}
    per_turn = turn_rows(ds, n_samples=2, stacks=1, norm_by_std=False, merge_turns=False)
    assert len(per_turn) == 1 and [len(p) for p in per_turn[0]] == [8, 8]
    for q in (0, 1):
        for r, (k, t, i) in zip(per_turn[0][q], [(k, t, i) for k in (0, 1) for t in (0, 1) for i in (0, 1)]):
            assert r.advantage == pytest.approx(adv[q, k, i, t])
            assert r.role == f"agent{i}" and r.reward == REWARDS[q, k, i, t]
            assert r.old_logprobs == [0.0] * (3 * t) + [0.0, -1.0 - t, -2.0 - t]
    assert [r.row_id for p in per_turn[0] for r in p] == list(range(16))
    # merged: one row per (discussion, agent) = its round-1 conversation, each round's tokens carrying
    # that round's advantage and logprobs, one reward per round
    shared = turn_rows(ds, n_samples=2, stacks=1, norm_by_std=False)
    assert [len(p) for p in shared[0]] == [4, 4]
    for q in (0, 1):
        for r, (k, i) in zip(shared[0][q], [(k, i) for k in (0, 1) for i in (0, 1)]):
            assert r.token_ids == [1, 2, 3] * 2 and r.loss_mask == [0, 1, 1] * 2 and r.role == f"agent{i}"
            assert r.advantage == pytest.approx([0.0, adv[q, k, i, 0], adv[q, k, i, 0], 0.0, adv[q, k, i, 1],
                                                 adv[q, k, i, 1]])
            assert r.old_logprobs == [0.0, -1.0, -2.0, 0.0, -2.0, -3.0]
            assert r.reward == [REWARDS[q, k, i, 0], REWARDS[q, k, i, 1]]
    distinct = turn_rows(ds, n_samples=2, stacks=2, norm_by_std=False)
    for i in (0, 1):  # agent i's turns, and only those, train policy i
        assert {r.role for p in distinct[i] for r in p} == {f"agent{i}"}
        assert [r.row_id for p in distinct[i] for r in p] == list(range(4))
    bad = _discussions(REWARDS)
    bad[0].turns[2].token_ids[0] = 9  # round 1 of agent 0 no longer extends its round 0
    with pytest.raises(ValueError, match="not a prefix"):
        turn_rows(bad, n_samples=2, stacks=1)


def test_merged_turn_rows_give_the_per_turn_update(tiny_models):
    """Against transformers: the token-mean policy-gradient loss and its gradient on merged rows equal
    those on one row per turn, and so do GAE's advantages and returns from a causal critic's values
    (here: the model's logit of token 0 at each position)."""
    from transformers import AutoModelForCausalLM

    from megatron_matpo.maporl.task import turn_rows
    from megatron_matpo.train.rows import apply_gae

    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen3"], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    ids = {(q, k, i): torch.randint(5, 200, (6,), generator=g).tolist() for q in (0, 1) for k in (0, 1) for i in (0, 1)}
    ds = _discussions(REWARDS, ids)

    def forward(rows):
        """Per row: logprob of each token given its prefix, and the 'value' at each generated token."""
        out = []
        for r in rows:
            x = torch.tensor([r.token_ids])
            logits = model(input_ids=x).logits[0]
            lp = torch.cat([torch.zeros(1, dtype=logits.dtype), torch.log_softmax(logits[:-1], -1)
                            .gather(-1, x[0, 1:, None])[:, 0]])
            out.append((lp, logits[:, 0].detach()))
        return out

    def loss_and_grad(rows):
        model.zero_grad()
        fw = forward(rows)
        n = sum(sum(r.loss_mask) for r in rows)
        loss = sum(-(torch.tensor(r.advantage if isinstance(r.advantage, list) else [r.advantage] * len(r),
                                  dtype=torch.float64) * lp * torch.tensor(r.loss_mask)).sum()
                   for r, (lp, _) in zip(rows, fw)) / n
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    per_turn = [r for p in turn_rows(ds, 2, 1, merge_turns=False)[0] for r in p]
    merged = [r for p in turn_rows(ds, 2, 1)[0] for r in p]
    assert sum(len(r) for r in merged) < sum(len(r) for r in per_turn)
    (l1, g1), (l2, g2) = loss_and_grad(per_turn), loss_and_grad(merged)
    assert l1 == pytest.approx(l2, rel=1e-12, abs=1e-15)
    # fp64 model, but transformers' Qwen3RMSNorm computes in fp32: its backward of a summed gradient
    # (merged) and of two separate ones (per turn) round differently at ~1e-7 of the largest entry
    assert g1.abs().max() > 0 and (g1 - g2).abs().max() <= 1e-5 * g1.abs().max(), \
        ((g1 - g2).abs().max(), g1.abs().max())
    with torch.no_grad():
        values = {rows_id: {r.row_id: v[[j for j, m in enumerate(r.loss_mask) if m]].numpy()
                            for r, (_, v) in zip(rows, forward(rows))} for rows_id, rows in
                  (("turn", per_turn), ("merged", merged))}
    apply_gae(per_turn, values["turn"], gamma=0.9, lam=0.8)
    apply_gae(merged, values["merged"], gamma=0.9, lam=0.8)

    def by_token(rows):  # (conversation, position) -> (advantage, return) at each generated token
        return {(tuple(r.token_ids[:j + 1]), j): (r.advantage[j], r.returns[j])
                for r in rows for j, m in enumerate(r.loss_mask) if m}

    a, b = by_token(per_turn), by_token(merged)
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12) for k in a)
