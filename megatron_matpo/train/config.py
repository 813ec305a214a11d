"""The RL job's typed config (YAML + dotted overrides, validated before any process starts)."""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_matpo.algo.loss import LossConfig
from megatron_matpo.config import ConfigError
from megatron_matpo.maporl.discussion import DiscussionConfig
from megatron_matpo.maporl.rewards import RewardConfig as MaporlRewardConfig
from megatron_matpo.maporl.verifier import VerifierConfig
from megatron_matpo.model.layout import ParallelLayout
from megatron_matpo.orchestrate.cluster import OrchestrateSection
from megatron_matpo.rollout.runner import RolloutConfig
from megatron_matpo.train.optim import OptimConfig


@dataclass
class ActorSection:
    tp: int = 1
    pp: int = 1
    dp: int = 1  # 0 = fill the cluster: (orchestrate.nodes x gpus_per_node) / (tp x pp)
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA
    max_tokens_per_micro_batch: int = 8192  # THD packing budget; every trajectory must fit
    recompute: str = "none"  # activation recompute: none | full (every layer; long contexts on big models)
    mini_batches: int = 1  # optimizer steps per rollout batch (1 = on-policy, MATPO's setting)
    recompute_old_logprobs: bool = True  # PPO old logprobs from the actor (else the engine's)
    seed: int = 1234

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(tp=self.tp, pp=self.pp, dp=self.dp)


@dataclass
class AdvantageSection:
    estimator: str = "grpo"  # grpo: group-normalized rewards | gae: PPO with a critic (MAPoRL only)
    eps: float = 1e-6
    norm_by_std: bool = True
    gamma: float = 1.0  # gae: discount over the generated tokens of a row
    lam: float = 0.95  # gae: λ
    whiten: bool = True  # gae: normalize advantages over the batch's tokens


@dataclass
class CriticSection:
    """advantage.estimator=gae: a value model per policy on Megatron, laid out like the actor (its own
    ranks), initialized from `model` (or `critic.model`) with a zero scalar head."""
    model: str | None = None
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))


@dataclass
class SyncSection:
    mode: str = "broadcast"  # broadcast (engines on their own devices) | tensor (colocated) | disk
    bucket_mb: float = 64.0
    parity_every: int = 1  # engine-vs-actor logprob check after every k-th sync (0 = never)
    parity_rows: int = 2  # sequences of the batch used for it


@dataclass
class CheckpointSection:
    every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2
    export_hf: bool = True  # HF safetensors of the final policy in <run_dir>/hf


@dataclass
class EvalSection:
    data: str | list[str] | None = None  # one val set or several (metrics are per data_source)
    every: int = 0  # steps; 0 = off
    n_samples: int = 1
    max_prompts: int | None = None


@dataclass
class MaporlSection:
    """algorithm=maporl: N agents discuss for T rounds (no tools); a verifier scores every answer;
    influence-aware rewards + incentives; GRPO over the n_samples discussions of a question, per
    (agent, round)."""
    models: str = "shared"  # shared: one actor + engine set, agents told apart by prompt | distinct: one per agent
    agent_models: list[str] | None = None  # distinct: an initial HF model per agent (default: `model` for all)
    discussion: DiscussionConfig = field(default_factory=DiscussionConfig)
    reward: MaporlRewardConfig = field(default_factory=MaporlRewardConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)

    @property
    def stacks(self) -> int:
        return self.discussion.n_agents if self.models == "distinct" else 1

    def model_of(self, stack: int, default: str) -> str:
        return self.agent_models[stack] if self.agent_models else default


@dataclass
class BootstrapSection:
    """Build the embedded default's inputs when `model` / `data` paths do not exist yet."""
    tiny_model: str | None = None  # arch (qwen3 | qwen2 | llama) of a random-init tiny model
    multihop: dict | None = None  # MultihopConfig fields: generate data + corpus next to `data`
    arithmetic: dict | None = None  # ArithmeticConfig fields: generate the MAPoRL word problems next to `data`
    toy_answer: str | None = None  # rewrite every question's answer to this (learnable toy task)


