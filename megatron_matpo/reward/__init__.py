"""Rewards: answer extraction/matching, accuracy scorers (exact match, LLM judge), MATPO combination."""
from megatron_matpo.reward.answer import exact_match, extract_boxed, f1, normalize_answer
from megatron_matpo.reward.judge import (
    AccuracyItem,
    AccuracyResult,
    AccuracyScorer,
    ExactMatchScorer,
    JudgeConfig,
    JudgeError,
    LLMJudgeScorer,
)
from megatron_matpo.reward.matpo import (
    RewardBreakdown,
    matpo_reward,
    matpo_reward_from_turns,
    single_agent_reward,
    single_agent_reward_from_turns,
)

__all__ = [
    "AccuracyItem", "AccuracyResult", "AccuracyScorer", "ExactMatchScorer", "JudgeConfig", "JudgeError",
    "LLMJudgeScorer", "RewardBreakdown", "exact_match", "extract_boxed", "f1", "matpo_reward",
    "matpo_reward_from_turns", "normalize_answer", "single_agent_reward", "single_agent_reward_from_turns",
]
