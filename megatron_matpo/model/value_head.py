"""A scalar value head in place of a Megatron GPTModel's vocabulary projection (the critic of PPO+GAE).

GPTModel calls `output_layer(hidden, weight=..., runtime_gather_output=...)` after its final norm and
returns the result as [b, s, out]; a head returning [s, b, 1] makes the same model emit per-position
values. The head is one replicated Linear: every TP rank sees the same (final-norm) hidden states, so
its output and gradients agree across TP ranks without communication.
"""
from __future__ import annotations

import torch


class ValueHead(torch.nn.Module):
    # `weight` / `bias` directly on the head (no nested Linear): megatron's LanguageModule checkpointing
    # looks up `output_layer.weight` by name
    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32, bias: bool = True):
        super().__init__()
        # zero init: V = 0 everywhere at the start, so the first advantages are the plain discounted rewards
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype))
        # bias=False: the score head of an HF `*ForSequenceClassification` (a Linear without bias), what a
        # verifier exports to (verifier/export.py)
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype)) if bias else None

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        return torch.nn.functional.linear(hidden_states, self.weight, self.bias), None


def attach_value_heads(chunks: list, bias: bool = True) -> list:
    """Replace the LM head of the last pipeline stage by a ValueHead (a `pre_wrap_hook`: before DDP and
    the optimizer see the parameters). The input embedding stays; it is no longer tied to an output."""
    for c in chunks:
        c.share_embeddings_and_output_weights = False  # no embedding/output grad all-reduce across PP
        if getattr(c, "post_process", False):
            cfg = c.config
            c.output_layer = ValueHead(cfg.hidden_size, cfg.params_dtype, bias).to(next(c.parameters()).device)
    return chunks
