"""Layout planner: exact model statistics, an analytic memory / step-time model of Megatron training
for TP × PP × CP × DP layouts, a search that ranks the layouts that fit, and a measured mode that runs
real training steps to check the ranking. See `matpo bench-layouts` / `tools/bench_layouts.py`."""
from megatron_matpo.planner.cluster import PRESETS, Cluster, load_cluster
from megatron_matpo.planner.cost import Assumptions, Layout, Prediction, Workload, predict
from megatron_matpo.planner.model_stats import ModelSpec, forward_flops, param_counts, stage_params, train_flops
from megatron_matpo.planner.search import Plan, enumerate_layouts, plan

__all__ = ["PRESETS", "Assumptions", "Cluster", "Layout", "ModelSpec", "Plan", "Prediction", "Workload",
           "enumerate_layouts", "forward_flops", "load_cluster", "param_counts", "plan", "predict",
           "stage_params", "train_flops"]
