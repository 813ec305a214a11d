"""Create the embedded default's inputs on first use: the offline multi-hop data + corpus, and a tiny
random-init model whose tokenizer is trained on the agents' prompts and the corpus (so a system
prompt is a few hundred tokens, not ~1.4k as with a tokenizer that never saw it)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_matpo.config import ConfigError
from megatron_matpo.train.config import TrainConfig


def tokenizer_texts(corpus: str | None, prompt_style: str = "full") -> list[str]:
    """What the tiny model's tokenizer is trained on: filler, the agents' prompts, the corpus. A compact-style
    model (the embedded default's) must copy links from search results: its texts add the compact prompts
    and each page's URL (a link is ~13 tokens instead of ~20 single characters)."""
    from megatron_matpo.agents import prompts
    from megatron_matpo.maporl import prompts as maporl_prompts
    from megatron_matpo.model.tiny import synthetic_corpus
    from megatron_matpo.toolbox.specs import PLANNER_TOOLS, SINGLE_AGENT_TOOLS, WORKER_TOOLS

    compact = prompt_style == "compact"
    texts = synthetic_corpus()
    # the prompts repeated so their words win merges over the synthetic filler
    agents = []
    for style in ("full", "compact") if compact else ("full",):
        agents += [prompts.system_prompt("planner", PLANNER_TOOLS, style),
                   prompts.system_prompt("worker", WORKER_TOOLS, style),
                   prompts.system_prompt("single", SINGLE_AGENT_TOOLS, style), prompts.planner_user_prompt("Q?", style),
                   prompts.worker_user_prompt("Q?", "S", style), prompts.worker_summary_prompt("Q?", "S", style)]
    texts += [*agents, maporl_prompts.system_prompt(0, 2), maporl_prompts.first_round_prompt("Q?"),
              maporl_prompts.revision_prompt("Q?", [maporl_prompts.SharedAnswer(1, "A", None)])] * 20
    if corpus and Path(corpus).exists():
        from megatron_matpo.toolbox.local_search import read_corpus

        texts += [f"{p.url}\n{p.title}\n{p.text}" if compact else f"{p.title}\n{p.text}" for p in read_corpus(corpus)]
    return texts


def sft_config(cfg: TrainConfig):
    """The `matpo sft` job that `bootstrap.sft` asks for (None: none), or a ConfigError naming the field.
    Unset fields come from the run: run_dir is `model`'s parent, the run's data, corpus, workflow (mode,
    prompt style, agent limits), search results and seed; its eval sets are excluded from the
    demonstrations; bootstrap builds the base model (`sft.model`) and the data."""
    from megatron_matpo import config
    from megatron_matpo.sft.config import SftConfig

    b = cfg.bootstrap
    if b.sft is None:
        return None
    hf = Path(cfg.model)
    if hf.name != "hf":
        raise ConfigError(f"model: {cfg.model} must be <a run_dir>/hf, where bootstrap.sft's `matpo sft` writes its "
                          "export")
    if not b.sft.get("model"):
        raise ConfigError("bootstrap.sft.model: the HF directory of the model to fine-tune is required")
    wf, ev = cfg.rollout.workflow, cfg.eval.data
    derived = {"run_dir": str(hf.parent), "data": cfg.data, "corpus": cfg.corpus or "",
               "exclude": [ev] if isinstance(ev, str) else list(ev or []), "mode": wf.mode,
               "prompt_style": wf.prompt_style, "num_results": cfg.rollout.toolbox.num_results,
               "planner": dataclasses.asdict(wf.planner), "worker": dataclasses.asdict(wf.worker), "seed": cfg.seed,
               "export_hf": True,
               "bootstrap": {"tiny_model": b.tiny_model, "tiny_shape": b.tiny_shape, "multihop": b.multihop}}
    try:
        return config.build(SftConfig, {**derived, **b.sft}).validate()
    except ConfigError as e:
        raise ConfigError(f"bootstrap.sft.{e}") from None


def ensure_inputs(cfg: TrainConfig, log=print) -> None:
    b = cfg.bootstrap
    sft = sft_config(cfg) if isinstance(cfg, TrainConfig) else None
    # refuse before writing anything: a missing model that bootstrap may not build fails at once
    if not Path(cfg.model).exists() and not b.tiny_model and sft is None:
        raise ConfigError(f"model: {cfg.model} does not exist (bootstrap builds a tiny random-init model only at "
                          "the config file's own path, or where the command line also sets bootstrap.tiny_model)")
    if not Path(cfg.data).exists() and b.arithmetic is not None:
        from megatron_matpo.data.arithmetic import ArithmeticConfig, write_arithmetic

        out = Path(cfg.data).parent
        log(f"bootstrap: writing the arithmetic word problems to {out}")
        written = write_arithmetic(out, ArithmeticConfig(**b.arithmetic))
        if not Path(cfg.data).exists():
            raise ConfigError(f"data: {cfg.data} was not among the generated sets: {sorted(written)}")
    if not Path(cfg.data).exists():
        if b.multihop is None:
            raise ConfigError(f"data: {cfg.data} does not exist (set bootstrap.multihop or bootstrap.arithmetic "
                              "to generate an offline set there)")
        from megatron_matpo.data.multihop import MultihopConfig, write_multihop

        out = Path(cfg.data).parent
        log(f"bootstrap: writing the offline multi-hop data set and corpus to {out}")
        written = write_multihop(out, MultihopConfig(**b.multihop))
        if not Path(cfg.data).exists():
            raise ConfigError(f"data: {cfg.data} was not among the generated sets: {sorted(written)}")
    if not Path(cfg.model).exists() and sft is not None:
        from megatron_matpo.sft.train import run_sft

        log(f"bootstrap: fine-tuning {sft.model} into {cfg.model} on the oracle's demonstrations (matpo sft, "
            f"run_dir {sft.run_dir})")
        run_sft(sft, log)  # its own bootstrap builds the base model first
    if not Path(cfg.model).exists():
        from megatron_matpo.model.tiny import TinyShape, make_tiny_model, train_tokenizer

        log(f"bootstrap: building a tiny random-init {b.tiny_model} model at {cfg.model}")
        style = cfg.prompt_style if hasattr(cfg, "prompt_style") else cfg.rollout.workflow.prompt_style  # SFT | RL
        tok = train_tokenizer(tokenizer_texts(cfg.corpus, style), vocab_size=4096)
        make_tiny_model(cfg.model, b.tiny_model, seed=cfg.seed, tokenizer=tok,
                        shape=TinyShape(**(b.tiny_shape or {})))


def verifier_train_config(cfg: TrainConfig):
    """The `matpo train-verifier` job that MAPoRL's `maporl.verifier.train` asks for (None: nothing to train).
    Unset fields come from the run: the policy's model as the base, run_dir the served model's parent, a
    sampling pass of the run's discussion (no scores shown: there is no verifier yet) on its data."""
    import dataclasses

    from megatron_matpo import config
    from megatron_matpo.verifier.config import VerifierTrainConfig

    v = cfg.maporl.verifier if cfg.algorithm == "maporl" else None
    if v is None or v.train is None:
        return None
    hf = Path(v.served_model())
    if hf.name != "hf":
        raise ConfigError(f"maporl.verifier.reward_model.model_path: {hf} must be <a run_dir>/hf, where "
                          "`matpo train-verifier` (maporl.verifier.train) writes its export")
    fields = {"run_dir": str(hf.parent), "model": cfg.model, **v.train}
    if "transcripts" not in v.train:
        discussion = {**dataclasses.asdict(cfg.maporl.discussion), "show_scores": False}
        fields["sample"] = {"data": cfg.data, "toy_answer": cfg.bootstrap.toy_answer,
                            "maporl": {"discussion": discussion, "reward": dataclasses.asdict(cfg.maporl.reward)},
                            "engine": dataclasses.asdict(cfg.rollout.engine), **(v.train.get("sample") or {})}
    return config.build(VerifierTrainConfig, fields, "maporl.verifier.train").validate()


def ensure_verifier(cfg: TrainConfig, log=print) -> None:
    """MAPoRL with `maporl.verifier.train`: train the served verifier (`matpo train-verifier`) when its
    `reward_model.model_path` does not exist yet; later runs reuse it."""
    vcfg = verifier_train_config(cfg)
    if vcfg is None or Path(cfg.maporl.verifier.served_model()).exists():
        return
    from megatron_matpo.verifier.train import run_train_verifier

    log(f"bootstrap: training the verifier {cfg.maporl.verifier.served_model()} (matpo train-verifier, "
        f"run_dir {vcfg.run_dir})")
    run_train_verifier(vcfg, log)
