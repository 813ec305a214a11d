"""Prompt batches for RL steps: a seeded shuffle per epoch and a cursor that checkpoints with the run."""
from __future__ import annotations

import random
from dataclasses import dataclass

from megatron_matpo.data.schema import Sample


@dataclass
class PromptLoader:
    samples: list[Sample]
    batch_size: int
    seed: int = 0
    epoch: int = 0
    index: int = 0  # next position in this epoch's order

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("the training set is empty")
        if self.batch_size > len(self.samples):
            raise ValueError(f"prompts_per_step={self.batch_size} exceeds the {len(self.samples)} training prompts")

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.samples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[Sample]:
        """The next `batch_size` prompts; an epoch's tail that cannot fill a batch is skipped."""
        if self.index + self.batch_size > len(self.samples):
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order(self.epoch)
        batch = [self.samples[i] for i in order[self.index:self.index + self.batch_size]]
        self.index += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n": len(self.samples)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != len(self.samples) or state.get("seed") != self.seed:
            raise ValueError(f"data cursor was saved for {state.get('n')} prompts / seed {state.get('seed')}, "
                             f"this run has {len(self.samples)} / seed {self.seed}: resume with the same data and seed")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
