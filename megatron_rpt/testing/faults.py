"""Fault injection for weight-sync tests: hooks that corrupt a bucket on its way to the engine.

``sync_weights(..., tamper=corrupt_bucket(i))`` applies the hook to bucket ``i`` *after* the
trainer-side fingerprints were recorded and before the engine sees it, as a transport bug
would. The hook replaces tensors with modified copies: at TP = 1 streamed tensors can be
views of the trainer's parameters, which must stay untouched.
"""

from __future__ import annotations

import torch


def corrupt_bucket(index: int, *, everything: bool = False):  # noqa: ANN201 - a Tamper hook
    """A tamper hook for bucket ``index``.

    Default: move one element of the bucket's first tensor to the next representable value
    (one ulp: the smallest corruption there is) - invisible to a log-prob probe, caught by
    fingerprints. ``everything=True``: negate every tensor of the bucket - gross corruption the
    probe must catch.

    >>> hook = corrupt_bucket(1)
    >>> t = torch.ones(2, 2)
    >>> hook(0, [("a", t)])[0][1] is t
    True
    >>> bad = hook(1, [("a", t)])[0][1]
    >>> (bad != t).sum().item(), bad[0, 0].item() - 1.0, t[0, 0].item()
    (1, 1.1920928955078125e-07, 1.0)
    """

    def tamper(i: int, tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        if i != index:
            return tensors
        if everything:
            return [(name, -t) for name, t in tensors]
        (name, first), rest = tensors[0], tensors[1:]
        bad = first.clone()
        flat = bad.view(-1)
        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=bad.dtype))
        return [(name, bad), *rest]

    return tamper
