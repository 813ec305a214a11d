"""A token-level conversation: the source of truth for what a trajectory trains on.

Generated tokens are appended exactly as the engine returned them (with its logprobs, loss mask 1).
Everything else (system/user/tool messages, end-of-turn markers, the next generation prompt) is
rendered by the tokenizer's chat template and tokenized *on its own*, so no generated text is ever
re-tokenized: re-tokenizing a turn can merge tokens across the boundary and train tokens the model
never produced.
"""
from __future__ import annotations

from dataclasses import dataclass, field

_ANCHOR = [{"role": "user", "content": "\u2063"}]  # an invisible anchor message for template deltas


class ChatTemplate:
    """Chat-template pieces as token ids, derived from the tokenizer's own template."""

    def __init__(self, tokenizer, enable_thinking: bool | None = None):
        self.tok = tokenizer
        self.kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        anchor = self._render(_ANCHOR)
        probe = "\u2064"
        closed = self._render(_ANCHOR + [{"role": "assistant", "content": probe}])
        gen_prefix = self._render(_ANCHOR, add_generation_prompt=True)
        # text the template puts after an assistant message's content, e.g. "<|im_end|>\n"
        self.turn_close = closed[closed.index(probe) + len(probe):]
        if not closed.startswith(anchor):
            raise ValueError("chat template does not render conversations as a prefix-stable sequence")
        self.assistant_open = gen_prefix[len(anchor):]
        eos = tokenizer.eos_token or ""
        if eos and not self.turn_close.startswith(eos):
            raise ValueError(f"chat template closes assistant turns with {self.turn_close!r}, "
                             f"not with eos {eos!r}; generation stop and template would disagree")
        self.eos_id = tokenizer.eos_token_id

    def _render(self, messages, add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                            **self.kw)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.encode(self._render(messages, add_generation_prompt=True))

    def continuation_ids(self, messages: list[dict], ended_with_eos: bool) -> list[int]:
        """Ids that close the last assistant turn, add `messages`, and open the next assistant turn."""
        anchor = self._render(_ANCHOR)
        full = self._render(_ANCHOR + messages, add_generation_prompt=True)
        close = self.turn_close[len(self.tok.eos_token):] if ended_with_eos else self.turn_close
        return self.encode(close + full[len(anchor):])


@dataclass
class Conversation:
    """Messages (for transcripts) and the token sequence (for training) of one agent."""

    template: ChatTemplate
    messages: list[dict]
    ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_len: int = 0
    # [start, end) token spans generated under a grammar constraint (regex): the engine's logprobs
    # there are of the masked distribution, so they are excluded from train/rollout parity metrics
    constrained_spans: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        if not self.ids:
            self.ids = self.template.prompt_ids(self.messages)
            self.loss_mask = [0] * len(self.ids)
            self.logprobs = [0.0] * len(self.ids)
            self.prompt_len = len(self.ids)

    def add_generated(self, ids: list[int], logprobs: list[float], text: str, constrained: bool = False) -> None:
        self.extend_turn(ids, logprobs, constrained)
        self.close_turn(text)

    def extend_turn(self, ids: list[int], logprobs: list[float] | None = None, constrained: bool = False) -> None:
        """Part of the assistant turn being written: sampled tokens (`logprobs` given: trained), or fixed
        ones the workflow writes for the model (None: not trained, the model had no choice over them)."""
        if logprobs is not None and len(logprobs) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(logprobs)} logprobs")
        if constrained and ids and logprobs is not None:
            self.constrained_spans.append((len(self.ids), len(self.ids) + len(ids)))
        self.ids += ids
        self.loss_mask += [0 if logprobs is None else 1] * len(ids)
        self.logprobs += [0.0] * len(ids) if logprobs is None else logprobs

    def close_turn(self, text: str) -> None:
        """The assistant turn's text (what transcripts and the format score read), once its tokens are in."""
        self.messages.append({"role": "assistant", "content": text})

    def add_messages(self, messages: list[dict]) -> None:
        # the turn's end-of-turn token, sampled or fixed: the template's close is not added twice
        ended_with_eos = len(self.ids) > self.prompt_len and self.ids[-1] == self.template.eos_id
        extra = self.template.continuation_ids(messages, ended_with_eos)
        self.ids += extra
        self.loss_mask += [0] * len(extra)
        self.logprobs += [0.0] * len(extra)
        self.messages.extend(messages)

    @property
    def generated_tokens(self) -> int:
        return sum(self.loss_mask)
