"""The SFT job's typed config (`matpo sft`): oracle demonstrations on the offline multi-hop set, then
supervised fine-tuning of the Megatron actor on their assistant tokens. Validated before anything
starts; every failure is one ConfigError naming the field."""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_matpo.agents.prompts import STYLES
from megatron_matpo.agents.workflow import AgentLimits
from megatron_matpo.config import ConfigError
from megatron_matpo.model.layout import ParallelLayout
from megatron_matpo.train.config import BootstrapSection
from megatron_matpo.train.optim import OptimConfig


@dataclass
class SftActorSection:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA
    max_tokens_per_micro_batch: int = 8192  # THD packing budget; every demonstration must fit
    recompute: str = "none"  # none | full

    def validate(self, need) -> "SftActorSection":
        """The actor fields (shared by `matpo sft` and `matpo train-verifier`), through the caller's `need`."""
        for name in ("tp", "pp", "dp"):
            need(getattr(self, name) >= 1, f"actor.{name}", f"must be >= 1, got {getattr(self, name)}")
        need(self.max_tokens_per_micro_batch > 0, "actor.max_tokens_per_micro_batch",
             f"must be > 0, got {self.max_tokens_per_micro_batch}")
        need(self.dtype in ("auto", "float32", "bfloat16"), "actor.dtype",
             f"auto | float32 | bfloat16, got {self.dtype!r}")
        need(self.recompute in ("none", "full"), "actor.recompute", f"none | full, got {self.recompute!r}")
        return self

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(tp=self.tp, pp=self.pp, dp=self.dp)


@dataclass
class SftConfig:
    run_dir: str = "runs/sft"
    model: str = ""  # HF directory: initial weights, tokenizer
    data: str = ""  # multi-hop MATPO-data parquet: the questions demonstrated (extra_info.metadata.hops)
    corpus: str = ""  # the local search corpus the demonstrations' tools read
    # questions kept out of the demonstrations (the evaluation sets of the RL run that starts from this model)
    exclude: list[str] = field(default_factory=list)
    mode: str = "matpo"  # matpo: planner + worker demonstrations | single: the single-agent baseline's
    # the prompts and search results of the RL run that starts from this model (its
    # rollout.workflow.prompt_style and rollout.toolbox.num_results)
    prompt_style: str = "full"
    num_results: int = 10
    # the limits the demonstrations must fit (those of the RL run that starts from this model): a
    # demonstration that hits one is dropped, never cut. The single agent runs under `planner`'s and
    # needs 2 turns per hop (search, scrape) and one to answer
    planner: AgentLimits = field(default_factory=lambda: AgentLimits(max_turns=8, max_context_tokens=4096,
                                                                     max_tokens_per_turn=256))
    worker: AgentLimits = field(default_factory=lambda: AgentLimits(max_turns=4, max_context_tokens=4096,
                                                                    max_tokens_per_turn=256,
                                                                    summary_reserve_tokens=256))
    max_demos: int | None = None  # the first N questions only
    epochs: int = 2
    rows_per_step: int = 32  # demonstration rows (a planner or worker conversation) per optimizer step
    seed: int = 0
    actor: SftActorSection = field(default_factory=SftActorSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr_decay_style="cosine"))  # lr 1e-5
    export_hf: bool = True  # run_dir/hf: the fine-tuned model in HF format (what RL starts from)
    bootstrap: BootstrapSection = field(default_factory=BootstrapSection)

    def validate(self) -> "SftConfig":
        def need(cond: bool, key: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"{key}: {why}")

        need(bool(self.model), "model", "the HF directory of the model to fine-tune is required")
        need(bool(self.data), "data", "a multi-hop MATPO-data parquet file or directory is required")
        need(bool(self.corpus), "corpus", "the local search corpus of the multi-hop set is required")
        need(self.mode in ("matpo", "single"), "mode", f"matpo | single, got {self.mode!r}")
        need(self.prompt_style in STYLES, "prompt_style", f"{' | '.join(STYLES)}, got {self.prompt_style!r}")
        need(self.num_results >= 1, "num_results", f"must be >= 1, got {self.num_results}")
        need(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        need(self.rows_per_step >= 1, "rows_per_step", f"must be >= 1, got {self.rows_per_step}")
        need(self.max_demos is None or self.max_demos >= 1, "max_demos", f"must be >= 1, got {self.max_demos}")
        a = self.actor.validate(need)
        for role in ("planner", "worker"):
            lim: AgentLimits = getattr(self, role)
            need(lim.max_turns >= 1, f"{role}.max_turns", f"must be >= 1, got {lim.max_turns}")
            need(0 < lim.max_tokens_per_turn <= lim.max_context_tokens, f"{role}.max_tokens_per_turn",
                 f"must be in (0, {role}.max_context_tokens={lim.max_context_tokens}], got {lim.max_tokens_per_turn}")
            need(lim.max_context_tokens <= a.max_tokens_per_micro_batch, f"{role}.max_context_tokens",
                 f"{lim.max_context_tokens} > actor.max_tokens_per_micro_batch={a.max_tokens_per_micro_batch}: "
                 "a demonstration that long could not be packed")
        try:
            self.optim.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self
