"""Analytic per-GPU memory and step time of one training step for a parallel layout.

The model is Megatron-core as this repo drives it: 1F1B pipeline schedule (no virtual stages),
megatron DDP with `grad_reduce_in_fp32`, Adam with fp32 master weights (distributed optimizer shards
them over the data-parallel × context-parallel group), THD-packed micro-batches of at most
`micro_batch_tokens` tokens, full uniform activation recompute (one layer per checkpoint) when on,
and Megatron's default rank order tp-cp-ep-dp-pp (TP neighbours are adjacent ranks).

Step time = pipeline time of the slowest stage, (m + p - 1) micro-batch slots each of
compute + exposed TP collectives + exposed CP ring exchange + PP p2p + the fixed per-layer cost, plus
the exposed DP gradient reduction. Every collective and p2p message also pays the cluster's fixed
latency (`collective_latency_us`); both fixed costs come from `planner/calibrate.py`. The bubble
is the (p - 1) extra slots, i.e. (p-1)/(m+p-1) of the pipeline.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from megatron_matpo.model.vocab import padded_vocab_size
from megatron_matpo.planner.cluster import GIB, Cluster
from megatron_matpo.planner.model_stats import (
    ModelSpec, attention_flops, linear_flops_per_token, output_layer_flops_per_token, stage_params, train_flops)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    cp: int = 1
    micro_batch_tokens: int = 4096  # THD packing budget per micro-batch (before the CP split)
    recompute: bool = False  # full, uniform, 1 layer per checkpoint
    distributed_optimizer: bool = True
    sp: bool = False  # sequence parallelism (tp > 1): norms and residuals on 1/tp of the tokens

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def key(self) -> str:
        return (f"tp{self.tp}-pp{self.pp}-cp{self.cp}-dp{self.dp}-mbt{self.micro_batch_tokens}"
                f"-rc{int(self.recompute)}-do{int(self.distributed_optimizer)}" + ("-sp1" if self.sp else ""))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Workload:
    seq_len: int  # length of the packed rows (attention cost; a micro-batch must hold one row)
    global_batch_tokens: int  # tokens in one optimizer step, all DP ranks together

    def micro_batches(self, layout: Layout) -> int:
        """Micro-batches per DP rank: the rank's tokens over the packing budget, rounded up."""
        return max(1, math.ceil(self.global_batch_tokens / (layout.dp * layout.micro_batch_tokens)))

    def tokens_per_micro_batch(self, layout: Layout) -> float:
        """Average real tokens in a micro-batch (the rank's share spread over its micro-batches)."""
        return self.global_batch_tokens / (layout.dp * self.micro_batches(layout))


@dataclass(frozen=True)
class Assumptions:
    mfu: float = 0.4  # fraction of peak the kernels reach on compute
    memory_margin: float = 0.10  # fraction of GPU memory kept free (fragmentation, allocator caching)
    overhead_gib: float | None = None  # memory outside the formula; None: the cluster's figure
    comm_efficiency: float = 0.8  # NCCL bus bandwidth / nominal link bandwidth
    tp_exposed_fraction: float = 1.0  # megatron overlaps no TP collectives by default
    dp_exposed_fraction: float = 1.0  # the repo's ddp_config sets overlap_grad_reduce=False
    sequence_parallel: bool = True  # the search also tries each tp > 1 layout with SP (Layout.sp)
    # last stage, one micro-batch, per token and vocab entry on a TP rank: the fp32 logits
    # (Float16Module hands the last stage fp32; megatron's cross-entropy turns them into the softmax
    # in place and saves it for backward) + two fp32 temporaries of the actor's entropy metric
    logits_bytes_per_vocab: float = 12.0

    def to_dict(self) -> dict:
        return asdict(self)


def uses_sequence_parallel(layout: Layout, cluster: Cluster, assumptions: Assumptions) -> bool:
    """TE's norms or ours (model/norm.py) both take SP: the layout decides."""
    return layout.sp and layout.tp > 1


# ---------------------------------------------------------------- memory


