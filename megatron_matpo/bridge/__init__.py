"""Actor → engine weight sync (Megatron TP/PP shards → HF-named full tensors → SGLang engines) and
the engine-vs-actor logprob parity check that follows it."""
from megatron_matpo.bridge.buckets import Bucket, iter_buckets
from megatron_matpo.bridge.parity import engine_logprobs, engine_parity, logprob_gap
from megatron_matpo.bridge.sync import MODES, SyncConfig, WeightSync

__all__ = ["Bucket", "iter_buckets", "engine_logprobs", "engine_parity", "logprob_gap", "MODES", "SyncConfig",
           "WeightSync"]
