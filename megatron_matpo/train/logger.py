"""Run logging: tensorboard scalars, a metrics.jsonl mirror (easy to diff and test), optionally
Weights & Biases (`logger.wandb`), NVML GPU utilization and memory when a GPU is present, per-step
rollout transcripts."""
from __future__ import annotations

import json
import time
from pathlib import Path


class _Nvml:
    def __init__(self) -> None:
        self.handles = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no driver / no GPU (NVMLError_LibraryNotFound on CPU machines)
            self.handles = []

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, h in enumerate(self.handles):
            util = self.nv.nvmlDeviceGetUtilizationRates(h)
            mem = self.nv.nvmlDeviceGetMemoryInfo(h)
            out[f"gpu{i}/util_pct"] = float(util.gpu)
            out[f"gpu{i}/mem_used_gib"] = mem.used / 2**30
        return out


def _wandb_run(run_dir: Path, cfg, config: dict | None):
    """One wandb run for this process's start of the run, grouped (and named) by the run directory, so
    a resumed run's starts sit together and no start logs a step below one already logged."""
    import wandb

    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    # console="off": wandb would otherwise wrap this process's stdout/stderr to mirror it
    settings = wandb.Settings(console="off", silent=True, x_disable_stats=True)
    return wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(run_dir),
                      group=run_dir.name, name=run_dir.name, job_type="train", config=config or {},
                      settings=settings)


class RunLogger:
    def __init__(self, run_dir: str | Path, wandb=None, config: dict | None = None):
        """`wandb`: a WandbSection (logged to when enabled); `config`: what the wandb run records (redacted)."""
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_dir)
        self.tb = SummaryWriter(str(self.dir / "tensorboard"))
        self.jsonl_path = self.dir / "metrics.jsonl"
        self.jsonl = open(self.jsonl_path, "a")
        self.nvml = _Nvml()
        (self.dir / "rollouts").mkdir(parents=True, exist_ok=True)
        self.wandb = _wandb_run(self.dir, wandb, config) if wandb is not None and wandb.enabled else None

    def transcript_path(self, step: int, prefix: str = "step") -> Path:
        return self.dir / "rollouts" / f"{prefix}_{step:06d}.jsonl"

    def log(self, step: int, metrics: dict[str, float]) -> None:
        metrics = {**metrics, **self.nvml.metrics()}
        for k, v in sorted(metrics.items()):
            self.tb.add_scalar(k, v, step)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.jsonl.flush()

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > `step` (logged by a run that died before checkpointing them), so
        a resumed run's metrics.jsonl holds each step once; tensorboard shows the rewrite as a restart."""
        self.jsonl.close()
        lines = self.jsonl_path.read_text().splitlines(keepends=True) if self.jsonl_path.exists() else []
        keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.jsonl_path.write_text("".join(keep))
        self.jsonl = open(self.jsonl_path, "a")

    def close(self) -> None:
        self.tb.close()
        self.jsonl.close()
        if self.wandb is not None:
            from megatron_matpo.compat import finish_wandb_run

            finish_wandb_run(self.wandb)
            self.wandb = None
