"""The `maporl:` section of a training config (algorithm=maporl)."""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_matpo.maporl.discussion import DiscussionConfig
from megatron_matpo.maporl.rewards import RewardConfig as MaporlRewardConfig
from megatron_matpo.maporl.verifier import VerifierConfig


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
