"""Vocabulary padding for tensor parallelism.

megatron-core splits the embedding and output layer rows evenly over TP ranks, so a vocabulary that TP
does not divide (e.g. 999 after `resize_token_embeddings(len(tokenizer))`) is padded, as megatron-bridge
0.6.2's GPT provider does with `should_pad_vocab` (it loads HF weights into the padded rows as zeros).
We pad to the next multiple of TP only (`make_vocab_size_divisible_by=1`), so a vocabulary that TP divides
is not padded at all and every layout of it keeps the HF shapes.

The padded rows are not tokens: their logits are masked to the dtype's lowest value at the output layer
(`mask_padded_logits`), so log-probabilities, entropy, the softmax and its gradient see exactly the
original vocabulary; every HF tensor leaving the model is cut back to it (`trim_hf_tensor`), so exported
checkpoints and the engines' weights have the original size."""
from __future__ import annotations

HF_VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")  # the HF tensors with a row per token


def padded_vocab_size(vocab: int, tp: int) -> int:  # light: the layout planner imports it (no torch)
    return -(-vocab // tp) * tp


def trim_hf_tensor(name: str, tensor, vocab: int):
    """An exported HF tensor with the padding rows dropped (a view; other tensors unchanged)."""
    return tensor[:vocab] if name in HF_VOCAB_ROWS and tensor.shape[0] > vocab else tensor


def mask_padded_logits(chunks: list, vocab: int, tp: int) -> None:
    """Mask the padding columns of the output layer's logits on every chunk that has one (a pre-wrap
    hook of `build_model`). Works on this TP rank's shard ([s, b, V_pad / tp], the training path) and on
    gathered logits ([s, b, V_pad])."""
    import torch
    from megatron.core import parallel_state

    padded = padded_vocab_size(vocab, tp)
    if padded == vocab:
        return
    rank = parallel_state.get_tensor_model_parallel_rank()
    masks: dict = {}  # (width, device) -> the padding columns of a shard that holds some (else None)

    def pad_mask(width: int, device):
        if (width, device) not in masks:
            start = 0 if width == padded else rank * width  # gathered logits, or this rank's shard
            cols = torch.arange(start, start + width, device=device)
            masks[width, device] = cols >= vocab if start + width > vocab else None
        return masks[width, device]

    def hook(module, args, output):
        logits, bias = output if isinstance(output, tuple) else (output, None)
        pad = pad_mask(logits.shape[-1], logits.device)
        if pad is None:
            return output
        logits = logits.masked_fill(pad, torch.finfo(logits.dtype).min)
        return (logits, bias) if isinstance(output, tuple) else logits

    for chunk in chunks:
        layer = getattr(chunk, "output_layer", None)
        if layer is not None:
            layer.register_forward_hook(hook)
