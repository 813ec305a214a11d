"""Checkpoint conversion: HuggingFace ⇄ Megatron distributed checkpoint, any TP × PP.

Megatron checkpoint directory layout (also what training writes, see `checkpoint_meta`):
    <dir>/matpo_checkpoint.json   format version, layout it was written with, step
    <dir>/hf/                     the source model's config.json, generation_config, tokenizer files
    <dir>/model/                  megatron-core `dist_checkpointing` of the model (layout-independent)
Loading reshards: a checkpoint written at TP=2×PP=2 loads at TP=1, PP=2, ... .
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_matpo.model.layout import ParallelLayout

CHECKPOINT_FORMAT = 1
META_FILE = "matpo_checkpoint.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".h5", ".msgpack")
SHARD_BYTES = 4 * 1024**3  # like `save_pretrained`'s default max_shard_size


def copy_hf_metadata(src: Path, dst: Path) -> None:
    """Config, generation config and tokenizer files: everything in an HF dir except weights."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, dst / f.name)


def read_meta(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {ckpt_dir} is not a megatron-matpo checkpoint")
    meta = json.loads(path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')} unsupported (expected {CHECKPOINT_FORMAT})")
    return meta


def write_meta(ckpt_dir: Path, layout: ParallelLayout, step: int | None) -> None:
    meta = {"format": CHECKPOINT_FORMAT, "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
            "step": step}
    (ckpt_dir / META_FILE).write_text(json.dumps(meta, indent=2))


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def save_model_dist(chunks: list, model_dir: Path) -> None:
    from megatron.core import dist_checkpointing

    model_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_unwrap(chunks[0]).sharded_state_dict(), str(model_dir))


def load_model_dist(chunks: list, model_dir: Path) -> None:
    from megatron.core import dist_checkpointing

    module = _unwrap(chunks[0])
    state = dist_checkpointing.load(module.sharded_state_dict(), str(model_dir))
    module.load_state_dict(state, strict=True)


# ---- workers: run on every rank of a launched world -------------------------------------------

def hf_to_megatron_on_ranks(hf_dir: str, out_dir: str, layout: ParallelLayout) -> None:
    """Collective over an initialized Megatron world (`dist.init_megatron(layout)`)."""
    from megatron_matpo.model.builder import build_model

    out = Path(out_dir)
    built = build_model(hf_dir, layout, load_weights=True)
    save_model_dist(built.chunks, out / "model")
    if torch.distributed.get_rank() == 0:
        copy_hf_metadata(Path(hf_dir), out / "hf")
        write_meta(out, layout, step=None)
    torch.distributed.barrier()


def export_hf(built, out_dir: Path, show_progress: bool = True) -> None:
    """Stream HF-named full tensors out of a (possibly TP/PP-sharded) model into safetensors shards.

    Collective: every rank of the model's world must call it; rank 0 writes.
    """
    from safetensors.torch import save_file

    rank0 = torch.distributed.get_rank() == 0
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    tied = bool(getattr(built.provider, "share_embeddings_and_output_weights", False))
    stream = built.bridge.export_hf_weights(built.chunks, cpu=True, show_progress=show_progress and rank0)
    for name, tensor in stream:
        # a tied model's lm_head is the embedding; HF checkpoints omit it (as save_pretrained does)
        if not rank0 or (tied and name == "lm_head.weight"):
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous().clone()
        size += nbytes
    if not rank0:
        return
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def megatron_to_hf_on_ranks(ckpt_dir: str, out_dir: str, layout: ParallelLayout) -> None:
    """Collective over an initialized Megatron world (`dist.init_megatron(layout)`)."""
    from megatron_matpo.model.builder import build_model

    ckpt = Path(ckpt_dir)
    built = build_model(ckpt / "hf", layout, load_weights=False)
    load_model_dist(built.chunks, ckpt / "model")
    out = Path(out_dir)
    export_hf(built, out)
    if torch.distributed.get_rank() == 0:
        copy_hf_metadata(ckpt / "hf", out)
    torch.distributed.barrier()


def _launched(fn, *args) -> None:
    from megatron_matpo.dist import init_megatron, shutdown_megatron

    init_megatron(args[-1])
    fn(*args)
    shutdown_megatron()


# ---- entry points: validate, then launch ---------------------------------------------------------

def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, layout: ParallelLayout) -> Path:
    from megatron_matpo.dist import launch_local
    from megatron_matpo.model.builder import check_layout

    check_layout(hf_dir, layout)
    launch_local(_launched, layout.world_size, hf_to_megatron_on_ranks, str(hf_dir), str(out_dir), layout)
    return Path(out_dir)


def megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, layout: ParallelLayout) -> Path:
    from megatron_matpo.dist import launch_local
    from megatron_matpo.model.builder import check_layout

    read_meta(ckpt_dir)
    check_layout(Path(ckpt_dir) / "hf", layout)
    launch_local(_launched, layout.world_size, megatron_to_hf_on_ranks, str(ckpt_dir), str(out_dir), layout)
    return Path(out_dir)
