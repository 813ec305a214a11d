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


def hf_tensors(built, show_progress: bool = False):
    """HF-named full tensors of a (possibly TP/PP-sharded) model, streamed one at a time.

    Collective: every rank of the model's world must iterate it to the end (megatron-bridge gathers
    each tensor over TP and PP); every rank receives every full tensor, on CPU. A tied model's
    lm_head is the embedding: HF checkpoints omit it (as save_pretrained does) and engines tie it
    themselves, so it is skipped. Vocabulary padding rows (model/vocab.py) are cut off: what leaves has
    the HF model's shapes.
    """
    from megatron_matpo.model.vocab import trim_hf_tensor

    rank0 = torch.distributed.get_rank() == 0
    tied = bool(getattr(built.provider, "share_embeddings_and_output_weights", False))
    vocab = built.provider.vocab_size
    for name, tensor in built.bridge.export_hf_weights(built.chunks, cpu=True, show_progress=show_progress and rank0):
        if not (tied and name == "lm_head.weight"):
            yield name, trim_hf_tensor(name, tensor, vocab)


class SafetensorsShardWriter:
    """Writes an HF safetensors checkpoint as tensors arrive: a shard goes to disk as soon as the
    next tensor would overflow it (peak memory: one shard). Files are named as `save_pretrained`
    names them: `model.safetensors` when one shard, else `model-0000i-of-0000N.safetensors` plus
    `model.safetensors.index.json` (N is known only at the end, so shards are renamed in `close`)."""

    def __init__(self, out_dir: Path, shard_bytes: int = SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.shard_bytes = shard_bytes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._shard: dict[str, torch.Tensor] = {}
        self._size = 0
        self._written: list[tuple[Path, list[str]]] = []  # (temporary file, names in it)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard and self._size + nbytes > self.shard_bytes:
            self._flush()
        self._shard[name] = tensor.contiguous().clone()  # own storage: safetensors refuses shared ones
        self._size += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f".shard-{len(self._written):05d}.safetensors.partial"
        save_file(self._shard, str(path), metadata={"format": "pt"})
        self._written.append((path, list(self._shard)))
        self._shard, self._size = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, give every shard its final name (and the index when sharded)."""
        if self._shard or not self._written:
            self._flush()
        n = len(self._written)
        if n == 1:
            final = self.out_dir / "model.safetensors"
            self._written[0][0].replace(final)
            return [final]
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self._written):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.replace(self.out_dir / fname)
            files.append(self.out_dir / fname)
            weight_map.update({k: fname for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return files


def export_hf(built, out_dir: Path, show_progress: bool = True, shard_bytes: int = SHARD_BYTES) -> None:
    """Stream HF-named full tensors out of a (possibly TP/PP-sharded) model into safetensors shards.

    Collective: every rank of the model's world must call it; rank 0 writes.
    """
    rank0 = torch.distributed.get_rank() == 0
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = SafetensorsShardWriter(out_dir, shard_bytes) if rank0 else None
    for name, tensor in hf_tensors(built, show_progress):
        if writer is not None:
            writer.add(name, tensor)
    if writer is not None:
        writer.close()


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