def activation_bytes_per_token_layer(spec: ModelSpec, tp: int, sequence_parallel: bool, act_bytes: int) -> float:
    """Bytes one transformer layer keeps per token for its backward, on one TP rank (no recompute).

    Saved tensors: the two RMSNorm inputs and the two projection inputs of hidden size (sharded over
    TP only with sequence parallelism), q/k/v as the attention kernel keeps them, the q/k norm inputs
    (Qwen3), the attention output (also the input of the output projection), the gate/up output
    (SwiGLU backward) and the SwiGLU output (input of the down projection), plus flash attention's
    fp32 log-sum-exp per head. No dropout (p = 0 in the models we train).
    """
    hidden_div = tp if sequence_parallel else 1
    qkv = spec.q_dim + 2 * spec.kv_dim
    qk_norm_in = spec.q_dim + spec.kv_dim if spec.qk_norm else 0
    sharded = qkv + qk_norm_in + spec.q_dim + 3 * spec.intermediate
    return act_bytes * (4 * spec.hidden / hidden_div + sharded / tp) + 4 * spec.heads / tp


@dataclass
class MemoryEstimate:
    stage: int
    params: int  # parameters on this rank
    weights: float  # bytes, training dtype
    grads: float  # fp32 main grads (grad_reduce_in_fp32), full size on every DP rank
    optimizer: float  # fp32 master weights (bf16 training) + Adam m, v; / (dp·cp) when distributed
    activations: float  # transformer layers, all in-flight micro-batches
    logits: float  # last stage: output-layer input and vocab-parallel logits of one micro-batch
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits + self.overhead

    def to_dict(self) -> dict:
        d = {k: v / GIB for k, v in asdict(self).items() if k not in ("stage", "params")}
        return {"stage": self.stage, "params": self.params, **{f"{k}_gib": round(v, 4) for k, v in d.items()},
                "total_gib": round(self.total / GIB, 4)}


def in_flight_micro_batches(layout: Layout, micro_batches: int, stage: int) -> int:
    """1F1B: stage s runs p - s warm-up forwards before its first backward (capped by m)."""
    if layout.pp == 1:
        return 1
    return min(layout.pp - stage, micro_batches)


def stage_memory(spec: ModelSpec, cluster: Cluster, layout: Layout, workload: Workload,
                 assumptions: Assumptions, stage: int) -> MemoryEstimate:
    pb = cluster.param_bytes
    params = stage_params(spec, layout.tp, layout.pp, stage)
    shard = layout.dp * layout.cp if layout.distributed_optimizer else 1
    master = 4 if pb < 4 else 0  # fp32 training updates the params in place: no master copy
    sp = uses_sequence_parallel(layout, cluster, assumptions)
    hidden_div = layout.tp if sp else 1
    tokens = layout.micro_batch_tokens / layout.cp  # the budget, not the average: memory is a worst case
    per_layer = activation_bytes_per_token_layer(spec, layout.tp, sp, pb)
    layers = spec.layers // layout.pp
    in_flight = in_flight_micro_batches(layout, workload.micro_batches(layout), stage)
    if layout.recompute:
        # checkpoints keep each layer's input; one layer's full activations live while it is recomputed
        acts = in_flight * layers * tokens * pb * spec.hidden / hidden_div + tokens * per_layer
    else:
        acts = in_flight * layers * tokens * per_layer
    logits = 0.0
    if stage == layout.pp - 1:
        logits = tokens * (2 * pb * spec.hidden / hidden_div
                           + assumptions.logits_bytes_per_vocab * padded_vocab_size(spec.vocab, layout.tp) / layout.tp)
    return MemoryEstimate(
        stage=stage, params=params, weights=pb * params, grads=4.0 * params,
        optimizer=(master + 8) * params / shard, activations=acts, logits=logits,
        overhead=(cluster.overhead_gib if assumptions.overhead_gib is None else assumptions.overhead_gib) * GIB)


def peak_memory(spec: ModelSpec, cluster: Cluster, layout: Layout, workload: Workload,
                assumptions: Assumptions) -> MemoryEstimate:
    """The fullest pipeline stage: it decides whether the layout fits."""
    return max((stage_memory(spec, cluster, layout, workload, assumptions, s) for s in range(layout.pp)),
               key=lambda m: m.total)


def memory_budget(cluster: Cluster, assumptions: Assumptions) -> float:
    return cluster.gpu_memory_gib * GIB * (1.0 - assumptions.memory_margin)


# ---------------------------------------------------------------- communication


