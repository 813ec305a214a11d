"""MAPoRL: multi-agent discussion rollouts, verifiers, and influence-aware rewards with incentives."""
from megatron_matpo.maporl.answers import Tolerance, answers_match, consensus, final_answer, parse_number
from megatron_matpo.maporl.discussion import (
    Discussion,
    DiscussionConfig,
    DiscussionTurn,
    DiscussionWorkflow,
    assign_rewards,
    verify_discussions,
    verify_turns,
)
from megatron_matpo.maporl.rewards import (
    IncentiveWeights,
    RewardBreakdown,
    RewardConfig,
    incentive_terms,
    influence_aware_rewards,
    maporl_rewards,
)
from megatron_matpo.maporl.verifier import (
    NumericMatchVerifier,
    RewardModelConfig,
    RewardModelError,
    RewardModelVerifier,
    VerifierConfig,
    make_verifier,
)

__all__ = [
    "Discussion", "DiscussionConfig", "DiscussionTurn", "DiscussionWorkflow", "IncentiveWeights",
    "NumericMatchVerifier", "RewardBreakdown", "RewardConfig", "RewardModelConfig", "RewardModelError",
    "RewardModelVerifier", "Tolerance", "VerifierConfig", "answers_match", "assign_rewards", "consensus",
    "final_answer", "incentive_terms", "influence_aware_rewards", "make_verifier", "maporl_rewards",
    "parse_number", "verify_discussions", "verify_turns",
]
