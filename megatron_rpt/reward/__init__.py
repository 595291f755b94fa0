r"""Parsing and rewards for next-token reasoning (pure functions, no tokenizer state).

Public API (names are stable):

* ``extract_prediction(response, *, require_think_close=True) -> str | None``
* ``prefix_match_reward(prediction, continuation_token_bytes) -> float``
* ``get_reward(name)`` / ``register_reward(name)`` and ``RewardTarget``
"""

from megatron_rpt.reward.next_token import (
    extract_prediction,
    first_token_match,
    prefix_match_reward,
)
from megatron_rpt.reward.registry import (
    RewardFn,
    RewardTarget,
    get_reward,
    register_reward,
    reward_names,
)

__all__ = [
    "RewardFn",
    "RewardTarget",
    "extract_prediction",
    "first_token_match",
    "get_reward",
    "prefix_match_reward",
    "register_reward",
    "reward_names",
]
