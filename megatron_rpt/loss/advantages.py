"""GRPO group advantages and DAPO dynamic sampling (pure torch, no communication).

Shapes: B = groups (contexts) in the batch, G = responses per group, N = responses flattened.

GRPO scores each of the G responses to one context against the others:
``A_i = (r_i - mean(r)) / (std(r) + eps)``, every token of response i sharing A_i. The std is
the unbiased (Bessel-corrected) one, as ``torch.std`` in verl's and slime's GRPO; with
``std_normalize=False`` only the mean baseline remains (Dr. GRPO). A group whose rewards are
all equal gets advantage exactly 0 (never NaN), and carries no gradient: DAPO's dynamic sampling
drops such groups and samples more contexts until the batch is full.

>>> grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
tensor([[ 0.8660, -0.8660, -0.8660,  0.8660],
        [ 0.0000,  0.0000,  0.0000,  0.0000]])
>>> dynamic_sampling_keep_mask(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
tensor([ True, False, False])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Generic, Literal, TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")


def grpo_advantages(
    rewards_BG: torch.Tensor, *, std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages ``[B, G]`` of rewards ``[B, G]`` (one row per context)."""
    if rewards_BG.dim() != 2:
        raise ValueError(f"rewards_BG must be [B, G], got shape {tuple(rewards_BG.shape)}")
    rewards_BG = rewards_BG.float()
    centred_BG = rewards_BG - rewards_BG.mean(dim=1, keepdim=True)
    if not std_normalize:
        return centred_BG
    if rewards_BG.shape[1] < 2:
        return torch.zeros_like(rewards_BG)
    std_B1 = rewards_BG.std(dim=1, keepdim=True)
    return centred_BG / (std_B1 + eps)


def grpo_advantages_flat(
    rewards_N: torch.Tensor,
    group_ids_N: torch.Tensor,
    *,
    std_normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages ``[N]`` for flat rewards ``[N]`` whose groups are given by ``group_ids_N``.

    Groups may have different sizes (e.g. after a failed generation was dropped); ids are any
    non-negative integers. A group of one response gets advantage 0.

    >>> grpo_advantages_flat(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 1]))
    tensor([-0.7071,  0.7071,  0.0000])
    """
    if rewards_N.dim() != 1 or group_ids_N.shape != rewards_N.shape:
        raise ValueError(
            f"rewards_N {tuple(rewards_N.shape)} and group_ids_N {tuple(group_ids_N.shape)} "
            "must be 1-D and of the same length"
        )
    rewards_N = rewards_N.float()
    _, inverse_N = torch.unique(group_ids_N, return_inverse=True)
    num_groups = int(inverse_N.max()) + 1 if inverse_N.numel() else 0
    count_K = rewards_N.new_zeros(num_groups).index_add_(0, inverse_N, torch.ones_like(rewards_N))
    mean_K = rewards_N.new_zeros(num_groups).index_add_(0, inverse_N, rewards_N) / count_K
    centred_N = rewards_N - mean_K[inverse_N]
    if not std_normalize:
        return centred_N
    sq_K = rewards_N.new_zeros(num_groups).index_add_(0, inverse_N, centred_N.square())
    std_K = (sq_K / (count_K - 1).clamp(min=1)).sqrt()
    return centred_N / (std_K[inverse_N] + eps)


def dynamic_sampling_keep_mask(rewards_BG: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: True for groups whose rewards are not all equal (they carry gradient)."""
    if rewards_BG.dim() != 2:
        raise ValueError(f"rewards_BG must be [B, G], got shape {tuple(rewards_BG.shape)}")
    return (rewards_BG != rewards_BG[:, :1]).any(dim=1)


def dynamic_sampling_active(enabled: bool, start_step: int, step: int) -> bool:
    """Whether dynamic sampling applies at training ``step`` (0-based).

    >>> dynamic_sampling_active(True, 500, 499), dynamic_sampling_active(True, 500, 500)
    (False, True)
    """
    return enabled and step >= start_step


class DynamicSamplingExhausted(RuntimeError):
    """The batch was not full after the last allowed sampling round."""


