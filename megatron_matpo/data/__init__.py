"""Datasets: MATPO-data parquet configs and the offline multi-hop QA generator."""
from megatron_matpo.data.schema import (
    DatasetError, Sample, avg_at_k, expand_repeats, group_samples, repeat_k_from_name, sample_from_row,
)
from megatron_matpo.data.parquet import Dataset, read_dataset, write_parquet
from megatron_matpo.data.multihop import MultihopConfig, generate, read_corpus, write_multihop

__all__ = [
    "Dataset", "DatasetError", "MultihopConfig", "Sample", "avg_at_k", "expand_repeats", "generate",
    "group_samples", "read_corpus", "read_dataset", "repeat_k_from_name", "sample_from_row",
    "write_multihop", "write_parquet",
]
