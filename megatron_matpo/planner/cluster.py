"""Cluster descriptions for the layout planner: presets and YAML files.

Bandwidths are nominal (spec-sheet) numbers; the cost model applies `Assumptions.comm_efficiency`.
- `nvlink_gbs`: NVLink bandwidth per GPU as vendors quote it (both directions summed); a ring
  collective moves data one way per link, so the model uses half of it.
- `internode_gbs`: inter-node bandwidth per node and per direction, all NICs summed, shared by the
  node's GPUs when they all talk off-node at once.

A YAML file holds the same fields, e.g.
    name: a800x16
    nodes: 2
    gpus_per_node: 8
    gpu_memory_gib: 80
    peak_tflops: 312
    nvlink_gbs: 400
    internode_gbs: 100
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

GIB = 1024 ** 3


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    peak_tflops: float  # dense, in the training dtype
    nvlink_gbs: float
    internode_gbs: float
    dtype: str = "bf16"  # training parameter dtype: bf16 on GPUs, fp32 in this repo's CPU runs
    # TransformerEngine present: context parallelism runs TE's ring attention (overlapped); without it
    # the repo's own all-gather attention (model/context_parallel.py). SP runs either way.
    transformer_engine: bool = True
    # per-device memory the formula does not see: CUDA context, NCCL buffers, workspaces (GPU); the
    # interpreter, torch and megatron themselves (CPU, where "device memory" is process RSS)
    overhead_gib: float = 2.0
    # fixed costs the byte and FLOP counts miss (planner/calibrate.py measures them on a machine; 0 in the
    # GPU presets, which are not calibrated): latency of one collective or p2p message, and the cost of
    # one layer's forward + backward of one micro-batch beyond its FLOPs (dispatch, kernel launches)
    collective_latency_us: float = 0.0
    layer_overhead_ms: float = 0.0
    # compute time x this when several ranks compute at once (processes of a CPU host share its memory
    # bandwidth and caches; 1 on GPUs, each rank its own device): planner/calibrate.py measures it
    concurrent_compute_factor: float = 1.0
    description: str = ""

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def param_bytes(self) -> int:
        return {"bf16": 2, "fp16": 2, "fp32": 4}[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "Cluster":
        for name in ("nodes", "gpus_per_node", "gpu_memory_gib", "peak_tflops", "nvlink_gbs", "internode_gbs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"cluster {self.name}: {name} must be > 0, got {getattr(self, name)}")
        for name in ("collective_latency_us", "layer_overhead_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"cluster {self.name}: {name} must be >= 0, got {getattr(self, name)}")
        if self.concurrent_compute_factor < 1:
            raise ValueError(f"cluster {self.name}: concurrent_compute_factor must be >= 1, "
                             f"got {self.concurrent_compute_factor}")
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"cluster {self.name}: dtype must be bf16, fp16 or fp32, got {self.dtype!r}")
        return self


PRESETS: dict[str, Cluster] = {
    c.name: c for c in (
        Cluster(
            name="a800x128", nodes=16, gpus_per_node=8, gpu_memory_gib=80, peak_tflops=312,
            nvlink_gbs=400, internode_gbs=100,
            description="16 nodes x 8 A800-SXM-80GB; 312 TFLOP/s dense bf16; NVLink 400 GB/s per GPU "
                        "(bidirectional); 4x200 Gb/s InfiniBand per node = 100 GB/s per direction"),
        Cluster(
            name="h100x8", nodes=1, gpus_per_node=8, gpu_memory_gib=80, peak_tflops=989,
            nvlink_gbs=900, internode_gbs=400,
            description="1 node x 8 H100-SXM-80GB; 989 TFLOP/s dense bf16; NVLink 900 GB/s per GPU "
                        "(bidirectional); 8x400 Gb/s NICs = 400 GB/s per direction"),
        Cluster(
            name="cpu-tiny", nodes=1, gpus_per_node=2, gpu_memory_gib=8, peak_tflops=0.1,
            nvlink_gbs=4, internode_gbs=4, dtype="fp32", transformer_engine=False, overhead_gib=1.0,
            description="this repo's CPU test machine: 2 gloo processes (one core each), fp32; 'peak' is "
                        "a rough per-core AVX2 FMA figure, 'NVLink' is loopback TCP, the overhead is a process's "
                        "RSS after importing torch and megatron"),
    )
}


def load_cluster(name_or_path: str) -> Cluster:
    """A preset name (a800x128, h100x8, cpu-tiny) or a YAML file with `Cluster`'s fields."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"cluster {name_or_path!r}: not a preset ({', '.join(PRESETS)}) nor a YAML file")
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(Cluster)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown cluster fields {unknown}; expected {sorted(known)}")
    data.setdefault("name", path.stem)
    return Cluster(**data).validate()
