"""A scripted oracle in the engine's seat: it writes the next assistant message of a planner, worker or
single-agent conversation on the offline multi-hop set, so the real workflow, tools, prompts and chat
template produce demonstrations (sft/demos.py).

The oracle knows each question's hop chain (`extra_info.metadata.hops` of the multi-hop data) but acts
only on what the conversation shows: a planner delegates one hop per subtask, naming the entity the
previous report found; a worker searches the subtask's entity, scrapes the page the search returned for
it, and reports the fact it read there under the four headings of the summary prompt; the planner (or
the single agent) boxes the answer once the last report (or page) states it. Where the conversation does
not show what the script needs (a search without the page, a report without the entity), it raises
`OracleMiss` and that demonstration is dropped, never papered over.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_matpo.agents import prompts
from megatron_matpo.agents.conversation import ChatTemplate
from megatron_matpo.agents.toolcall import render_tool_call
from megatron_matpo.data.multihop import RELATION_BY_NAME, Hop
from megatron_matpo.rollout.engine import Generation
from megatron_matpo.toolbox.specs import AGENT_SERVER, GOOGLE_SEARCH, SCRAPE, SEARCH_AND_BROWSE, SEARCH_SERVER


class OracleMiss(RuntimeError):
    """The conversation lacks what the script needs for its next message."""


_SUBTASK_RE = re.compile(r"<subtask>\n(.*?)\n</subtask>", re.S)


def subtask_text(hop: Hop) -> str:
    """A self-contained subtask that names the hop's subject: the relation's question about it."""
    rel = RELATION_BY_NAME[hop.relation]
    x = f"the film {hop.subject}" if rel.subject == "film" else hop.subject
    return rel.question.format(x=x)


def worker_report(hop: Hop) -> str:
    """The worker's final summary, in the summary prompt's four sections."""
    said = (hop.fact, f"Source: {hop.url}", f"Stated on the page of {hop.subject}.",
            f"The answer to this subtask is {hop.object}.")
    return "\n".join(f"{heading}\n{text}" for (heading, _), text in zip(prompts.SUMMARY_SECTIONS, said))


@dataclass
class _Script:
    question: str
    answer: str
    hops: tuple[Hop, ...]


class OracleGenerator:
    """`Generator` (agents.workflow) over a set of multi-hop samples; `generate` returns the oracle's
    message as token ids ending with EOS, logprobs 0 (no policy sampled them)."""

    def __init__(self, samples, tokenizer, prompt_style: str = "full"):
        self.tok = tokenizer
        self.template = ChatTemplate(tokenizer)
        self.open_text = self.template.assistant_open  # e.g. "<|im_start|>assistant\n"
        self.by_prompt: dict[str, _Script] = {}
        self.by_subtask: dict[str, Hop] = {}
        for s in samples:
            hops = tuple(Hop(**h) for h in (s.extra.get("metadata") or {}).get("hops") or [])
            if not hops:
                raise ValueError(f"sample {s.uid}: no extra_info.metadata.hops: the oracle writes demonstrations "
                                 "for the offline multi-hop set only")
            script = _Script(s.question, s.ground_truth, hops)
            # the whole user message, closed: a question never matches inside a longer one
            self.by_prompt[prompts.planner_user_prompt(s.question, prompt_style) + self.template.turn_close] = script
            for hop in hops:
                self.by_subtask[subtask_text(hop)] = hop

    async def generate(self, input_ids: list[int], sampling: dict) -> Generation:
        text = self.tok.decode(input_ids, skip_special_tokens=False)
        message = self.next_message(text)
        ids = self.template.encode(message) + [self.template.eos_id]
        if len(ids) > sampling.get("max_new_tokens", len(ids)):
            raise OracleMiss(f"the next message needs {len(ids)} tokens, the turn allows {sampling['max_new_tokens']}")
        return Generation(output_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop",
                          prompt_tokens=len(input_ids))

    async def aclose(self) -> None:  # the engine router's interface; nothing to release
        return None

    # ---- the script ---------------------------------------------------------------------------
    def next_message(self, text: str) -> str:
        turn = text.count(self.open_text) - 1  # assistant messages so far (the last open one is ours)
        observations = self._observations(text)
        if "# Your role: browsing agent" in text:
            return self._worker(text, turn, observations)
        script = next((s for p, s in self.by_prompt.items() if p in text), None)
        if script is None:
            raise OracleMiss("the conversation asks a question the oracle has no script for")
        if "# Your role: planner" in text:
            return self._planner(script, turn, observations)
        return self._single(script, turn, observations)

    def _observations(self, text: str) -> list[str]:
        """What came back after each assistant message (the user messages that follow one)."""
        parts = text.split(self.open_text)[1:-1]  # each: an assistant message, then what followed it
        return [p.split(self.template.turn_close, 1)[-1] for p in parts]

    def _planner(self, s: _Script, turn: int, obs: list[str]) -> str:
        if turn > 0 and s.hops[turn - 1].object not in obs[-1]:
            raise OracleMiss(f"the report for {s.hops[turn - 1].subject!r} does not name {s.hops[turn - 1].object!r}")
        if turn < len(s.hops):
            return render_tool_call(AGENT_SERVER, SEARCH_AND_BROWSE.name, {"subtask": subtask_text(s.hops[turn])})
        return f"The answer is \\boxed{{{s.answer}}}."

    def _worker(self, text: str, turn: int, obs: list[str]) -> str:
        m = _SUBTASK_RE.search(text)
        hop = self.by_subtask.get(m.group(1).strip()) if m else None
        if hop is None:
            raise OracleMiss("a worker subtask the oracle did not write")
        if obs and prompts.SUMMARY_REQUEST in obs[-1]:
            return worker_report(hop)
        return self._browse(hop, turn, obs, finished=f"I read the page of {hop.subject}: {hop.fact}")

    def _browse(self, hop: Hop, step: int, obs: list[str], finished: str) -> str:
        """search the subject, then scrape its page (once the search listed it), then `finished`."""
        if step == 0:
            return render_tool_call(SEARCH_SERVER, GOOGLE_SEARCH.name, {"q": hop.subject})
        if step == 1:
            if hop.url not in obs[-1]:
                raise OracleMiss(f"the search for {hop.subject!r} did not list {hop.url}")
            return render_tool_call(SEARCH_SERVER, SCRAPE.name, {"url": hop.url})
        if hop.fact not in obs[-1]:
            raise OracleMiss(f"the page {hop.url} does not state {hop.fact!r}")
        return finished

    def _single(self, s: _Script, turn: int, obs: list[str]) -> str:
        k, step = divmod(turn, 2)
        if k > 0 and step == 0 and s.hops[k - 1].fact not in obs[-1]:
            raise OracleMiss(f"the page {s.hops[k - 1].url} does not state {s.hops[k - 1].fact!r}")
        if k == len(s.hops):
            return f"The answer is \\boxed{{{s.answer}}}."
        return self._browse(s.hops[k], step, obs, finished="")  # step is 0 or 1: no closing message
