"""Exact parameter counts and matmul FLOPs of the dense decoder models we train (Qwen3, Qwen2, Llama),
from the HuggingFace config alone.

Counts follow the modules of both implementations, which hold the same tensors: per layer an input
RMSNorm, fused (Megatron) or separate (HF) q/k/v projections, the output projection, optional per-head
q/k RMSNorms (Qwen3), a post-attention RMSNorm and a SwiGLU MLP (gate, up, down); then the final
norm, the input embedding and, unless tied, the output layer. Biases follow HF's flags: Qwen2 always
has q/k/v biases; Qwen3 and Llama add q/k/v/o biases with `attention_bias`; Llama adds MLP biases
with `mlp_bias`.

FLOPs count multiply-adds of matrix products as 2 FLOPs and nothing else (norms, RoPE, SiLU,
softmax and residual adds are elementwise and left out, as `torch.utils.flop_counter` does).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megatron_matpo.model.vocab import padded_vocab_size

QKV_BIAS_ALWAYS = ("Qwen2ForCausalLM",)  # Qwen2's q/k/v projections carry a bias whatever the config says
QK_NORM = ("Qwen3ForCausalLM",)


@dataclass(frozen=True)
class ModelSpec:
    """What the cost model needs to know about a dense decoder-only transformer."""
    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    qk_norm: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    max_position_embeddings: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, source: str | Path | Any) -> "ModelSpec":
        """From an HF model directory, its config.json, or a loaded `PretrainedConfig`."""
        if isinstance(source, (str, Path)):
            from megatron_matpo.model.builder import load_hf_config

            path = Path(source)
            config = load_hf_config(path.parent if path.is_file() else path)
        else:
            config = source
        arch = (getattr(config, "architectures", None) or ["?"])[0]
        heads = config.num_attention_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            arch=arch, hidden=config.hidden_size, layers=config.num_hidden_layers, heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size, vocab=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qk_norm=arch in QK_NORM,
            qkv_bias=arch in QKV_BIAS_ALWAYS or attention_bias,
            o_bias=attention_bias and arch not in QKV_BIAS_ALWAYS,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            max_position_embeddings=getattr(config, "max_position_embeddings", 0) or 0,
        )

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- parameters


def layer_params(spec: ModelSpec, tp: int = 1) -> int:
    """Parameters of one transformer layer held by one tensor-parallel rank.

    Megatron shards q/k/v, fc1 (gate+up) weights and their biases by output rows, the output
    projection and fc2 weights by input columns; norms and the row-parallel biases (o, fc2) are
    replicated on every TP rank.
    """
    h, qkv = spec.hidden, spec.q_dim + 2 * spec.kv_dim
    sharded = h * qkv + spec.q_dim * h + 3 * h * spec.intermediate
    sharded += qkv if spec.qkv_bias else 0
    sharded += 2 * spec.intermediate if spec.mlp_bias else 0
    replicated = 2 * h  # input and post-attention RMSNorm
    replicated += 2 * spec.head_dim if spec.qk_norm else 0  # q/k norms act per head: one head_dim vector each
    replicated += h if spec.o_bias else 0
    replicated += h if spec.mlp_bias else 0  # fc2 bias
    return sharded // tp + replicated


def param_counts(spec: ModelSpec) -> dict[str, int]:
    """Whole-model parameter counts by part (unsharded); `total` counts tied weights once."""
    emb = spec.vocab * spec.hidden
    parts = {
        "embedding": emb,
        "layers": spec.layers * layer_params(spec),
        "final_norm": spec.hidden,
        "output_layer": 0 if spec.tied_embeddings else emb,
    }
    parts["total"] = sum(parts.values())
    return parts


def total_params(spec: ModelSpec) -> int:
    return param_counts(spec)["total"]


def stage_params(spec: ModelSpec, tp: int, pp: int, stage: int) -> int:
    """Parameters on one rank of pipeline stage `stage` (0-based) at tensor parallel `tp`.

    Stage 0 holds the (vocab-parallel) embedding, the last stage the final norm and the output
    layer. With tied embeddings and pp > 1 Megatron still gives the last stage its own copy of the
    embedding matrix as output layer (kept equal by an all-reduce of their grads).
    """
    if not 0 <= stage < pp:
        raise ValueError(f"stage {stage} outside 0..{pp - 1}")
    n = spec.layers // pp * layer_params(spec, tp)
    vocab_shard = padded_vocab_size(spec.vocab, tp) // tp * spec.hidden  # padded to a multiple of TP
    if stage == 0:
        n += vocab_shard
    if stage == pp - 1:
        n += spec.hidden
        if not spec.tied_embeddings or pp > 1:
            n += vocab_shard
    return n


# ---------------------------------------------------------------- FLOPs


def linear_flops_per_token(spec: ModelSpec) -> int:
    """Forward matmul FLOPs per token of one layer's projections (q/k/v, o, gate, up, down)."""
    h = spec.hidden
    return 2 * (h * (spec.q_dim + 2 * spec.kv_dim) + spec.q_dim * h + 3 * h * spec.intermediate)


def attention_flops(spec: ModelSpec, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs of one layer's QKᵀ and AV for one sequence of `seq_len` tokens.

    Dense kernels (eager attention, what FlopCounterMode sees) compute the full s×s score matrix:
    2·(2·s²·q_dim). Causal flash attention skips the masked half: that is what it costs on GPU.
    """
    dense = 4 * seq_len * seq_len * spec.q_dim
    return dense / 2 if causal else dense


def output_layer_flops_per_token(spec: ModelSpec) -> int:
    return 2 * spec.hidden * spec.vocab


def forward_flops(spec: ModelSpec, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs of the whole model on one sequence of `seq_len` tokens (logits for every position)."""
    per_layer = seq_len * linear_flops_per_token(spec) + attention_flops(spec, seq_len, causal)
    return spec.layers * per_layer + seq_len * output_layer_flops_per_token(spec)


def train_flops(spec: ModelSpec, tokens: float, seq_len: int, recompute: bool = False) -> float:
    """FLOPs of forward + backward over `tokens` tokens packed as sequences of `seq_len` (causal).

    Backward costs two forwards (input and weight gradients). Full activation recompute reruns the
    transformer layers' forward (not the output layer) once more during backward.
    """
    fwd = forward_flops(spec, seq_len) * tokens / seq_len
    layers_fwd = (forward_flops(spec, seq_len) - seq_len * output_layer_flops_per_token(spec)) * tokens / seq_len
    return 3 * fwd + (layers_fwd if recompute else 0.0)
