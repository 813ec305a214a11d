"""Tiny, deterministic HF model directories (Qwen3 / Qwen2 / Llama architectures) with a small
byte-level BPE tokenizer carrying the Qwen3 special tokens and a ChatML chat template.

Used by the tests and by the embedded default job: a 151k vocabulary would dominate CPU time, so the
tokenizer is trained here (seconds) on a synthetic corpus, or on a corpus the caller provides.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# Qwen3's added tokens, in Qwen3's order. The `<|...|>` ones are special (skipped on decode); the
# think/tool tags are plain added tokens so decoded text keeps them, as in Qwen3.
QWEN3_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN3_ADDED = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]

# ChatML as Qwen3 renders plain conversations; `enable_thinking=False` pre-fills an empty think block
# like Qwen3's template does.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

_WORDS = (
    "the a of in on to and is was for by with from as at which who what when where how many year city "
    "river country person born founded capital author film album song company university team "
    "search query result page url title snippet scrape browse subtask answer question final summary "
    "conclusion supporting information observations contribution main task planner worker agent tool "
    "server name arguments json true false null number string think step first then next finally"
).split()


def synthetic_corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic English-like lines plus the markup the agents write (XML tool calls, JSON)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 18))]
        line = " ".join(words).capitalize() + rng.choice([".", "?", "!", ":"])
        if i % 5 == 0:
            line += (' <use_mcp_tool><server_name>search_and_scrape_webpage</server_name>'
                     '<tool_name>google_search</tool_name><arguments>{"q": "%s"}</arguments></use_mcp_tool>'
                     % " ".join(words[:3]))
        if i % 7 == 0:
            line += " \\boxed{%d} https://example.org/wiki/%s" % (rng.randint(0, 3000), words[0])
        lines.append(line)
    return lines


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """A byte-level BPE `PreTrainedTokenizerFast` with Qwen3's added tokens and the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN3_SPECIAL) - len(QWEN3_ADDED),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": QWEN3_SPECIAL})
    fast.eos_token, fast.pad_token = "<|im_end|>", "<|endoftext|>"
    fast.add_tokens(QWEN3_ADDED, special_tokens=False)
    fast.chat_template = CHATML_TEMPLATE
    return fast


@dataclass
class TinyShape:
    """Small enough for CPU, shaped so that TP=2 (heads, kv heads) and PP=2 (layers) divide it."""
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    ffn_hidden_size: int = 128
    max_position_embeddings: int = 4096


def _hf_config(arch: str, vocab_size: int, shape: TinyShape, tok) -> dict:
    common = dict(
        vocab_size=vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.ffn_hidden_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-6, hidden_act="silu", initializer_range=0.02, torch_dtype="float32",
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        rope_theta=1000000.0, attention_dropout=0.0, use_cache=True,
    )
    if arch == "qwen3":
        return dict(common, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=shape.head_dim,
                    attention_bias=False, tie_word_embeddings=False)
    if arch == "qwen2":  # Qwen2 has q/k/v bias and (at small sizes) tied embeddings
        assert shape.head_dim * shape.num_heads == shape.hidden_size
        return dict(common, architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True)
    if arch == "llama":
        return dict(common, architectures=["LlamaForCausalLM"], model_type="llama", head_dim=shape.head_dim,
                    attention_bias=False, mlp_bias=False, tie_word_embeddings=False, rope_theta=500000.0,
                    # Llama-3.1's frequency scaling (what megatron-core reproduces: model/rope.py)
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192})
    raise ValueError(f"unknown tiny architecture {arch!r}; choose qwen3, qwen2 or llama")


def make_tiny_model(out_dir: str | Path, arch: str = "qwen3", seed: int = 0, shape: TinyShape | None = None,
                    corpus: Iterable[str] | None = None, tokenizer_vocab: int = 2048, tokenizer=None) -> Path:
    """Write a random-init (fixed seed) HF model directory with its tokenizer; returns the path."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = shape or TinyShape()
    tok = tokenizer or train_tokenizer(corpus if corpus is not None else synthetic_corpus(seed=seed), tokenizer_vocab)
    vocab = (len(tok) + 127) // 128 * 128  # padded like Qwen's configs; divisible by any small TP
    cfg_dict = _hf_config(arch, vocab, shape, tok)
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    config = AutoConfig.from_pretrained(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "qwen2":  # non-zero biases so the test proves they are converted
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
