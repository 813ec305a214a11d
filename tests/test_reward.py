"""Answer extraction/matching, the accuracy scorers (LLM judge against a local OpenAI-compatible
server), and MATPO's reward combination, all against hand-computed values."""
import asyncio
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from megatron_matpo.agents.toolcall import render_tool_call
from megatron_matpo.reward import (
    AccuracyItem,
    AccuracyScorer,
    ExactMatchScorer,
    JudgeConfig,
    JudgeError,
    LLMJudgeScorer,
    exact_match,
    extract_boxed,
    f1,
    matpo_reward,
    matpo_reward_from_turns,
    normalize_answer,
    single_agent_reward,
    single_agent_reward_from_turns,
)
from megatron_matpo.reward.judge import parse_grade
from megatron_matpo.toolbox.specs import AGENT_SERVER, SEARCH_SERVER

# ---------------------------------------------------------------- boxed extraction


@pytest.mark.parametrize("text, expected", [
    ("The answer is \\boxed{Paris}.", "Paris"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{A} then \\boxed{ {B} and {C} }", "{B} and {C}"),
    ("\\boxed{a \\{ b}", "a \\{ b"),                      # escaped brace does not open a group
    ("$\\boxed 42$ is it", "42"),
    ("\\fbox{X}", "X"),
    ("\\boxed{done} and then \\boxed{trunc", "done"),     # unterminated last box is skipped
    ("no box here", None),
    ("\\boxedfoo{1}", None),
    ("", None),
    ("\\boxed{}", ""),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# ---------------------------------------------------------------- EM / F1


def test_normalize_answer():
    assert normalize_answer("  The Eiffel-Tower,  in PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("\\text{An Apple}") == "apple"
    assert normalize_answer("“Théâtre” — a play") == "théâtre play"


def test_exact_match_and_f1_hand_computed():
    assert exact_match("the Danube", "Danube") == 1.0
    assert exact_match("Danube river", "Danube") == 0.0
    assert exact_match("Donau", ["Danube", "Donau"]) == 1.0
    assert exact_match(None, "x") == 0.0
    assert exact_match("x", []) == 0.0
    # pred tokens [new, york, city], gold [new, york]: P = 2/3, R = 1, F1 = 2*(2/3)/(5/3) = 0.8
    assert f1("New York City", "new york") == pytest.approx(0.8)
    # pred [barack, obama], gold [obama]: P = 1/2, R = 1 -> 2/3 ; alias "Barack Obama" -> 1
    assert f1("Barack Obama", "Obama") == pytest.approx(2 / 3)
    assert f1("Barack Obama", ["Obama", "Barack Obama"]) == 1.0
    # repeated tokens count once per occurrence: pred [a1, a1, b], gold [a1, b, c] -> common 2, P=R=2/3
    assert f1("a1 a1 b", "a1 b c") == pytest.approx(2 / 3)
    assert f1("paris", "london") == 0.0
    assert f1("the", "a") == 1.0   # both normalize to empty
    assert f1("the", "x") == 0.0
    assert f1(None, "x") == 0.0


def test_exact_match_scorer():
    scorer = ExactMatchScorer()
    assert isinstance(scorer, AccuracyScorer)
    items = [AccuracyItem("q", "New York", "... so \\boxed{new york}"),
             AccuracyItem("q", ["NYC", "New York"], "\\boxed{New York City}"),
             AccuracyItem("q", "x", "I give up")]
    res = asyncio.run(scorer.score(items))
    assert [r.score for r in res] == [1.0, 0.0, 0.0]
    assert [r.pred for r in res] == ["new york", "New York City", None]
    assert res[1].details["f1"] == pytest.approx(0.8)
    m = scorer.pop_metrics()
    assert m["acc/em_mean"] == pytest.approx(1 / 3) and m["acc/f1_mean"] == pytest.approx(1.8 / 3)
    assert m["acc/no_answer"] == 1.0
    assert scorer.pop_metrics() == {"acc/no_answer": 0.0}


# ---------------------------------------------------------------- LLM judge against a local server

@dataclass
class FakeJudgeServer:
    """OpenAI-compatible /v1/chat/completions. By default it grades like a careful judge would on
    our prompt: A when the predicted answer equals the gold target, B otherwise, gibberish when
    the prediction is 'GARBAGE'. `script` overrides the next replies: an int is an HTTP status."""
    url: str = ""
    requests: list[dict] = field(default_factory=list)
    script: list[int | str] = field(default_factory=list)
    delay_s: float = 0.0
    in_flight: int = 0
    max_in_flight: int = 0

    def reset(self) -> None:
        self.requests.clear()
        self.script.clear()
        self.delay_s = 0.0
        self.max_in_flight = 0

    async def completions(self, request: Request):
        body = await request.json()
        self.requests.append({"json": body, "authorization": request.headers.get("authorization")})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        action = self.script.pop(0) if self.script else None
        if isinstance(action, int):
            headers = {"retry-after": "0"} if action == 429 else {}
            return PlainTextResponse("server trouble", status_code=action, headers=headers)
        content = action if isinstance(action, str) else self.grade(body["messages"][-1]["content"])
        return JSONResponse({
            "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101},
        })

    @staticmethod
    def grade(prompt: str) -> str:
        gold = re.search(r"^Gold target: (.*)$", prompt, re.M).group(1)
        pred = re.search(r"^Predicted answer: (.*)$", prompt, re.M).group(1)
        if pred == "GARBAGE":
            return "Well,"
        return "A" if pred.lower() in gold.lower().split(" or ") else "B"


@pytest.fixture(scope="module")
def judge_server():
    fake = FakeJudgeServer()
    app = Starlette(routes=[Route("/v1/chat/completions", fake.completions, methods=["POST"])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake judge server did not start"
        time.sleep(0.01)
    yield fake
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture()
def fake(judge_server):
    deadline = time.monotonic() + 5  # let requests abandoned by an earlier test (timeouts) finish
    while judge_server.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    judge_server.reset()
    return judge_server


def make_judge(fake, **kw) -> LLMJudgeScorer:
    cfg = dict(base_url=fake.url, model="judge-model", api_key="secret", backoff_s=0.01, timeout_s=5.0)
    return LLMJudgeScorer(JudgeConfig(**(cfg | kw)))


def test_fake_server_speaks_openai_format(fake):
    # independent check of the fake server: the official SDK must accept its responses
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=fake.url, api_key="k", max_retries=0)
    out = client.chat.completions.create(model="m", max_tokens=2, messages=[
        {"role": "user", "content": "Gold target: x\nPredicted answer: x"}])
    assert out.choices[0].message.content == "A"


def test_judge_grades_and_sends_grading_prompt(fake):
    judge = make_judge(fake)
    assert isinstance(judge, AccuracyScorer)
    items = [AccuracyItem("What is the longest river in Europe?", "Volga", "So it is \\boxed{Volga}"),
             AccuracyItem("Capital of France?", "Paris", "\\boxed{Lyon}"),
             AccuracyItem("Who wrote Dune?", ["Frank Herbert", "Herbert"], "\\boxed{Herbert}"),
             AccuracyItem("q?", "x", "\\boxed{GARBAGE}"),
             AccuracyItem("q?", "x", "no boxed answer at all")]
    res = asyncio.run(judge.score(items))
    assert [r.score for r in res] == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert [r.details["grade"] for r in res] == ["A", "B", "A", None, "C"]
    assert len(fake.requests) == 4  # no request for the response without an answer
    assert all(r["authorization"] == "Bearer secret" for r in fake.requests)
    prompts = [r["json"]["messages"][0]["content"] for r in fake.requests]  # arrival order varies
    body = next(r["json"] for r in fake.requests if "longest river" in r["json"]["messages"][0]["content"])
    assert body["model"] == "judge-model" and body["max_tokens"] == 2 and body["temperature"] == 0
    prompt = body["messages"][0]["content"]
    assert body["messages"][0]["role"] == "user" and len(body["messages"]) == 1
    assert "Question: What is the longest river in Europe?\nGold target: Volga\nPredicted answer: Volga\n" in prompt
    assert "A, B or C" in prompt
    assert any("Gold target: Frank Herbert OR Herbert\nPredicted answer: Herbert" in p for p in prompts)
    m = judge.pop_metrics()
    assert m["acc/judge_parse_errors"] == 1 and m["acc/judge_grade_A"] == 2 and m["acc/judge_grade_B"] == 1
    assert m["acc/no_answer"] == 1 and m["acc/judge_calls"] == 4 and m["acc/judge_retries"] == 0
    assert judge.pop_metrics()["acc/judge_calls"] == 0


def test_judge_retries_then_succeeds(fake):
    fake.script[:] = [500, 429]  # fail twice (one with Retry-After), then grade normally
    judge = make_judge(fake)
    res = asyncio.run(judge.score([AccuracyItem("q", "x", "\\boxed{x}")]))
    assert res[0].score == 1.0
    assert len(fake.requests) == 3
    m = judge.pop_metrics()
    assert m["acc/judge_retries"] == 2 and m["acc/judge_calls"] == 3 and m["acc/judge_failures"] == 0


def test_judge_gives_up_after_retries(fake):
    fake.script[:] = [503] * 10
    judge = make_judge(fake, max_retries=2)
    with pytest.raises(JudgeError, match="after 3 attempts: HTTP 503"):
        asyncio.run(judge.score([AccuracyItem("q", "x", "\\boxed{x}")]))
    assert len(fake.requests) == 3
    fake.reset()
    fake.script[:] = [503] * 10
    judge = make_judge(fake, max_retries=1, fail_open=True)
    res = asyncio.run(judge.score([AccuracyItem("q", "x", "\\boxed{x}")]))
    assert res[0].score == 0.0 and "503" in res[0].details["error"]
    assert judge.pop_metrics()["acc/judge_failures"] == 1


def test_judge_does_not_retry_client_errors(fake):
    fake.script[:] = [401]
    judge = make_judge(fake)
    with pytest.raises(JudgeError, match="HTTP 401"):
        asyncio.run(judge.score([AccuracyItem("q", "x", "\\boxed{x}")]))
    assert len(fake.requests) == 1


def test_judge_timeout(fake):
    fake.delay_s = 2.0
    judge = make_judge(fake, timeout_s=0.2, max_retries=1)
    t0 = time.monotonic()
    with pytest.raises(JudgeError, match="ReadTimeout"):
        asyncio.run(judge.score([AccuracyItem("q", "x", "\\boxed{x}")]))
    assert time.monotonic() - t0 < 1.5  # two 0.2 s attempts, not the server's 2 s
    assert judge.pop_metrics()["acc/judge_calls"] == 2


def test_judge_unreachable_server():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = LLMJudgeScorer(JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key=None,
                                       backoff_s=0.01, max_retries=1, fail_open=True))
    res = asyncio.run(judge.score([AccuracyItem("q", "x", "\\boxed{x}")]))
    assert res[0].score == 0.0 and "ConnectError" in res[0].details["error"]


def test_judge_concurrency_limit(fake):
    fake.delay_s = 0.1
    judge = make_judge(fake, max_concurrency=2)
    res = asyncio.run(judge.score([AccuracyItem("q", "x", "\\boxed{x}")] * 6))
    assert [r.score for r in res] == [1.0] * 6
    assert fake.max_in_flight == 2


def test_parse_grade():
    assert [parse_grade(s) for s in ["A", " B.", "(C)", "A\n", "**A**"]] == ["A", "B", "C", "A", "A"]
    assert [parse_grade(s) for s in ["", None, "a", "Answer", "D", "I think"]] == [None] * 6


def test_judge_config_from_env(monkeypatch):
    monkeypatch.setenv("MATPO_JUDGE_BASE_URL", "http://judge:8000/v1/")
    monkeypatch.setenv("MATPO_JUDGE_MODEL", "qwen-judge")
    monkeypatch.delenv("MATPO_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback")
    cfg = JudgeConfig()
    assert (cfg.url, cfg.model, cfg.api_key) == ("http://judge:8000/v1/chat/completions", "qwen-judge", "sk-fallback")
    monkeypatch.setenv("MATPO_JUDGE_API_KEY", "sk-judge")
    assert JudgeConfig().api_key == "sk-judge"
    with pytest.raises(ValueError):
        JudgeConfig(max_concurrency=0)


# ---------------------------------------------------------------- MATPO combination


def test_matpo_reward_hand_computed():
    r = matpo_reward(1.0, 0.5, [1.0, 0.0, 0.5])
    # 0.9*1 + 0.5*(0.1*0.5 + mean(0.1, 0, 0.05)) = 0.9 + 0.5*(0.05 + 0.05) = 0.95
    assert r.total == pytest.approx(0.95)
    assert (r.accuracy, r.format_planner, r.format_worker_mean, r.num_workers) == (1.0, 0.5, 0.5, 3)
    assert matpo_reward(0.0, 1.0, [0.25]).total == pytest.approx(0.5 * (0.1 + 0.025))
    assert matpo_reward(1.0, 1.0, [1.0, 1.0]).total == pytest.approx(1.0)
    assert matpo_reward(0.0, 0.0, [0.0]).total == 0.0
    assert r.metrics()["reward/format_worker_mean"] == 0.5


def test_matpo_reward_without_workers_counts_worker_format_as_one():
    r = matpo_reward(1.0, 0.0, [])
    assert r.total == pytest.approx(0.9 + 0.5 * (0.0 + 0.1))
    assert (r.format_worker_mean, r.num_workers) == (1.0, 0)
    assert matpo_reward(0.0, 1.0, []).total == pytest.approx(0.1)


def test_single_agent_reward():
    r = single_agent_reward(1.0, 0.5)
    assert r.total == pytest.approx(0.95) and r.format_worker_mean is None
    assert "reward/format_worker_mean" not in r.metrics()
    with pytest.raises(ValueError):
        single_agent_reward(1.5, 1.0)
    with pytest.raises(ValueError):
        matpo_reward(1.0, float("nan"), [])


def test_matpo_reward_from_turns():
    delegate = "Plan: ask a worker.\n" + render_tool_call(AGENT_SERVER, "search_and_browse", {"subtask": "find x"})
    wrong_role = render_tool_call(SEARCH_SERVER, "google_search", {"q": "x"})  # not a planner tool
    search = render_tool_call(SEARCH_SERVER, "google_search", {"q": "x"})
    bad_search = render_tool_call(SEARCH_SERVER, "google_search", {"query": "x"})
    planner = [delegate, wrong_role, "\\boxed{x}"]            # format 1/2
    workers = [[search, "summary"], [search, bad_search]]      # formats 1 and 1/2 -> mean 0.75
    r = matpo_reward_from_turns(1.0, planner, workers)
    assert (r.format_planner, r.format_worker_mean) == (0.5, 0.75)
    assert r.total == pytest.approx(0.9 + 0.5 * (0.05 + 0.075))
    s = single_agent_reward_from_turns(0.0, [search, bad_search, "\\boxed{x}"])
    assert s.total == pytest.approx(0.1 * 0.5)


@pytest.mark.slow
def test_judge_client_against_real_sglang_server(engine, tiny_models):
    """The judge speaks to a real OpenAI-compatible server (SGLang's /v1/chat/completions on the tiny
    model): the request/response protocol round-trips; a random model's reply is graded 0.0 unless
    it happens to start with a valid letter."""
    import asyncio

    from megatron_matpo.reward.judge import AccuracyItem, JudgeConfig, LLMJudgeScorer

    scorer = LLMJudgeScorer(JudgeConfig(base_url=f"{engine.url}/v1", model=tiny_models["qwen3"], api_key="none",
                                        max_retries=0))
    (res,) = asyncio.run(scorer.score([AccuracyItem("Who?", "Alpha", r"so \boxed{Alpha}")]))
    metrics = scorer.pop_metrics()
    assert res.score in (0.0, 1.0)
    assert metrics.get("acc/judge_calls") == 1 and not metrics.get("acc/judge_failures")