@dataclass
class TrainConfig:
    run_dir: str = "runs/matpo"
    model: str = ""  # HF directory: initial weights, tokenizer
    data: str = ""  # MATPO-data parquet (file or directory)
    corpus: str | None = None  # local search corpus (bootstrap writes it); sets rollout.toolbox.corpus
    steps: int = 3
    prompts_per_step: int = 4
    seed: int = 0
    algorithm: str = "matpo"  # matpo (planner + workers, or rollout.workflow.mode=single) | maporl
    # seeded sampling (SGLang deterministic inference, GPU only): a resumed run reproduces the
    # uninterrupted one, rollouts included
    deterministic: bool = False
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    maporl: MaporlSection = field(default_factory=MaporlSection)
    actor: ActorSection = field(default_factory=ActorSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    advantage: AdvantageSection = field(default_factory=AdvantageSection)
    critic: CriticSection = field(default_factory=CriticSection)
    sync: SyncSection = field(default_factory=SyncSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    orchestrate: OrchestrateSection = field(default_factory=OrchestrateSection)
    bootstrap: BootstrapSection = field(default_factory=BootstrapSection)

    def validate(self) -> "TrainConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(bool(self.model), "model: the HF directory of the initial policy is required")
        need(bool(self.data), "data: a MATPO-data parquet file or directory is required")
        need(not self.rollout.model and not self.rollout.data,
             "rollout.model / rollout.data are set from the top-level `model` / `data`; leave them empty")
        need(self.steps >= 1 and self.prompts_per_step >= 1, "steps and prompts_per_step must be >= 1")
        need(self.rollout.n_samples >= 1, "rollout.n_samples must be >= 1")
        need(self.actor.dtype in ("auto", "float32", "bfloat16"), "actor.dtype: auto | float32 | bfloat16")
        need(self.actor.mini_batches >= 1, "actor.mini_batches must be >= 1")
        need(self.actor.recompute in ("none", "full"), "actor.recompute: none | full")
        need(self.actor.mini_batches <= self.prompts_per_step,
             f"actor.mini_batches={self.actor.mini_batches} > prompts_per_step={self.prompts_per_step}: "
             "mini-batches split whole GRPO groups")
        need(self.sync.mode in ("broadcast", "tensor", "disk"), "sync.mode: broadcast | tensor | disk")
        need(self.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1")
        need(self.algorithm in ("matpo", "maporl"), f"algorithm: matpo | maporl, got {self.algorithm!r}")
        mp = self.maporl
        need(mp.models in ("shared", "distinct"), f"maporl.models: shared | distinct, got {mp.models!r}")
        need(mp.agent_models is None or (mp.models == "distinct" and len(mp.agent_models) == mp.discussion.n_agents),
             "maporl.agent_models: one HF model per agent, with maporl.models=distinct")
        adv = self.advantage
        need(adv.estimator in ("grpo", "gae"), f"advantage.estimator: grpo | gae, got {adv.estimator!r}")
        need(adv.estimator == "grpo" or self.algorithm == "maporl",
             "advantage.estimator=gae is implemented for algorithm=maporl (MATPO's workers inherit their planner's "
             "GRPO advantage)")
        need(0.0 <= adv.gamma <= 1.0 and 0.0 <= adv.lam <= 1.0, "advantage.gamma and advantage.lam must be in [0, 1]")
        wf = self.rollout.workflow
        longest = max(wf.planner.max_context_tokens, wf.worker.max_context_tokens)
        if self.algorithm == "maporl":
            longest = mp.discussion.max_context_tokens
        need(longest <= self.actor.max_tokens_per_micro_batch,
             f"actor.max_tokens_per_micro_batch={self.actor.max_tokens_per_micro_batch} is smaller than the longest"
             f" agent context ({longest} tokens, rollout.workflow.*.max_context_tokens or "
             "maporl.discussion.max_context_tokens): a trajectory could not be packed")
        if self.deterministic:
            from megatron_matpo import platform

            need(platform.capabilities().cuda,
                 "deterministic=true needs SGLang's --enable-deterministic-inference, which 0.5.23 supports only "
                 "with GPU attention backends (fa3/flashinfer/triton), not the CPU torch_native backend")
            need(wf.top_p == 1.0, "deterministic: needs rollout.workflow.top_p = 1 (SGLang's seeded sampling path)")
        need(self.loss.kl_as == "loss" or self.loss.kl_coef == 0.0,
             "loss.kl_as='reward' is not implemented yet: use kl_as='loss' (or kl_coef=0)")
        need(self.loss.entropy_coef == 0.0, "loss.entropy_coef > 0 is not implemented yet (entropy is logged)")
        need(self.eval.every == 0 or bool(self.eval.data), "eval.every > 0 needs eval.data")
        self._check_cluster_shape(need)
        return self

    def _check_cluster_shape(self, need) -> None:
        """The layout against the allocation (orchestrate.nodes x gpus_per_node) before any process starts;
        resolves actor.dp = 0 ("fill the cluster")."""
        a, o, eng = self.actor, self.orchestrate, self.rollout.engine
        stacks = self.maporl.stacks if self.algorithm == "maporl" else 1  # policies, each with its actor + engines
        models = 2 if self.advantage.estimator == "gae" else 1  # a critic per policy, laid out like its actor
        model_gpus = stacks * models * a.tp * a.pp
        if not o.gpus_per_node:  # CPU or an unchecked single machine
            need(a.dp >= 1, "actor.dp = 0 (fill the cluster) needs orchestrate.nodes and orchestrate.gpus_per_node")
            return
        nodes = o.nodes or 1
        total = nodes * o.gpus_per_node
        need(a.tp <= o.gpus_per_node and o.gpus_per_node % a.tp == 0,
             f"actor.tp={a.tp} must divide gpus_per_node={o.gpus_per_node}: a TP group stays inside a node (NVLink)")
        need(eng.tp_size <= o.gpus_per_node and o.gpus_per_node % eng.tp_size == 0,
             f"rollout.engine.tp_size={eng.tp_size} must divide gpus_per_node={o.gpus_per_node}")
        need(not (o.colocate and self.sync.mode == "broadcast"),
             "orchestrate.colocate=true puts engines on the actor's GPUs, where NCCL cannot broadcast between "
             "processes sharing a GPU: use sync.mode=tensor (CUDA IPC) or disk")
        engine_gpus = stacks * eng.num_engines * eng.tp_size
        actor_gpus = total if o.colocate else total - engine_gpus
        need(actor_gpus > 0, f"{stacks} x {eng.num_engines} engines x TP {eng.tp_size} = {engine_gpus} GPUs leave "
                             f"none of the {total} for the actor (set orchestrate.colocate=true to share them)")
        if a.dp == 0:
            need(actor_gpus % model_gpus == 0,
                 f"actor world size {actor_gpus} ({nodes} nodes x {o.gpus_per_node} GPUs"
                 f"{'' if o.colocate else f' - {engine_gpus} engine GPUs'}) is not divisible by policies x models x tp x pp "
                 f"= {model_gpus} (models: the actor, plus a critic with advantage.estimator=gae)")
            a.dp = actor_gpus // model_gpus
        world = model_gpus * a.dp
        need(world <= actor_gpus, f"{stacks} x {models} model(s) x actor tp x pp x dp = {world} GPUs but the "
                                  f"allocation has {actor_gpus} for actors ({nodes} nodes x {o.gpus_per_node} GPUs, colocate={o.colocate})")
        need(engine_gpus <= total, f"{stacks} x {eng.num_engines} engines x TP {eng.tp_size} = {engine_gpus} GPUs > "
                                   f"{total} in the allocation")

    def resolved_dtype(self) -> str:
        from megatron_matpo import platform

        if self.actor.dtype != "auto":
            return self.actor.dtype
        return "bfloat16" if platform.capabilities().cuda else "float32"
