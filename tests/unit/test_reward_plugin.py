"""The reward extension point: a reward a user registers is what the run validates and scores.

``register_reward`` is the one way to add a reward without editing megatron_rpt; these tests pin
its contract: the name becomes a valid ``reward.name``, the scoring path every caller shares
(``reward.scoring.score_group``, used by training and evaluation) calls it with the assistant
turn as the reward reads it, a second registration under the same name is refused, and
completion mode (rewards on token bytes) refuses a text reward by name.
"""

from __future__ import annotations

import pytest

from megatron_rpt.config import build_config
from megatron_rpt.errors import ConfigError
from megatron_rpt.reward import registry
from megatron_rpt.reward.registry import RewardTarget, register_reward
from megatron_rpt.reward.scoring import ResponseReader, score_group
from megatron_rpt.rollout.types import Completion

NAME = "test_plugin_says_yes"


@pytest.fixture
def plugin():
    calls: list[tuple[list[str], bool]] = []

    @register_reward(NAME)
    def says_yes(responses, target, *, require_think_close=True):  # noqa: ANN001, ANN202
        calls.append((list(responses), require_think_close))
        return [float("yes" in r) for r in responses]

    yield calls
    registry._REGISTRY.pop(NAME)


def test_registered_reward_is_a_valid_reward_name(plugin):
    assert build_config(overrides=[f"reward.name={NAME}"]).reward.name == NAME


def test_unknown_reward_name_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match="reward.name"):
        build_config(overrides=["reward.name=test_plugin_never_registered"])


def test_score_group_calls_the_registered_reward_with_the_assistant_turn(plugin):
    reader = ResponseReader(mode="reasoning", opener="<think>")
    completions = [
        Completion(token_ids=[1], text=" so yes</think>", logprobs=None, finish_reason="stop"),
        Completion(token_ids=[2], text="no", logprobs=None, finish_reason="length"),
    ]
    target = RewardTarget(continuation_token_bytes=(b" 4",))
    rewards, _ = score_group(
        completions, target, reader, reward_name=NAME, require_think_close=False
    )
    assert rewards == [1.0, 0.0]
    assert plugin == [(["<think> so yes</think>", "<think>no"], False)]


def test_registering_a_name_twice_is_refused(plugin):
    with pytest.raises(ValueError, match="registered twice"):
        register_reward(NAME)(lambda responses, target, **_: [0.0] * len(responses))


def test_completion_mode_refuses_a_text_reward_by_name(plugin):
    with pytest.raises(ConfigError, match=f"reward.name={NAME}"):
        build_config(overrides=[f"reward.name={NAME}", "prompt.mode=completion"])
