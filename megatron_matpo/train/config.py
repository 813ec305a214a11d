"""The RL job's typed config (YAML + dotted overrides, validated before any process starts)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_matpo.agents.prompts import STYLES
from megatron_matpo.algo.loss import LossConfig
from megatron_matpo.bridge.sync_config import SyncConfig
from megatron_matpo.config import ConfigError
from megatron_matpo.maporl.config import MaporlSection
from megatron_matpo.model.layout import ParallelLayout
from megatron_matpo.orchestrate.cluster import OrchestrateSection
from megatron_matpo.rollout.runner import RolloutConfig
from megatron_matpo.train.optim import OptimConfig


@dataclass
class ActorSection:
    tp: int = 1
    pp: int = 1
    dp: int = 1  # 0 = fill the cluster: (orchestrate.nodes x gpus_per_node) / (tp x pp x cp)
    cp: int = 1  # context parallel: every packed sequence split over cp ranks (load-balanced chunks)
    sequence_parallel: bool = False  # SP: norms, dropout and residuals on a 1/tp slice of the sequence (tp > 1)
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA
    max_tokens_per_micro_batch: int = 8192  # THD packing budget; every trajectory must fit
    recompute: str = "none"  # activation recompute: none | full (every layer; long contexts on big models)
    mini_batches: int = 1  # optimizer steps per rollout batch (1 = on-policy, MATPO's setting)
    recompute_old_logprobs: bool = True  # PPO old logprobs from the actor (else the engine's)
    seed: int = 1234

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(tp=self.tp, pp=self.pp, dp=self.dp, cp=self.cp, sp=self.sequence_parallel)


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
class CheckpointSection:
    every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2
    export_hf: bool = True  # HF safetensors of the final policy in <run_dir>/hf


@dataclass
class EvalSection:
    data: str | list[str] | None = None  # one val set or several (metrics are per data_source)
    every: int = 0  # steps; 0 = off
    at_start: bool = False  # also before step 1 (logged at step 0): the closing line reports before -> after
    n_samples: int = 1
    max_prompts: int | None = None
    # sampling temperature of eval rollouts; null = the rollouts' own. 0 (greedy) scores the weights without
    # sampling noise: a tiny model at temperature 1 scores 0.05-0.19 on one set with the same weights
    temperature: float | None = None


@dataclass
class BootstrapSection:
    """Build the embedded default's inputs when `model` / `data` paths do not exist yet."""
    tiny_model: str | None = None  # arch (qwen3 | qwen2 | llama) of a random-init tiny model
    tiny_shape: dict | None = None  # its TinyShape fields (model/tiny.py; default: hidden 64, 4 layers)
    multihop: dict | None = None  # MultihopConfig fields: generate data + corpus next to `data`
    arithmetic: dict | None = None  # ArithmeticConfig fields: generate the MAPoRL word problems next to `data`
    toy_answer: str | None = None  # rewrite every question's answer to this (learnable toy task)
    # SftConfig fields: when `model` (<the SFT run_dir>/hf) does not exist, `matpo sft` builds it first
    # from `sft.model` (tiny_model builds that one) on the oracle's demonstrations of this run's data,
    # with its prompts, search results and agent limits, its eval sets never demonstrated
    # (train/bootstrap.py: sft_config); later runs reuse it
    sft: dict | None = None

    def for_command_line(self, keys: set[str]) -> "BootstrapSection":
        """What bootstrap may write when the command line set `keys`: a `model` or `data` path given
        there must already exist, unless the same command line sets `bootstrap` too (a typo in a path
        must not silently train a fresh random model). The config file's own paths are generated."""
        if any(k == "bootstrap" or k.startswith("bootstrap.") for k in keys):
            return self
        model, data = "model" in keys, "data" in keys
        return dataclasses.replace(self, tiny_model=None if model else self.tiny_model, sft=None if model else self.sft,
                                   multihop=None if data else self.multihop,
                                   arithmetic=None if data else self.arithmetic)


@dataclass
class AsyncSection:
    # policy versions a trained token may lag behind the weights being updated: 0 is the synchronous loop
    # (roll out, then train, then sync); k >= 1 rolls out the prompts of up to k later steps while a step
    # trains (train/pipeline.py). A weight sync waits for the rollout in flight (drain)
    max_staleness: int = 0


@dataclass
class DynamicSamplingSection:
    # drop prompts whose samples all scored alike (GRPO advantages 0) and roll out more prompts to refill
    # the batch, up to max_draws batches a step (train/pipeline.py)
    enabled: bool = False
    max_draws: int = 3


