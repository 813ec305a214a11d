"""The verifier's training data: answers the agents wrote in MAPoRL discussions, labelled by the gold
answer, balanced by label, split by question.

Pure functions over transcript lines (`rollouts/*.jsonl` of a MAPoRL run: one line per turn, with its
`question`, `ground_truth` and `final_text`). Conventions:
- label 1 when the turn's final answer (last `\\boxed{}`, else the last number) matches a gold alias
  numerically within the tolerance, else as normalized text (`maporl.answers.matches_any`, the
  exact-match verifier's rule); an answer without a final answer is labelled 0 (it is not correct).
- evaluation transcripts (`eval_*.jsonl`) are never read: their questions are held out from training.
- the held-out split is by question: no question has answers on both sides.
"""
from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_matpo.maporl.answers import Tolerance, final_answer, matches_any


class VerifierDataError(ValueError):
    pass


@dataclass(frozen=True)
class LabelledAnswer:
    question: str
    response: str   # the turn's text: what the verifier reads as the assistant turn
    label: int      # 1: the final answer matches the gold answer
    where: str      # file:line it came from (error messages, audits)


def transcript_files(paths: Sequence[str | Path]) -> list[Path]:
    """Every training transcript under `paths` (files, or directories searched for `*.jsonl`), sorted;
    evaluation transcripts (`eval_*`) are skipped."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*.jsonl") if not f.name.startswith("eval_"))
        elif p.is_file():
            out.append(p)
        else:
            raise VerifierDataError(f"transcripts: {p} does not exist")
    if not out:
        raise VerifierDataError(f"transcripts: no *.jsonl transcript under {', '.join(map(str, paths))}")
    return out


def label_lines(lines: Iterable[tuple[str, dict]], tol: Tolerance = Tolerance()) -> list[LabelledAnswer]:
    """(where, transcript line) → labelled answers; a line without a gold answer is an error naming it."""
    out = []
    for where, d in lines:
        gold = d.get("ground_truth")
        if gold is None or gold == "" or gold == []:
            raise VerifierDataError(f"{where}: the turn has no ground_truth: answers can only be labelled against a "
                                    "gold answer (transcripts of a MAPoRL run on a data set with answers)")
        for key in ("question", "final_text"):
            if not isinstance(d.get(key), str):
                raise VerifierDataError(f"{where}: field {key!r} missing: not a MAPoRL discussion transcript")
        out.append(LabelledAnswer(d["question"], d["final_text"], int(matches_any(final_answer(d["final_text"]),
                                                                               gold, tol)), where))
    return out


def read_answers(paths: Sequence[str | Path], tol: Tolerance = Tolerance()) -> list[LabelledAnswer]:
    def lines():
        for f in transcript_files(paths):
            for i, text in enumerate(f.read_text().splitlines(), 1):
                if text.strip():
                    try:
                        yield f"{f}:{i}", json.loads(text)
                    except json.JSONDecodeError as e:
                        raise VerifierDataError(f"{f}:{i}: not JSON ({e.msg})") from None

    return label_lines(lines(), tol)


def balance(answers: Sequence[LabelledAnswer], per_question: int | None, seed: int) -> list[LabelledAnswer]:
    """Equal numbers of right and wrong answers. `per_question=k` (MAPoRL's recipe): per question at most
    k of each label and as many of one as of the other; a question with only one label contributes
    nothing. `None`: the majority label is subsampled to the minority's count over the whole set.
    Seeded; the result is in the input's order."""
    rng = random.Random(seed)
    if per_question is None:
        groups = {"all": list(answers)}
    else:
        groups = defaultdict(list)
        for a in answers:
            groups[a.question].append(a)
    keep: set[int] = set()
    index = {id(a): i for i, a in enumerate(answers)}
    for items in groups.values():
        pos = [a for a in items if a.label == 1]
        neg = [a for a in items if a.label == 0]
        k = min(len(pos), len(neg), per_question if per_question is not None else len(items))
        for side in (pos, neg):
            keep.update(index[id(a)] for a in rng.sample(side, k))
    return [answers[i] for i in sorted(keep)]


def split_by_question(answers: Sequence[LabelledAnswer], holdout: float, seed: int
                      ) -> tuple[list[LabelledAnswer], list[LabelledAnswer]]:
    """(train, held out): a seeded `holdout` fraction of the questions (at least one) and all their answers."""
    questions = sorted({a.question for a in answers})
    rng = random.Random(seed)
    rng.shuffle(questions)
    n = max(1, round(holdout * len(questions)))
    if n >= len(questions):
        raise VerifierDataError(f"holdout: {holdout} of {len(questions)} question(s) leaves none to train on")
    held = set(questions[:n])
    return [a for a in answers if a.question not in held], [a for a in answers if a.question in held]


def check_labels(name: str, answers: Sequence[LabelledAnswer]) -> None:
    """Both labels present: a one-label set cannot train (or measure) a classifier."""
    counts = {lab: sum(a.label == lab for a in answers) for lab in (0, 1)}
    if not counts[0] or not counts[1]:
        only = "right" if counts[1] else "wrong"
        raise VerifierDataError(f"{name}: all {len(answers)} answers are {only}: a verifier needs right and wrong "
                                "answers (more or other transcripts, or a policy that is sometimes right)")


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve: the probability that a random right answer scores above a random
    wrong one (ties count one half), by ranks (Mann-Whitney U)."""
    pairs = sorted(zip(scores, labels))
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        raise ValueError("AUC needs both labels")
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # average ranks over ties
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        avg = (i + 1 + j) / 2
        rank_sum += avg * sum(lab for _, lab in pairs[i:j])
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
