"""RL algorithm pieces: advantages (GRPO, MATPO credit assignment) and policy losses."""
from megatron_matpo.algo.advantage import (
    RowMeta,
    broadcast_to_tokens,
    grpo_advantages,
    matpo_advantages,
    matpo_advantages_from_rows,
)
from megatron_matpo.algo.loss import (
    AGG_MODES,
    KL_KINDS,
    LossConfig,
    aggregate_loss,
    apply_kl_to_rewards,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    per_sequence_sums,
    policy_loss,
    ppo_policy_loss,
    value_loss,
)
from megatron_matpo.algo.gae import gae, whiten

__all__ = [
    "AGG_MODES", "KL_KINDS", "LossConfig", "RowMeta", "aggregate_loss", "apply_kl_to_rewards",
    "broadcast_to_tokens", "entropy_from_logits", "grpo_advantages", "kl_penalty", "masked_mean",
    "matpo_advantages", "matpo_advantages_from_rows", "per_sequence_sums", "policy_loss", "ppo_policy_loss",
    "value_loss", "gae", "whiten",
]