class DynamicBatchFiller(Generic[T]):
    """Bookkeeping for "drop all-equal groups and keep sampling until the batch is full".

    The rollout loop drives it; it never samples anything itself::

        filler = DynamicBatchFiller(256, max_rounds=cfg.dynamic_sampling_max_rounds)
        while filler.need_more():
            grpo_groups, rewards_BG = sample(num_contexts=filler.groups_needed)
            filler.add_round(grpo_groups, rewards_BG)
        batch = filler.finish()   # the first 256 informative groups, in arrival order

    ``finish`` returns exactly ``target_groups`` groups when the batch filled up (surplus from
    the last round is discarded, as in DAPO). Otherwise it returns the partial batch with a
    warning (``on_max_rounds="partial"``; possibly empty, in which case the caller skips the
    step) or raises ``DynamicSamplingExhausted`` (``"raise"``). Loss denominators are counted on
    the batch actually trained on, so a partial batch is still normalised correctly.

    >>> f = DynamicBatchFiller(2, max_rounds=3)
    >>> f.add_round(["a", "b", "c"], torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]))
    1
    >>> f.need_more(), f.groups_needed
    (True, 1)
    >>> f.add_round(["d", "e"], torch.tensor([[1.0, 0.0], [0.5, 0.0]]))
    2
    >>> f.finish(), f.rounds, f.groups_seen, f.groups_dropped
    (['b', 'd'], 2, 5, 2)
    """

    def __init__(
        self,
        target_groups: int,
        *,
        max_rounds: int,
        on_max_rounds: Literal["partial", "raise"] = "partial",
    ) -> None:
        """Fill a batch of ``target_groups`` groups in at most ``max_rounds`` rounds."""
        if target_groups < 1 or max_rounds < 1:
            raise ValueError(
                f"target_groups ({target_groups}) and max_rounds ({max_rounds}) must be >= 1"
            )
        if on_max_rounds not in ("partial", "raise"):
            raise ValueError(f"on_max_rounds must be 'partial' or 'raise', got {on_max_rounds!r}")
        self.target_groups = target_groups
        self.max_rounds = max_rounds
        self.on_max_rounds = on_max_rounds
        self.rounds = 0
        self.groups_seen = 0
        self.groups_dropped = 0
        self._kept: list[T] = []

    @property
    def full(self) -> bool:
        """True once at least ``target_groups`` informative groups were kept."""
        return len(self._kept) >= self.target_groups

    @property
    def groups_needed(self) -> int:
        """Informative groups still missing (the caller may over-sample to cover drops)."""
        return max(0, self.target_groups - len(self._kept))

    def need_more(self) -> bool:
        """True while the batch is not full and another round is allowed."""
        return not self.full and self.rounds < self.max_rounds

    def add_round(self, grpo_groups: Sequence[T], rewards_BG: torch.Tensor) -> int:
        """Record one sampling round; keep the groups with unequal rewards; return how many."""
        assert self.rounds < self.max_rounds, "add_round called after the last allowed round"
        if len(grpo_groups) != rewards_BG.shape[0]:
            raise ValueError(f"{len(grpo_groups)} groups but rewards_BG has {rewards_BG.shape[0]} rows")
        keep_B = dynamic_sampling_keep_mask(rewards_BG).tolist()
        kept = [g for g, k in zip(grpo_groups, keep_B, strict=True) if k]
        self.rounds += 1
        self.groups_seen += len(grpo_groups)
        self.groups_dropped += len(grpo_groups) - len(kept)
        self._kept.extend(kept)
        return len(kept)

    def finish(self) -> list[T]:
        """The batch: ``target_groups`` groups if full, else the partial batch or an error."""
        if self.full:
            return self._kept[: self.target_groups]
        msg = (
            f"dynamic sampling kept {len(self._kept)} of {self.target_groups} groups after "
            f"{self.rounds} rounds ({self.groups_dropped} of {self.groups_seen} sampled groups "
            "had all-equal rewards); raise loss.dynamic_sampling_max_rounds or sample more "
            "contexts per round"
        )
        if self.on_max_rounds == "raise":
            raise DynamicSamplingExhausted(msg)
        logger.warning("%s; training on the partial batch", msg)
        return list(self._kept)