@dataclass
class WandbSection:
    """Weights & Biases beside tensorboard and metrics.jsonl (always written): the same scalars at the
    same steps, the run's redacted config. One wandb run per `matpo train` start, grouped by run_dir."""
    enabled: bool = False
    mode: str = "offline"  # offline: files under run_dir/wandb, no network (`wandb sync` uploads them) | online
    project: str = "megatron-matpo"
    entity: str | None = None


@dataclass
class LoggerSection:
    wandb: WandbSection = field(default_factory=WandbSection)


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
    sync: SyncConfig = field(default_factory=SyncConfig)  # the same object reaches the syncing rank
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    orchestrate: OrchestrateSection = field(default_factory=OrchestrateSection)
    bootstrap: BootstrapSection = field(default_factory=BootstrapSection)
    async_: AsyncSection = field(default_factory=AsyncSection, metadata={"key": "async"})
    dynamic_sampling: DynamicSamplingSection = field(default_factory=DynamicSamplingSection)
    logger: LoggerSection = field(default_factory=LoggerSection)

    def validate(self) -> "TrainConfig":
        """Every check that needs only the config; `train.preflight` adds those that need the inputs
        on disk. Each failure is one ConfigError "<field>: <why>" (the CLI prints it, exit 2)."""
        def need(cond: bool, key: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"{key}: {why}")

        def positive(key: str, value, strict: bool = True) -> None:
            need(value > 0 if strict else value >= 0, key, f"must be {'>' if strict else '>='} 0, got {value}")

        need(bool(self.model), "model", "the HF directory of the initial policy is required")
        need(bool(self.data), "data", "a MATPO-data parquet file or directory is required")
        positive("async.max_staleness", self.async_.max_staleness, strict=False)
        positive("dynamic_sampling.max_draws", self.dynamic_sampling.max_draws)
        need(not (self.dynamic_sampling.enabled and self.advantage.estimator == "gae"), "dynamic_sampling.enabled",
             "drops prompts whose GRPO advantages are all 0; with advantage.estimator=gae the critic's baseline gives "
             "such prompts advantages too")
        need(not (self.async_.max_staleness and self.orchestrate.colocate), "async.max_staleness",
             "> 0 overlaps rollouts with training, which needs engines on their own devices: colocated engines "
             "(orchestrate.colocate=true) give the GPUs to the actor while it trains")
        need(not self.rollout.model and not self.rollout.data, "rollout.model",
             "rollout.model / rollout.data are set from the top-level `model` / `data`; leave them empty")
        need(not self.rollout.engine.urls, "rollout.engine.urls",
             "training starts its own engines (their weights follow the actor's); leave it empty")
        need(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        need(self.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        need(self.algorithm in ("matpo", "maporl"), "algorithm", f"matpo | maporl, got {self.algorithm!r}")
        need(not (self.algorithm == "maporl" and self.loss.agg == "rollout-mean-token-mean"), "loss.agg",
             "rollout-mean-token-mean averages over MATPO rollouts (a planner and its workers); MAPoRL rows are "
             "per agent turn: use token-mean or a seq-mean mode")
        ro, a = self.rollout, self.actor
        need(ro.n_samples >= 1, "rollout.n_samples", f"must be >= 1, got {ro.n_samples}")
        need(ro.max_concurrent >= 1, "rollout.max_concurrent", f"must be >= 1, got {ro.max_concurrent}")
        need(ro.engine.num_engines >= 1, "rollout.engine.num_engines", f"must be >= 1, got {ro.engine.num_engines}")
        need(ro.engine.tp_size >= 1, "rollout.engine.tp_size", f"must be >= 1, got {ro.engine.tp_size}")
        need(0.0 < ro.engine.mem_fraction_static < 1.0, "rollout.engine.mem_fraction_static",
             f"must be in (0, 1), got {ro.engine.mem_fraction_static}")
        need(ro.toolbox.backend in ("local", "web"), "rollout.toolbox.backend",
             f"local | web, got {ro.toolbox.backend!r}")
        need(ro.toolbox.num_results >= 1, "rollout.toolbox.num_results", f"must be >= 1, got {ro.toolbox.num_results}")
        need(ro.reward.scorer in ("exact_match", "judge"), "rollout.reward.scorer",
             f"exact_match | judge, got {ro.reward.scorer!r}")
        for name in ("tp", "pp", "cp"):
            need(getattr(a, name) >= 1, f"actor.{name}", f"must be >= 1, got {getattr(a, name)}")
        need(not a.sequence_parallel or self.advantage.estimator != "gae", "actor.sequence_parallel",
             "with advantage.estimator=gae: the critic (laid out like the actor) runs without SP for now")
        need(not a.sequence_parallel or a.tp > 1, "actor.sequence_parallel",
             f"splits activations over the TP ranks; it needs actor.tp > 1, got tp={a.tp}")
        need(a.cp == 1 or self.loss.off_policy.level != "sequence", "actor.cp",
             f"{a.cp} with loss.off_policy.level=sequence: a sequence's weight would need its tokens from every "
             "CP rank; use level=token or cp=1")
        need(a.dp >= 0, "actor.dp", f"must be >= 1 (or 0: fill the cluster), got {a.dp}")
        positive("actor.max_tokens_per_micro_batch", a.max_tokens_per_micro_batch)
        need(a.dtype in ("auto", "float32", "bfloat16"), "actor.dtype", f"auto | float32 | bfloat16, got {a.dtype!r}")
        need(a.mini_batches >= 1, "actor.mini_batches", f"must be >= 1, got {a.mini_batches}")
        need(a.recompute in ("none", "full"), "actor.recompute", f"none | full, got {a.recompute!r}")
        need(a.mini_batches <= self.prompts_per_step, "actor.mini_batches",
             f"{a.mini_batches} > prompts_per_step={self.prompts_per_step}: mini-batches split whole GRPO groups")
        need(self.checkpoint.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.checkpoint.keep_last}")
        positive("checkpoint.every", self.checkpoint.every, strict=False)
        positive("eval.every", self.eval.every, strict=False)
        need(self.eval.n_samples >= 1, "eval.n_samples", f"must be >= 1, got {self.eval.n_samples}")
        need(self.eval.temperature is None or self.eval.temperature >= 0, "eval.temperature",
             f"must be >= 0 (or null: the rollouts' temperature), got {self.eval.temperature}")
        need(self.eval.every == 0 or bool(self.eval.data), "eval.every", "eval.every > 0 needs eval.data")
        need(not self.eval.at_start or bool(self.eval.data), "eval.at_start", "eval.at_start needs eval.data")
        self._check_sampling(need, positive)
        self._check_loss(need, positive)
        mp = self.maporl
        need(mp.models in ("shared", "distinct"), "maporl.models", f"shared | distinct, got {mp.models!r}")
        if self.algorithm == "maporl":
            try:
                mp.verifier.validate()
            except ValueError as e:
                raise ConfigError(str(e)) from None
        need(mp.agent_models is None or (mp.models == "distinct" and len(mp.agent_models) == mp.discussion.n_agents),
             "maporl.agent_models", "one HF model per agent, with maporl.models=distinct")
        adv = self.advantage
        need(adv.estimator in ("grpo", "gae"), "advantage.estimator", f"grpo | gae, got {adv.estimator!r}")
        need(adv.estimator == "grpo" or self.algorithm == "maporl", "advantage.estimator",
             "gae is implemented for algorithm=maporl (MATPO's workers inherit their planner's GRPO advantage)")
        need(0.0 <= adv.gamma <= 1.0, "advantage.gamma", f"must be in [0, 1], got {adv.gamma}")
        need(0.0 <= adv.lam <= 1.0, "advantage.lam", f"must be in [0, 1], got {adv.lam}")
        wf = ro.workflow
        longest = max(wf.planner.max_context_tokens, wf.worker.max_context_tokens)
        if self.algorithm == "maporl":
            longest = mp.discussion.max_context_tokens
        from megatron_matpo.train.packing import packed_capacity, padded_row_len

        # as the trainer packs: each row to 2·cp (CP), the micro-batch to tp (× 2·cp)
        capacity = packed_capacity(a.max_tokens_per_micro_batch, a.tp, a.cp)
        padded = padded_row_len(longest, a.cp)
        need(padded <= capacity, "actor.max_tokens_per_micro_batch",
             f"{a.max_tokens_per_micro_batch} is smaller than the longest agent context ({longest} tokens"
             f"{f', {padded} padded to 2*cp' if padded != longest else ''}"
             f"{f'; the budget is {capacity} as a multiple of the TP/CP padding' if capacity != a.max_tokens_per_micro_batch else ''}"
             ", rollout.workflow.*.max_context_tokens or maporl.discussion.max_context_tokens): a trajectory "
             "could not be packed")
        if self.deterministic:
            from megatron_matpo import platform

            need(platform.capabilities().cuda, "deterministic",
                 "needs SGLang's --enable-deterministic-inference, which 0.5.23 supports only with GPU attention "
                 "backends (fa3/flashinfer/triton), not the CPU torch_native backend")
            need(wf.top_p == 1.0, "rollout.workflow.top_p",
                 "deterministic=true needs 1 (SGLang's seeded sampling path)")
        wb = self.logger.wandb
        if wb.enabled:
            need(wb.mode in ("offline", "online"), "logger.wandb.mode", f"must be offline or online, got {wb.mode!r}")
            import importlib.util
            import os

            need(importlib.util.find_spec("wandb") is not None, "logger.wandb.enabled",
                 "the wandb package is not installed (pip install wandb; requirements/cpu.txt pins it)")
            need(wb.mode == "offline" or bool(os.environ.get("WANDB_API_KEY")) or _wandb_logged_in(),
                 "logger.wandb.mode", "online needs WANDB_API_KEY or `wandb login`; offline needs neither")
        self._check_cluster_shape(need)
        return self

    def _check_sampling(self, need, positive) -> None:
        """Turn and token limits and sampling parameters of the workflow that runs."""
        wf = self.rollout.workflow
        if self.algorithm == "matpo":
            need(wf.mode in ("matpo", "single"), "rollout.workflow.mode", f"matpo | single, got {wf.mode!r}")
            need(wf.prompt_style in STYLES, "rollout.workflow.prompt_style",
                 f"{' | '.join(STYLES)}, got {wf.prompt_style!r}")
            positive("rollout.workflow.force_delegation", wf.force_delegation, strict=False)
            roles = ("planner", "worker") if wf.mode == "matpo" else ("planner",)
            for role in roles:
                lim, key = getattr(wf, role), f"rollout.workflow.{role}"
                for name in ("max_turns", "max_context_tokens", "max_tokens_per_turn", "max_calls_per_turn"):
                    positive(f"{key}.{name}", getattr(lim, name))
                need(lim.max_tokens_per_turn <= lim.max_context_tokens, f"{key}.max_tokens_per_turn",
                     f"{lim.max_tokens_per_turn} > max_context_tokens={lim.max_context_tokens}")
                need(0 <= lim.summary_reserve_tokens < lim.max_context_tokens, f"{key}.summary_reserve_tokens",
                     f"must be in [0, max_context_tokens={lim.max_context_tokens}), got {lim.summary_reserve_tokens}")
            top_p, prefix = wf.top_p, "rollout.workflow"
        else:
            d, prefix = self.maporl.discussion, "maporl.discussion"
            need(d.n_agents >= 1, f"{prefix}.n_agents", f"must be >= 1, got {d.n_agents}")
            for name in ("rounds", "max_tokens_per_turn", "max_context_tokens"):
                positive(f"{prefix}.{name}", getattr(d, name))
            need(d.max_tokens_per_turn <= d.max_context_tokens, f"{prefix}.max_tokens_per_turn",
                 f"{d.max_tokens_per_turn} > max_context_tokens={d.max_context_tokens}")
            top_p = d.top_p
        positive(f"{prefix}.temperature", self.sampling_temperature(), strict=False)
        need(0.0 < top_p <= 1.0, f"{prefix}.top_p", f"must be in (0, 1], got {top_p}")

    def _check_loss(self, need, positive) -> None:
        lo = self.loss
        positive("loss.clip_low", lo.clip_low, strict=False)
        positive("loss.clip_high", lo.clip_high, strict=False)
        need(lo.dual_clip_c is None or lo.dual_clip_c > 1.0, "loss.dual_clip_c",
             f"must be > 1 (or null: off), got {lo.dual_clip_c}")
        positive("loss.kl_coef", lo.kl_coef, strict=False)
        need(lo.value_clip is None or lo.value_clip > 0, "loss.value_clip",
             f"must be > 0 (or null: off), got {lo.value_clip}")
        need(lo.kl_as == "loss" or lo.kl_coef == 0.0, "loss.kl_as",
             "'reward' is not implemented yet: use kl_as='loss' (or kl_coef=0)")
        need(lo.entropy_coef == 0.0, "loss.entropy_coef", "> 0 is not implemented yet (entropy is logged)")
        for key, o in (("optim", self.optim), ("critic.optim", self.critic.optim)):
            positive(f"{key}.weight_decay", o.weight_decay, strict=False)
            need(0.0 <= o.adam_beta1 < 1.0 and 0.0 <= o.adam_beta2 < 1.0, f"{key}.adam_beta1",
                 f"adam_beta1 and adam_beta2 must be in [0, 1), got {o.adam_beta1}, {o.adam_beta2}")
            positive(f"{key}.adam_eps", o.adam_eps)
            positive(f"{key}.clip_grad", o.clip_grad, strict=False)
            try:
                o.validate(total_steps=self.steps * self.actor.mini_batches)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None

    def _check_cluster_shape(self, need) -> None:
        """The layout against the allocation (orchestrate.nodes x gpus_per_node) before any process starts;
        resolves actor.dp = 0 ("fill the cluster")."""
        a, o, eng = self.actor, self.orchestrate, self.rollout.engine
        stacks = self.maporl.stacks if self.algorithm == "maporl" else 1  # policies, each with its actor + engines
        models = 2 if self.advantage.estimator == "gae" else 1  # a critic per policy, laid out like its actor
        model_gpus = stacks * models * a.tp * a.pp * a.cp
        if not o.gpus_per_node:  # CPU or an unchecked single machine
            need(a.dp >= 1, "actor.dp", "0 (fill the cluster) needs orchestrate.nodes and orchestrate.gpus_per_node")
            return
        nodes = o.nodes or 1
        total = nodes * o.gpus_per_node
        need(a.tp <= o.gpus_per_node and o.gpus_per_node % a.tp == 0, "actor.tp",
             f"{a.tp} must divide gpus_per_node={o.gpus_per_node}: a TP group stays inside a node (NVLink)")
        need(eng.tp_size <= o.gpus_per_node and o.gpus_per_node % eng.tp_size == 0, "rollout.engine.tp_size",
             f"{eng.tp_size} must divide gpus_per_node={o.gpus_per_node}")
        need(not (o.colocate and self.sync.mode == "broadcast"), "sync.mode",
             "orchestrate.colocate=true puts engines on the actor's GPUs, where NCCL cannot broadcast between "
             "processes sharing a GPU: use sync.mode=tensor (CUDA IPC) or disk")
        engine_gpus = stacks * eng.num_engines * eng.tp_size
        actor_gpus = total if o.colocate else total - engine_gpus
        need(actor_gpus > 0, "rollout.engine.num_engines",
             f"{stacks} x {eng.num_engines} engines x TP {eng.tp_size} = {engine_gpus} GPUs leave none of the {total} "
             "for the actor (set orchestrate.colocate=true to share them)")
        if a.dp == 0:
            need(actor_gpus % model_gpus == 0, "actor.dp",
                 f"actor world size {actor_gpus} ({nodes} nodes x {o.gpus_per_node} GPUs"
                 f"{'' if o.colocate else f' - {engine_gpus} engine GPUs'}) is not divisible by policies x models"
                 " x tp x pp x cp "
                 f"= {model_gpus} (models: the actor, plus a critic with advantage.estimator=gae)")
            a.dp = actor_gpus // model_gpus
        world = model_gpus * a.dp
        need(world <= actor_gpus, "actor.dp",
             f"{stacks} x {models} model(s) x actor tp x pp x cp x dp = {world} GPUs but the allocation has {actor_gpus} "
             f"for actors ({nodes} nodes x {o.gpus_per_node} GPUs, colocate={o.colocate})")
        need(engine_gpus <= total, "rollout.engine.num_engines",
             f"{stacks} x {eng.num_engines} engines x TP {eng.tp_size} = {engine_gpus} GPUs > {total} in the "
             "allocation")

    def resolved_dtype(self) -> str:
        return resolve_dtype(self.actor.dtype)

    def sampling_temperature(self) -> float:
        """The training rollouts' temperature (MATPO's workflow, or MAPoRL's discussion): the actor trains
        the policy the engines sample at it."""
        return self.maporl.discussion.temperature if self.algorithm == "maporl" else self.rollout.workflow.temperature


def resolve_dtype(dtype: str) -> str:
    """An actor's `dtype`, with `auto` made concrete: bfloat16 on CUDA, float32 on CPU."""
    from megatron_matpo import platform

    if dtype != "auto":
        return dtype
    return "bfloat16" if platform.capabilities().cuda else "float32"


def _wandb_logged_in() -> bool:
    """`wandb login` stored a key for api.wandb.ai in ~/.netrc (wandb 0.29)."""
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False