def group_bandwidth(cluster: Cluster, size: int, stride: int, assumptions: Assumptions) -> float:
    """Bytes/s one member of a ring over `size` ranks spaced `stride` apart can push.

    Inside a node: NVLink one way. Across nodes: the node's NICs are shared by all its GPUs
    (every group communicates at once at the same point of the step); a ring with k members per node
    leaves the node once per k members, so it gets k/gpus_per_node of the node's bandwidth.
    """
    g = cluster.gpus_per_node
    nvlink = cluster.nvlink_gbs / 2 * 1e9
    if size * stride <= g:
        return nvlink * assumptions.comm_efficiency
    per_node = max(1, min(size, g // stride)) if stride < g else 1
    return min(nvlink, cluster.internode_gbs * 1e9 * per_node / g) * assumptions.comm_efficiency


def all_reduce_time(nbytes: float, n: int, bandwidth: float) -> float:
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / bandwidth


def reduce_scatter_time(nbytes: float, n: int, bandwidth: float) -> float:
    """Also the all-gather time of an `nbytes` buffer."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / bandwidth


# ---------------------------------------------------------------- time


@dataclass
class TimeEstimate:
    compute: float  # s, all micro-batches of the slowest stage (recompute included)
    tp_comm: float  # exposed TP all-reduce / all-gather + reduce-scatter
    cp_comm: float  # ring-attention KV exchange not hidden behind attention compute
    pp_p2p: float
    overhead: float  # fixed cost per layer and micro-batch (cluster.layer_overhead_ms), all micro-batches
    bubble: float  # the (p - 1) idle slots of the slowest stage
    dp_comm: float  # exposed gradient reduce-scatter + param all-gather (or all-reduce)
    micro_batches: int
    bubble_fraction: float
    slowest_stage: int

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.cp_comm + self.pp_p2p + self.overhead + self.bubble + self.dp_comm

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


@dataclass
class _Slot:
    compute: float
    tp: float
    cp: float
    p2p: float
    overhead: float

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.cp + self.p2p + self.overhead


def _stage_slot(spec: ModelSpec, cluster: Cluster, layout: Layout, workload: Workload,
                assumptions: Assumptions, stage: int) -> _Slot:
    """Time of one micro-batch (forward + backward) on one rank of `stage`."""
    pb, tp, cp, pp = cluster.param_bytes, layout.tp, layout.cp, layout.pp
    sp = uses_sequence_parallel(layout, cluster, assumptions)
    rate = cluster.peak_tflops * 1e12 * assumptions.mfu
    tokens = workload.tokens_per_micro_batch(layout) / cp  # CP ranks split every sequence
    layers = spec.layers // pp
    first, last = stage == 0, stage == pp - 1
    attn_per_token = attention_flops(spec, workload.seq_len) / workload.seq_len  # causal, split evenly over CP
    passes = 3 + (1 if layout.recompute else 0)  # forward, backward (2x), recompute forward
    layer_flops = tokens * layers * (linear_flops_per_token(spec) + attn_per_token) / tp
    head_flops = tokens * output_layer_flops_per_token(spec) / tp if last else 0.0
    compute = (passes * layer_flops + 3 * head_flops) / rate
    if layout.world > 1:  # the ranks compute at the same time (a CPU host's shared memory bandwidth)
        compute *= cluster.concurrent_compute_factor
    alpha = cluster.collective_latency_us * 1e-6  # per collective / message

    tp_time = 0.0
    if tp > 1:
        # all-reduce equivalents per layer: 2 forward + 2 backward; sequence parallelism re-gathers
        # the input of the column-parallel layers for their weight grads (+1); recompute repeats the
        # forward's 2. The embedding (first stage) and output layer (last) add one each.
        n = layers * (4 + (1 if sp else 0) + (2 if layout.recompute else 0))
        n += (1 if first else 0) + ((2 if sp else 1) if last else 0)
        bw = group_bandwidth(cluster, tp, 1, assumptions)
        tp_time = n * (all_reduce_time(tokens * spec.hidden * pb, tp, bw) + alpha) * assumptions.tp_exposed_fraction

    cp_time = 0.0
    if cp > 1:
        kv_bytes = tokens * 2 * spec.kv_dim / tp * pb  # this rank's K and V of one layer
        bw = group_bandwidth(cluster, cp, tp, assumptions)
        forwards = 2 if layout.recompute else 1
        if cluster.transformer_engine:
            # TE's ring attention passes each rank's K and V around the ring (cp - 1 hops) in forward, and
            # K, V plus their grads in backward; it overlaps the attention kernels it feeds
            hops = layers * (2 + forwards) * (cp - 1)
            exchange = hops * (kv_bytes / bw + alpha)
            attn_compute = passes * tokens * layers * attn_per_token / tp / rate
            cp_time = max(0.0, exchange - attn_compute)
        else:
            # ours (model/context_parallel.py), not overlapped: all-gather K and V per forward, and in
            # backward sum the gathered gradient over the group (an all-reduce on gloo)
            gather = 2 * (reduce_scatter_time(cp * kv_bytes / 2, cp, bw) + alpha)
            back = 2 * (all_reduce_time(cp * kv_bytes / 2, cp, bw) + alpha)
            cp_time = layers * (forwards * gather + back)

    p2p = 0.0
    if pp > 1:
        msg = tokens * spec.hidden * pb / (tp if sp else 1)
        bw = group_bandwidth(cluster, 2, tp * cp * layout.dp, assumptions)
        sends = (0 if last else 1) + (0 if first else 1)  # activations forward, grads backward
        p2p = sends * (msg / bw + alpha)
    # fixed cost per layer pass: forward, backward (counted as 2 forwards' worth of dispatch), recompute
    overhead = cluster.layer_overhead_ms * 1e-3 * layers * passes / 3
    return _Slot(compute=compute, tp=tp_time, cp=cp_time, p2p=p2p, overhead=overhead)


def step_time(spec: ModelSpec, cluster: Cluster, layout: Layout, workload: Workload,
              assumptions: Assumptions) -> TimeEstimate:
    m, p = workload.micro_batches(layout), layout.pp
    slots = [_stage_slot(spec, cluster, layout, workload, assumptions, s) for s in range(p)]
    slowest = max(range(p), key=lambda s: slots[s].total)
    slot = slots[slowest]

    # DP (with CP: the dp·cp group, adjacent TP groups apart) reduces the fp32 main grads
    n = layout.dp * layout.cp
    params = max(stage_params(spec, layout.tp, p, s) for s in range(p))
    bw = group_bandwidth(cluster, n, layout.tp, assumptions)
    alpha = cluster.collective_latency_us * 1e-6 if n > 1 else 0.0
    if layout.distributed_optimizer:  # reduce-scatter fp32 grads, all-gather updated params
        dp = reduce_scatter_time(4.0 * params, n, bw) + reduce_scatter_time(cluster.param_bytes * params, n, bw)
        dp += 2 * alpha
    else:
        dp = all_reduce_time(4.0 * params, n, bw) + alpha
    return TimeEstimate(
        compute=m * slot.compute, tp_comm=m * slot.tp, cp_comm=m * slot.cp, pp_p2p=m * slot.p2p,
        overhead=m * slot.overhead,
        bubble=(p - 1) * slot.total, dp_comm=dp * assumptions.dp_exposed_fraction, micro_batches=m,
        bubble_fraction=(p - 1) / (m + p - 1), slowest_stage=slowest)


def model_flops_per_step(spec: ModelSpec, workload: Workload) -> float:
    """Useful training FLOPs of one step (no recompute): the MFU numerator."""
    return train_flops(spec, workload.global_batch_tokens, workload.seq_len)


@dataclass
class Prediction:
    layout: Layout
    memory: MemoryEstimate  # the fullest stage
    time: TimeEstimate
    fits: bool
    tokens_per_s: float
    mfu: float  # model FLOPs / (step time · GPUs · peak)
    stage_memory_gib: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"layout": self.layout.to_dict(), "key": self.layout.key, "fits": self.fits,
                "step_time_s": round(self.time.total, 6), "tokens_per_s": round(self.tokens_per_s, 3),
                "tokens_per_s_per_gpu": round(self.tokens_per_s / self.layout.world, 3),
                "mfu": round(self.mfu, 5), "memory": self.memory.to_dict(), "time": self.time.to_dict(),
                "stage_memory_gib": [round(x, 3) for x in self.stage_memory_gib]}


def predict(spec: ModelSpec, cluster: Cluster, layout: Layout, workload: Workload,
            assumptions: Assumptions) -> Prediction:
    stages = [stage_memory(spec, cluster, layout, workload, assumptions, s) for s in range(layout.pp)]
    mem = max(stages, key=lambda x: x.total)
    t = step_time(spec, cluster, layout, workload, assumptions)
    return Prediction(
        layout=layout, memory=mem, time=t, fits=mem.total <= memory_budget(cluster, assumptions),
        tokens_per_s=workload.global_batch_tokens / t.total,
        mfu=model_flops_per_step(spec, workload) / (t.total * layout.world * cluster.peak_tflops * 1e12),
        stage_memory_gib=[s.total / GIB for s in stages])
