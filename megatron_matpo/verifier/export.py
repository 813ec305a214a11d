"""A verifier (a Megatron GPT model whose output layer is a bias-free scalar score head) as an HF
`*ForSequenceClassification` checkpoint with one label: what transformers loads with
`AutoModelForSequenceClassification` and SGLang serves on `/classify` (`maporl.verifier.kind=reward_model`).

The body's tensors come from megatron-bridge's export (the causal LM's HF names, `model.*`), without the
output layer, which the bridge would treat as a vocabulary projection; the score head leaves as
`score.weight` from the last pipeline stage. SGLang 0.5.23's Qwen2/Qwen3ForSequenceClassification gives
the head a bias that transformers' has not; left unloaded it is uninitialized memory, so the checkpoint
carries `score.bias = 0` (which transformers ignores as an unexpected key): both compute the same score.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

SEQUENCE_CLASSIFICATION = {"Qwen3ForCausalLM": "Qwen3ForSequenceClassification",
                           "Qwen2ForCausalLM": "Qwen2ForSequenceClassification",
                           "LlamaForCausalLM": "LlamaForSequenceClassification"}


class NotAScoreModel(ValueError):
    pass


def check_score_model(hf_dir: str | Path) -> dict:
    """The config of an HF checkpoint with a scalar score head, or one error naming what it lacks: a
    reward-model verifier must score, not generate."""
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise NotAScoreModel(f"{hf_dir}: no config.json (not an HF model directory)")
    cfg = json.loads(path.read_text())
    arch = (cfg.get("architectures") or ["?"])[0]
    if not arch.endswith(("ForSequenceClassification", "ForRewardModel")):
        raise NotAScoreModel(f"{hf_dir}: architecture {arch} has no value head (a reward-model verifier needs a "
                             "*ForSequenceClassification with one label: `matpo train-verifier` writes one)")
    labels = cfg.get("num_labels", len(cfg.get("id2label") or {}) or 2)
    if arch.endswith("ForSequenceClassification") and labels != 1:
        raise NotAScoreModel(f"{hf_dir}: {arch} with {labels} labels: a verifier's head gives one score")
    return cfg


@contextmanager
def _no_unmapped_param_warning():
    # megatron-bridge 0.6.2 warns "No mapping found for megatron_param" for a parameter it has no HF name for:
    # the score head, which is exported here on its own
    log = logging.getLogger("megatron.bridge.models.conversion.model_bridge")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _head_owner() -> int:
    """Global rank of the last pipeline stage's first rank of DP slice 0, TP rank 0: it holds the head."""
    from megatron.core import parallel_state as ps

    mine = torch.tensor([torch.distributed.get_rank() if ps.is_pipeline_last_stage() and ps.get_data_parallel_rank()
                         == 0 and ps.get_tensor_model_parallel_rank() == 0 else -1])
    torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MAX)
    return int(mine)


def score_model_tensors(built):
    """HF-named full tensors of the verifier: the body (`model.*`), then `score.weight` [1, hidden].
    Collective; every rank receives every tensor, on CPU."""
    from megatron_matpo.convert import _unwrap

    with _no_unmapped_param_warning():
        tasks = built.bridge.get_conversion_tasks(built.chunks)
    body = [t for t in tasks if t is not None and not t.global_param_name.startswith("output_layer.")]
    for name, tensor in built.bridge.export_hf_weights(built.chunks, cpu=True, show_progress=False,
                                                       conversion_tasks=body):
        if name != "lm_head.weight":
            yield name, tensor
    hidden = built.provider.hidden_size
    dtype = built.provider.params_dtype
    owner = _head_owner()
    head = torch.zeros(1, hidden, dtype=dtype)
    if torch.distributed.get_rank() == owner:
        head = _unwrap(built.chunks[-1]).output_layer.weight.detach().cpu().to(dtype).clone()
    torch.distributed.broadcast(head, src=owner)
    yield "score.weight", head


def export_verifier_hf(built, out_dir: str | Path, base_hf_dir: str | Path) -> Path:
    """Write the verifier as an HF sequence-classification model (collective; rank 0 writes): weights,
    the base model's tokenizer files and its config with the classification architecture."""
    from megatron_matpo.convert import SafetensorsShardWriter, copy_hf_metadata

    out, rank0 = Path(out_dir), torch.distributed.get_rank() == 0
    writer = SafetensorsShardWriter(out) if rank0 else None
    dtype = None
    for name, tensor in score_model_tensors(built):
        dtype = tensor.dtype
        if writer is not None:
            writer.add(name, tensor)
    if writer is not None:
        writer.add("score.bias", torch.zeros(1, dtype=dtype))
        writer.close()
        copy_hf_metadata(Path(base_hf_dir), out)
        cfg = json.loads((out / "config.json").read_text())
        arch = (cfg.get("architectures") or ["?"])[0]
        if arch not in SEQUENCE_CLASSIFICATION:
            raise NotAScoreModel(f"{base_hf_dir}: no sequence-classification export for {arch} "
                                 f"(supported: {', '.join(SEQUENCE_CLASSIFICATION)})")
        cfg.update(architectures=[SEQUENCE_CLASSIFICATION[arch]], num_labels=1, id2label={"0": "LABEL_0"},
                   label2id={"LABEL_0": 0}, problem_type="regression", tie_word_embeddings=False)
        if cfg.get("pad_token_id") is None:  # transformers pools the last non-pad token: it needs a pad id
            cfg["pad_token_id"] = cfg.get("eos_token_id")
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        gen = out / "generation_config.json"
        if gen.exists():
            gen.unlink()  # a scorer does not generate
    torch.distributed.barrier()
    return out
