r"""The math of RLP, "Reinforcement as a Pretraining Objective" (arXiv 2510.01265): pure torch.

RLP rewards a sampled thought ``c`` before position t by how much it helps predict the
observed next token ``x_t``:

    r(c) = log p_theta(x_t | x<t, c) - log pbar_phi(x_t | x<t)

``p_theta`` is the policy itself, teacher-forced on the observed token after the thought;
``pbar_phi`` a "no-think" teacher whose weights phi are an exponential moving average (EMA) of
theta. The reward is a constant (no gradient through either term). Per context the G thoughts
get the advantage

    A_i = G / (G - 1) * (r_i - mean_j r_j)

(an unbiased leave-one-out baseline written with the inclusive mean; no division by the std),
and the loss is a clipped surrogate over the thought tokens only, each thought's token losses
averaged over its length (``loss.aggregation = seq_mean_token_mean``), with no next-token
loss term. Shapes: B contexts, G thoughts per context.

>>> rlp_advantages(torch.tensor([[1.0, 2.0, 6.0]]))   # mean 3, G/(G-1) = 1.5
tensor([[-3.0000, -1.5000,  4.5000]])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch


def information_gain(scored_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """``r = log p_theta(x_t | x<t, c) - log pbar_phi(x_t | x<t)``, detached, fp32.

    Both arguments have the same shape (one entry per thought; the teacher's value is repeated
    for the G thoughts of a context).
    """
    if scored_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(
            f"scored {tuple(scored_logprobs.shape)} and teacher {tuple(teacher_logprobs.shape)} "
            "log-probs must have the same shape"
        )
    return (scored_logprobs.detach().float() - teacher_logprobs.detach().float()).clone()


def rlp_advantages(rewards_BG: torch.Tensor) -> torch.Tensor:
    """``[B, G]`` advantages ``G/(G-1) * (r - mean r)`` per row (no std normalisation).

    A group of one thought has no baseline: its advantage is 0.
    """
    if rewards_BG.dim() != 2:
        raise ValueError(f"rewards_BG must be [B, G], got shape {tuple(rewards_BG.shape)}")
    rewards_BG = rewards_BG.detach().float()
    g = rewards_BG.shape[1]
    if g < 2:
        return torch.zeros_like(rewards_BG)
    return g / (g - 1) * (rewards_BG - rewards_BG.mean(dim=1, keepdim=True))


@torch.no_grad()
def ema_update_(
    shadow: Sequence[torch.Tensor], params: Iterable[torch.Tensor], decay: float
) -> None:
    """In place: ``phi <- decay * phi + (1 - decay) * theta`` for each pair (fp32 shadows).

    >>> phi = [torch.tensor([1.0])]; ema_update_(phi, [torch.tensor([3.0])], 0.9); phi
    [tensor([1.2000])]
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    params = list(params)
    if len(params) != len(shadow):
        raise ValueError(f"{len(shadow)} EMA tensors for {len(params)} parameters")
    for phi, theta in zip(shadow, params, strict=True):
        phi.mul_(decay).add_(theta.detach().to(phi.dtype), alpha=1.0 - decay)


def thought_token_count(
    token_ids: Sequence[int], decode: Callable[[Sequence[int]], str], close: str
) -> int:
    """How many leading response tokens form the thought.

    The thought ends with the token that completes the first ``close`` marker (e.g.
    ``</think>``), which belongs to it; tokens after it (a continuation the model wrote) are
    not part of the thought and get no loss. Without a marker in the text (or with ``close``
    empty) every token is thought. ``decode`` maps ids to text; the shortest prefix whose text
    contains the marker is found by bisection (the property is monotone in the prefix length).

    >>> pieces = ["a", "b", "</th", "ink>", "x"]
    >>> thought_token_count(range(5), lambda ids: "".join(pieces[i] for i in ids), "</think>")
    4
    """
    n = len(token_ids)
    if not close or close not in decode(token_ids):
        return n
    lo, hi = 1, n  # decode(ids[:hi]) contains the marker; find the smallest such hi
    while lo < hi:
        mid = (lo + hi) // 2
        if close in decode(token_ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


__all__ = ["ema_update_", "information_gain", "rlp_advantages", "thought_token_count"]
