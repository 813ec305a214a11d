"""The weight sync's one config, from the YAML's `sync:` section to the actor rank that syncs
(kept free of torch so that loading a config stays light)."""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("broadcast", "tensor", "disk")
EXPORTS = ("reshard", "megatron_bridge")
COLLECT = ("auto", "shared_memory", "p2p")  # bridge/collect.py


@dataclass
class SyncConfig:
    mode: str = "broadcast"  # "broadcast" | "tensor" | "disk"
    bucket_mb: float = 64.0  # MiB per bucket; a larger tensor travels alone
    disk_dir: str | None = None  # disk mode: where rank 0 writes (engines must read it); temp dir if None
    parity_every: int = 1  # check engine vs actor logprobs every N syncs (0: never); used by the caller
    parity_rows: int = 2  # rows per parity check; used by the caller
    timeout_s: float = 600.0  # each engine call (a streamed sync is one), the broadcast group's rendezvous/collectives
    group_name: str = "matpo_weight_sync"  # prefix; each WeightSync adds a unique suffix
    master_address: str | None = None  # actor rank 0's address as engines reach it; derived if None
    master_port: int | None = None  # broadcast group rendezvous port on actor rank 0; free port if None
    show_progress: bool = False  # megatron-bridge's export progress bar on rank 0
    # "reshard": each rank writes its own slices of the HF tensors into rank 0's bucket (bridge/reshard.py;
    # a model it cannot describe falls back, with a warning); "megatron_bridge": its export_hf_weights,
    # every full tensor gathered on every rank (slower, more memory; kept as the reference)
    export: str = "reshard"
    collect: str = "auto"  # reshard: how slices meet on rank 0; auto = shared_memory on one CPU host, else p2p
    # broadcast/tensor with export=reshard: the whole sync is one call per engine, the buckets streamed
    # through it (rollout/sglang_weights.py); false: one call per bucket plus session and flush calls
    stream: bool = True
    # streamed broadcast: a tensor of at least this many KiB travels in its own broadcast, which the engine
    # receives straight into its parameter where its loader would only copy it there; smaller tensors
    # share one broadcast per run (each collective has a fixed cost) and are loaded as before
    direct_min_kib: float = 64.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sync.mode: {self.mode!r}, expected one of {', '.join(MODES)}")
        if self.export not in EXPORTS:
            raise ValueError(f"sync.export: {self.export!r}, expected one of {', '.join(EXPORTS)}")
        if self.collect not in COLLECT:
            raise ValueError(f"sync.collect: {self.collect!r}, expected one of {', '.join(COLLECT)}")
        if not self.bucket_mb > 0:
            raise ValueError(f"sync.bucket_mb: must be > 0, got {self.bucket_mb}")
        if self.parity_every < 0:
            raise ValueError(f"sync.parity_every: must be >= 0 (0 disables the check), got {self.parity_every}")
        if self.parity_rows < 1:
            raise ValueError(f"sync.parity_rows: must be >= 1, got {self.parity_rows}")
        if not self.direct_min_kib > 0:
            raise ValueError(f"sync.direct_min_kib: must be > 0, got {self.direct_min_kib}")
        if not self.timeout_s > 0:
            raise ValueError(f"sync.timeout_s: must be > 0, got {self.timeout_s}")
        if not self.group_name:
            raise ValueError("sync.group_name: must not be empty")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"sync.master_port: must be in 1..65535, got {self.master_port}")

    @property
    def bucket_bytes(self) -> int:
        return max(1, int(self.bucket_mb * 1024 * 1024))

    @property
    def direct_min_bytes(self) -> int:
        return max(1, int(self.direct_min_kib * 1024))
