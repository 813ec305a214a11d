"""`matpo train-verifier`'s typed config: MAPoRL answers labelled by the gold answer, balanced, split by
question; a Megatron model with a scalar score head trained on them with binary cross-entropy; the
HF sequence-classification export the `reward_model` verifier serves. Validated before anything
starts; every failure is one ConfigError naming the field."""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_matpo.config import ConfigError
from megatron_matpo.rollout.runner import EngineSection
from megatron_matpo.sft.config import SftActorSection
from megatron_matpo.train.config import BootstrapSection
from megatron_matpo.train.optim import OptimConfig


@dataclass
class SamplingSection:
    """A fresh sampling pass when there are no transcripts yet: MAPoRL discussions of `model` (the policy)
    on `data`'s questions on one SGLang engine, written as a run's transcripts (run_dir/samples/)."""
    data: str = ""            # MATPO-data parquet: the questions (their gold answers label the turns)
    max_questions: int | None = None
    n_samples: int = 4        # discussions per question
    maporl: dict = field(default_factory=dict)  # MaporlSection fields (discussion, reward): the run's own
    toy_answer: str | None = None  # every question's gold answer rewritten (the learnable toy's bootstrap.toy_answer)
    engine: EngineSection = field(default_factory=lambda: EngineSection(mem_fraction_static=0.5,
                                                                        max_total_tokens=262144))


@dataclass
class VerifierTrainConfig:
    run_dir: str = "runs/verifier"
    # HF causal LM whose body becomes the verifier (its LM head is replaced by a zero-initialized,
    # bias-free scalar score head); usually the policy's initial model, as in MAPoRL
    model: str = ""
    transcripts: list[str] = field(default_factory=list)  # rollouts/ dirs or *.jsonl files of MAPoRL runs
    sample: SamplingSection | None = None  # instead of transcripts: sample them first
    rel_tol: float = 1e-6     # gold-answer match (the exact-match verifier's)
    abs_tol: float = 1e-6
    # at most this many right and as many wrong answers per question (MAPoRL: 10); null: balance over the
    # whole set instead (the majority label subsampled)
    balance_per_question: int | None = 10
    holdout: float = 0.2      # fraction of the questions held out (their answers: the eval split)
    enable_thinking: bool | None = None  # the chat template's switch, as the served verifier renders it
    epochs: int = 3
    rows_per_step: int = 32   # answers per optimizer step
    eval_every: int = 0       # steps between held-out evaluations (0: after each epoch); always at the end
    seed: int = 0
    actor: SftActorSection = field(default_factory=lambda: SftActorSection(max_tokens_per_micro_batch=4096))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, lr_decay_style="cosine"))
    export_hf: bool = True    # run_dir/hf: the verifier as Qwen3ForSequenceClassification (num_labels 1)
    bootstrap: BootstrapSection = field(default_factory=BootstrapSection)  # `model` / `sample.data` on first use

    def validate(self) -> "VerifierTrainConfig":
        def need(cond: bool, key: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"{key}: {why}")

        need(bool(self.model), "model", "the HF directory of the verifier's base model is required")
        need(bool(self.transcripts) != (self.sample is not None), "transcripts",
             "give MAPoRL transcripts (rollouts/ dirs or *.jsonl files) or a `sample:` section, exactly one")
        if self.sample is not None:
            need(bool(self.sample.data), "sample.data", "the questions to sample discussions on are required")
            need(self.sample.n_samples >= 1, "sample.n_samples", f"must be >= 1, got {self.sample.n_samples}")
        need(self.balance_per_question is None or self.balance_per_question >= 1, "balance_per_question",
             f"must be >= 1 or null, got {self.balance_per_question}")
        need(0.0 < self.holdout < 1.0, "holdout", f"must be in (0, 1), got {self.holdout}")
        need(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        need(self.rows_per_step >= 1, "rows_per_step", f"must be >= 1, got {self.rows_per_step}")
        need(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        self.actor.validate(need)
        try:
            self.optim.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self
