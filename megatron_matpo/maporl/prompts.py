"""Discussion prompts: a per-agent system prompt (persona), the round-0 question, and the revision
prompt that shows an agent the other agents' previous answers (optionally with verifier scores).
Short on purpose: every token is paid on every round of every agent (and tiny test models see them).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megatron_matpo.agents.prompts import THINK_CLOSE

ANSWER_INSTRUCTION = "Reason step by step, then give your final answer in \\boxed{}, e.g. \\boxed{42}."


def agent_name(i: int) -> str:
    return f"Agent {i + 1}"


def system_prompt(agent: int, n_agents: int, persona: str | None = None) -> str:
    """Who the agent is in the discussion; `persona` (e.g. "You check every calculation twice.")
    distinguishes agents that share one model."""
    if n_agents < 1 or not 0 <= agent < n_agents:
        raise ValueError(f"agent {agent} of {n_agents}")
    base = f"You are {agent_name(agent)}"
    if n_agents > 1:
        base += (f", one of {n_agents} agents who solve the same problem together. Each of you answers on "
                 "your own first; then you see the others' answers and may revise yours")
    base += ". Be correct and concise."
    return f"{base}\n{persona.strip()}" if persona and persona.strip() else base


def first_round_prompt(question: str) -> str:
    if not question or not question.strip():
        raise ValueError("the question must be a non-empty string")
    return f"{question.strip()}\n\n{ANSWER_INSTRUCTION}"


@dataclass(frozen=True)
class SharedAnswer:
    agent: int
    text: str                 # what the agent wrote (visible part) or only its final answer
    score: float | None = None


def shareable(text: str, max_chars: int) -> str:
    """What other agents see of a turn: no reasoning block before `</think>`, bounded length."""
    cut = text.rfind(THINK_CLOSE)
    if cut >= 0:
        text = text[cut + len(THINK_CLOSE):]
    text = text.strip()
    return text if len(text) <= max_chars else text[:max_chars] + " [...]"


# MAPoRL's feedback buckets (its code's thresholds on the verifier's probability: 0.3, 0.6, 0.8); our words
SCORE_BUCKETS = ((0.3, "very likely wrong"), (0.6, "possibly wrong, or its reasoning is not convincing yet"),
                 (0.8, "probably right, but worth checking again"), (float("inf"), "very likely right"))


def score_note(score: float, feedback: str = "bucket") -> str:
    """How a verifier score is shown: the number, and with `feedback="bucket"` what it means in words."""
    if feedback == "number":
        return f"verifier score {score:.2f}"
    words = next(w for bound, w in SCORE_BUCKETS if score < bound)
    return f"verifier score {score:.2f}: {words}"


def revision_prompt(question: str, others: Sequence[SharedAnswer], own_score: float | None = None,
                    feedback: str = "bucket") -> str:
    """Round t > 0: (with scores shown: the verifier's view of the agent's own previous answer,) the other
    agents' round t-1 answers, then an invitation to revise."""
    parts = [] if own_score is None else [f"Your previous answer: {score_note(own_score, feedback)}."]
    parts.append("Here are the other agents' answers from the previous round.")
    for o in others:
        head = f"## {agent_name(o.agent)}"
        if o.score is not None:
            head += f" ({score_note(o.score, feedback)})"
        parts.append(f"{head}\n{o.text if o.text.strip() else '(no answer)'}")
    if own_score is not None or any(o.score is not None for o in others):
        parts.append("A verifier score estimates how likely an answer is correct (0 to 1); it can be wrong.")
    parts.append("Compare their reasoning with yours. If you find a mistake, in your answer or theirs, "
                 "correct it; otherwise keep your answer and say why.")
    parts.append(f"The question again: {question.strip()}\n\n{ANSWER_INSTRUCTION}")
    return "\n\n".join(parts)
