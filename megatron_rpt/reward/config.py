"""Config of the reward."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class RewardConfig:
    """Which reward scores a response, and how the prediction is parsed."""

    name: str = "prefix_match"
    """Registered reward name: prefix_match (the paper's), first_token, dense,
    conditional_dense (see megatron_rpt/reward/registry.py)."""
    require_think_close: bool = True
    """Only read the prediction after '</think>'; a response without it scores 0."""
