"""Rewards by name: a run picks one with ``reward.name``.

A reward scores one **group** (the G responses to one context) against that context's
ground-truth continuation, because some rewards (conditional dense) depend on the whole group.
All rewards here are pure functions of their arguments; anything model-dependent (the dense
rewards' token probabilities, tokenisation of predictions) comes in through ``RewardTarget``
hooks supplied by the caller.

Registered rewards (paper Sec. 3.2 and Appendix A):

* ``prefix_match``: the paper's reward (``next_token.prefix_match_reward``).
* ``first_token``: 1 when the prediction's first token is x_t.
* ``dense``: 1 when the first token is x_t, else the policy's probability of the prediction's
  (wrong) first token; needs ``RewardTarget.first_token_prob``.
* ``conditional_dense``: ``dense`` for groups where at least one response has the right first
  token; all zeros otherwise.

>>> target = RewardTarget(continuation_token_bytes=(b" 4", b"}"))
>>> get_reward("prefix_match")(["</think>\\\\boxed{ 4}", "</think>\\\\boxed{4}", "no"], target)
[1.0, 0.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from megatron_rpt.errors import ConfigError
from megatron_rpt.reward.next_token import (
    extract_prediction,
    first_token_match,
    prefix_match_reward,
)


@dataclass(frozen=True)
class RewardTarget:
    """What a group's responses are scored against."""

    continuation_token_bytes: Sequence[bytes]
    """Exact bytes of the ground-truth continuation tokens x_t, x_{t+1}, ... (document ids)."""
    continuation_ids: Sequence[int] = ()
    """The same tokens as ids (x_t first)."""
    tokenize: Callable[[str], Sequence[int]] | None = None
    """Optional tokenizer (no special tokens) for first-token rewards to compare ids."""
    first_token_prob: Callable[[str], float] | None = None
    """Optional hook: the policy's probability of the prediction's first token given the
    context (for the dense rewards)."""
    extra: dict = field(default_factory=dict)


class RewardFn(Protocol):
    """Scores the responses of one group; returns one float per response."""

    def __call__(
        self, responses: Sequence[str], target: RewardTarget, *, require_think_close: bool = True
    ) -> list[float]: ...


_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward to the registry under ``name``."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    """The reward registered as ``name``; a clear error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"reward.name: unknown reward {name!r}; known: {sorted(_REGISTRY)}"
        ) from None


def reward_names() -> list[str]:
    """Names of all registered rewards."""
    return sorted(_REGISTRY)


def _first_token_ok(pred: str | None, target: RewardTarget) -> float:
    if pred is None:
        return 0.0
    pred_id = true_id = None
    if target.tokenize is not None and target.continuation_ids:
        ids = list(target.tokenize(pred))
        pred_id, true_id = (ids[0] if ids else -1), int(target.continuation_ids[0])
    return first_token_match(
        pred, target.continuation_token_bytes, prediction_first_id=pred_id, true_first_id=true_id
    )


@register_reward("prefix_match")
def prefix_match(
    responses: Sequence[str], target: RewardTarget, *, require_think_close: bool = True
) -> list[float]:
    """The paper's prefix-matching reward for each response."""
    return [
        prefix_match_reward(
            extract_prediction(r, require_think_close=require_think_close),
            target.continuation_token_bytes,
        )
        for r in responses
    ]


@register_reward("first_token")
def first_token(
    responses: Sequence[str], target: RewardTarget, *, require_think_close: bool = True
) -> list[float]:
    """1 when the prediction's first token is the true next token."""
    return [
        _first_token_ok(extract_prediction(r, require_think_close=require_think_close), target)
        for r in responses
    ]


def _dense_one(pred: str | None, target: RewardTarget) -> float:
    if pred is None or not pred:
        return 0.0
    if _first_token_ok(pred, target) == 1.0:
        return 1.0
    if target.first_token_prob is None:
        raise ConfigError(
            "reward.name=dense needs the policy's first-token probability hook "
            "(RewardTarget.first_token_prob); this caller does not provide it"
        )
    return float(target.first_token_prob(pred))


@register_reward("dense")
def dense(
    responses: Sequence[str], target: RewardTarget, *, require_think_close: bool = True
) -> list[float]:
    """1 for a correct first token, else the policy's probability of the predicted one."""
    return [
        _dense_one(extract_prediction(r, require_think_close=require_think_close), target)
        for r in responses
    ]


@register_reward("conditional_dense")
def conditional_dense(
    responses: Sequence[str], target: RewardTarget, *, require_think_close: bool = True
) -> list[float]:
    """``dense`` when some response in the group is right; zero for the whole group otherwise."""
    preds = [extract_prediction(r, require_think_close=require_think_close) for r in responses]
    if not any(_first_token_ok(p, target) == 1.0 for p in preds):
        return [0.0] * len(responses)
    return [_dense_one(p, target) for p in preds]
